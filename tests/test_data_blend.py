"""Blends of packed datasets (``data.train_prefix: [w1, prefix1, w2, prefix2]``): ratios, determinism, resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nemo_lpo.config import ConfigError, load_config
from tests.dist.train_common import DEMO_LISTS, TINY_CONF, metrics_lines, pack_lists, without_timings

HELDOUT = DEMO_LISTS.parent / "heldout.jsonl"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path]:
    """Two packed sources: ``math`` (6 train lists) and ``other`` (4 held-out lists), both with sidecars."""
    root = tmp_path_factory.mktemp("blend")
    return pack_lists(DEMO_LISTS, root / "math", 6), pack_lists(HELDOUT, root / "other", 4)


def test_blending_index_keeps_every_prefix_within_one_list_of_the_weights():
    from nemo_lpo.data.blend import blending_index

    weights = [1.0, 3.0]  # normalised: 1/4, 3/4
    source, sample = blending_index(weights, 200)
    for n in range(1, 201):
        counts = np.bincount(source[:n], minlength=2)
        assert abs(counts[0] - n / 4) <= 1 and abs(counts[1] - 3 * n / 4) <= 1, (n, counts)
    # the sample number of a position counts that source's earlier positions
    for s in (0, 1):
        assert sample[source == s].tolist() == list(range(int((source == s).sum())))


def test_blend_stream_is_seeded_and_each_source_pass_is_a_permutation(sources):
    from nemo_lpo.data.blend import BlendedLists

    math_prefix, other = sources
    pairs = [(0.25, str(math_prefix)), (0.75, str(other))]
    blend = BlendedLists(pairs, seed=7)
    assert len(blend) == 10 and blend.per_epoch.tolist() == [3, 7]  # within one list of 2.5 / 7.5
    stream = [blend.locate(epoch, p) for epoch in range(3) for p in range(len(blend))]
    again = BlendedLists(pairs, seed=7)
    assert stream == [again.locate(epoch, p) for epoch in range(3) for p in range(len(again))]
    other_seed = BlendedLists(pairs, seed=8)
    assert stream != [other_seed.locate(epoch, p) for epoch in range(3) for p in range(len(other_seed))]
    # `other` (4 lists) gives 21 lists in 3 epochs: five whole passes, each a permutation of its 4 lists
    drawn = [index for source, index in stream if source == 1]
    assert len(drawn) == 21
    for start in range(0, 20, 4):
        assert sorted(drawn[start:start + 4]) == [0, 1, 2, 3]
    # `math` (6 lists) gives 9 in 3 epochs: its first pass once, then 3 of the next one, without a repeat
    drawn = [index for source, index in stream if source == 0]
    assert sorted(drawn[:6]) == list(range(6)) and len(set(drawn[6:])) == 3
    items = blend.items(0, [0, 1])
    assert [item["source"] for item in items] == [blend.source[0], blend.source[1]]


def test_blend_notation_errors_name_the_field():
    for bad, message in (("[0.5, a, 0.5]", "weight1, prefix1"), ("[-1, a, 1, b]", r"data.train_prefix\[0\]"),
                         ("[1, a, 1, a]", "appears twice"), ("[1, 2, 1, b]", r"data.train_prefix\[1\]")):
        with pytest.raises(ConfigError, match=message):
            load_config(TINY_CONF, [f"data.train_prefix={bad}"])


def _run(root: Path, name: str, train_prefix: list, steps: int, *extra: str) -> list[dict]:
    from nemo_lpo.train.loop import train

    cfg = load_config(TINY_CONF, [
        f"data.train_prefix={train_prefix}", "data.global_batch_size=4", "data.micro_batch_size=2", "data.seed=3",
        "reference.mode=online", f"train.max_steps={steps}", "optim.decay_steps=4", "optim.lr=1e-3",
        "optim.warmup_steps=0", "checkpoint.save_interval=2", "checkpoint.keep_last=0",
        f"logging.run_dir={root / name}", "logging.tensorboard=false", *extra])
    train(cfg)  # parallel state, Trainer, resume, run, teardown
    return metrics_lines(root / name / "metrics.jsonl")


def test_blended_training_counts_sources_and_resumes_exactly(sources, tmp_path):
    math_prefix, other = sources
    blend = [1, str(math_prefix), 3, str(other)]
    straight = _run(tmp_path, "straight", blend, 4)
    for line in straight:  # 4 lists per step: 1 and 3 within one list (the blend's greedy over the stream)
        counts = line["lists/source/math"], line["lists/source/other"]
        assert sum(counts) == 4 and abs(counts[0] - 1) <= 1
    total = sum(line["lists/source/math"] for line in straight), sum(line["lists/source/other"] for line in straight)
    assert abs(total[0] - 4) <= 1 and abs(total[1] - 12) <= 1  # 16 lists, weights 1/4 and 3/4
    # 2 steps, then a new process-like run resumes from the step-2 checkpoint for steps 3-4
    _run(tmp_path, "split", blend, 2)
    resumed = _run(tmp_path, "split", blend, 4)
    assert [without_timings(line) for line in resumed] == [without_timings(line) for line in straight]
    # a different blend cannot resume that data position
    with pytest.raises(ValueError, match="checkpoint's data position is for the blend"):
        _run(tmp_path, "split", [1, str(math_prefix), 1, str(other)], 6)
