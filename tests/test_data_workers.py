"""workers.ordered_map: results in input order, computed by the pool and by the calling process."""

import os
import time

import pytest

from nemo_lpo.data.workers import WINDOW_PER_WORKER, ordered_map, start_pool


def _slow_square(x):
    time.sleep(0.01 * (x % 3))  # uneven item costs: results finish out of order
    return os.getpid(), x * x


def test_results_in_input_order_from_the_pool_and_the_caller():
    pool = start_pool(3)
    try:
        results = list(ordered_map(_slow_square, range(60), pool, 3))
    finally:
        pool.terminate()
        pool.join()
    assert [r for _, r in results] == [x * x for x in range(60)]
    pids = [pid for pid, _ in results]
    assert os.getpid() in pids  # the caller is one of the workers
    assert len(set(pids) - {os.getpid()}) >= 1  # and the pool's processes did their share
    assert sum(pid != os.getpid() for pid in pids) >= 20


def test_one_worker_runs_in_the_caller_without_a_pool():
    assert start_pool(1) is None
    assert list(ordered_map(_slow_square, range(5), None, 1)) == [(os.getpid(), x * x) for x in range(5)]
    with pytest.raises(ValueError, match="workers must be >= 1"):
        start_pool(0)


def test_items_are_read_lazily_with_a_bounded_window():
    """The producer is never more than the window ahead of the consumer (memory stays bounded)."""
    produced = []

    def items():
        for x in range(100):
            produced.append(x)
            yield x

    pool = start_pool(2)
    try:
        for consumed, (_, value) in enumerate(ordered_map(_slow_square, items(), pool, 2)):
            assert value == consumed * consumed
            assert len(produced) - consumed <= WINDOW_PER_WORKER * 2 + 1
    finally:
        pool.terminate()
        pool.join()


def test_a_worker_error_reaches_the_caller():
    pool = start_pool(2)
    try:
        with pytest.raises(ZeroDivisionError):
            list(ordered_map(_inverse, [1, 2, 0, 4, 5, 6, 7, 8], pool, 2))
    finally:
        pool.terminate()
        pool.join()


def _inverse(x):
    return 1 / x
