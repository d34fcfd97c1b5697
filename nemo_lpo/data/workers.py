"""An order-preserving parallel map in which the calling process is one of the workers.

``nemo-lpo pack --workers N`` runs N tokenising processes on N cores: the main process and a pool of N - 1.
With a pool of N, the main process (reading, validating and writing every list) needed a core of its own,
so N workers on N cores oversubscribed them and 2 workers gave 1.55x one (docs/performance.md §2.5).
"""

from __future__ import annotations

import collections
import multiprocessing
from collections.abc import Callable, Iterable, Iterator

# Chunks handed to each pool process ahead of time: one it works on and one waiting, so it never idles
# between two; more would only leave the main process less to do.
AHEAD_PER_PROCESS = 2
# The most chunks held in the window, per worker: bounds memory when one pool process falls behind.
WINDOW_PER_WORKER = 4


def start_pool(workers: int):
    """A fork pool of ``workers - 1`` processes (None for 1 worker), inheriting what the caller has loaded.

    fork (as torch DataLoader workers do): works from any caller (spawn needs an importable ``__main__``), and
    the processes share whatever the caller loaded before (the tokenizer).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return None if workers == 1 else multiprocessing.get_context("fork").Pool(workers - 1)


def ordered_map(fn: Callable, items: Iterable, pool, workers: int) -> Iterator:
    """Yield ``fn(item)`` for every item, in input order, computed by ``pool`` and by this process.

    Items go to the pool while it holds fewer than ``AHEAD_PER_PROCESS`` per process; otherwise this process
    computes the next item itself. It thereby takes the share its other work (producing the items, consuming
    the results) leaves it time for, and no core waits. ``fn`` must be picklable by reference (module level).
    """
    if pool is None:
        yield from map(fn, items)
        return
    ahead = AHEAD_PER_PROCESS * (workers - 1)
    window = collections.deque()  # [job or None, result] in input order; job None = computed here

    def oldest():
        job, result = window.popleft()
        return result if job is None else job.get()

    for item in items:
        while window and (window[0][0] is None or window[0][0].ready()):
            yield oldest()
        in_pool = sum(1 for job, _ in window if job is not None and not job.ready())
        if in_pool < ahead:
            window.append((pool.apply_async(fn, (item,)), None))
        else:
            window.append((None, fn(item)))
        if len(window) >= WINDOW_PER_WORKER * workers:
            yield oldest()
    while window:
        yield oldest()
