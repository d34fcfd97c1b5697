"""Checkpoints through the real CLI (torchrun + `nemo-lpo train`): save, keep, and resume exactly.

Resumes under another layout (a 1-process checkpoint at TP2, PP2, EP2, DP2 + distributed optimizer, and PP2 / DP2
checkpoints back at 1 process) run in tests/test_train_parity.py's launches (scenarios ``*_resume`` and
``base4_from_*``), compared there on every metric and per-parameter gradient; kills during steps and saves:
tests/test_train_crash.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.dist.train_common import DEMO_LISTS, REPO, TINY_CONF, metrics_lines, pack_lists, without_timings
from tests.torchrun import run_torchrun

CLI = REPO / "nemo_lpo" / "cli.py"
INIT_WORKER = REPO / "tests" / "dist" / "train_parity.py"  # its `init` scenario writes seeded starting weights
pytestmark = pytest.mark.distributed


def overrides(prefix: Path, run_dir: Path, *extra: str) -> list[str]:
    # the online reference is the starting checkpoint: the same weights under every layout (a random init
    # is drawn differently per pipeline / expert layout)
    return [f"data.train_prefix={prefix}", f"logging.run_dir={run_dir}", "reference.mode=online",
            f"model.init_checkpoint={prefix.parent.parent / 'init'}",
            "train.max_steps=6", "optim.lr=1e-3", "optim.warmup_steps=1", "data.global_batch_size=4",
            "data.micro_batch_size=2", "logging.tensorboard=false", "checkpoint.keep_last=0", *extra]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    """16 packed demo lists under ROOT/data/lists, and the seeded starting weights in ROOT/init."""
    root = tmp_path_factory.mktemp("ckpt")
    prefix = pack_lists(DEMO_LISTS, root / "data" / "lists", 16)
    run_torchrun(INIT_WORKER, 1, str(root), str(prefix), "init")
    assert (root / "init" / "metadata.json").is_file()
    return prefix


@pytest.fixture(scope="module")
def straight(prefix, tmp_path_factory) -> Path:
    """6 steps in one go, checkpoints at 3 and 6."""
    run = tmp_path_factory.mktemp("straight")
    run_torchrun(CLI, 1, "train", str(TINY_CONF), *overrides(prefix, run, "checkpoint.save_interval=3"))
    return run


def resumed_copy(straight: Path, dst: Path) -> None:
    """A run folder holding only the straight run's step-3 checkpoint (as if a job stopped there)."""
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step_0000003", dst / "checkpoints" / "step_0000003")
    (dst / "checkpoints" / "latest").write_text("step_0000003\n")


def test_straight_run_checkpoints(straight):
    lines = metrics_lines(straight / "metrics.jsonl")
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["latest", "step_0000003", "step_0000006"]
    assert (straight / "config.yaml").is_file()


def test_resume_gives_identical_metrics(straight, prefix, tmp_path):
    resumed_copy(straight, tmp_path)
    out = run_torchrun(CLI, 1, "train", str(TINY_CONF), *overrides(prefix, tmp_path, "checkpoint.save_interval=3"))
    assert "resumed from" in out and "at step 3" in out
    want = [without_timings(line) for line in metrics_lines(straight / "metrics.jsonl")[3:]]
    got = [without_timings(line) for line in metrics_lines(tmp_path / "metrics.jsonl")]
    assert got == want  # bit-identical: model, Adam state, scheduler, data position and RNG restored
