"""Checkpoints through the real CLI (torchrun + `nemo-lpo train`).

Exact resume, resume under another layout, and a kill -9 in the middle of a save leaving the previous
checkpoint loadable.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.dist.train_common import DEMO_LISTS, REPO, TINY_CONF, metrics_lines, pack_lists, without_timings
from tests.torchrun import free_port, run_torchrun

CLI = REPO / "nemo_lpo" / "cli.py"
pytestmark = pytest.mark.distributed


def overrides(prefix: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_prefix={prefix}", f"logging.run_dir={run_dir}", "reference.mode=online",
            "train.max_steps=6", "optim.lr=1e-3", "optim.warmup_steps=1", "data.global_batch_size=4",
            "data.micro_batch_size=2", "logging.tensorboard=false", "checkpoint.keep_last=0", *extra]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory) -> Path:
    return pack_lists(DEMO_LISTS, tmp_path_factory.mktemp("ckpt") / "data" / "lists", 16)


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


def test_resume_under_another_layout(straight, prefix, tmp_path):
    """Saved at 1 process, resumed at TP2 + sequence parallel (megatron resharding of model and optimizer)."""
    resumed_copy(straight, tmp_path)
    run_torchrun(CLI, 2, "train", str(TINY_CONF),
                 *overrides(prefix, tmp_path, "parallel.tp=2", "parallel.sequence_parallel=true"))
    want = metrics_lines(straight / "metrics.jsonl")[3:]
    got = metrics_lines(tmp_path / "metrics.jsonl")
    assert [g["step"] for g in got] == [4, 5, 6]
    for g, w in zip(got, want, strict=True):
        assert abs(g["loss"] - w["loss"]) < 1e-5 and abs(g["grad_norm"] - w["grad_norm"]) < 1e-5


def test_kill9_during_save_keeps_previous_checkpoint(prefix, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(CLI), "train", str(TINY_CONF),
           *overrides(prefix, run, "checkpoint.save_interval=1", "train.max_steps=4")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saving = run / "checkpoints" / "step_0000002.tmp"
    try:
        deadline = time.monotonic() + 300
        # the first shard file appears ~40 ms into the save, the metadata ~0.7 s later: kill in between
        while not (saving.is_dir() and any(saving.iterdir())):
            assert proc.poll() is None, "training ended before the second save started"
            assert time.monotonic() < deadline, "the second checkpoint save never started"
            time.sleep(0.005)
    finally:
        # torchrun puts its workers in sessions of their own: kill -9 each of them, and torchrun itself
        for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert saving.is_dir() and not (saving / "metadata.json").exists()  # killed mid-save: half-written
    out = run_torchrun(CLI, 1, "train", str(TINY_CONF), *overrides(prefix, run, "train.max_steps=2"))
    assert "resumed from" in out and "at step 1" in out
    assert not list((run / "checkpoints").glob("*.tmp"))  # the half-written save was cleared
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    assert [line["step"] for line in metrics_lines(run / "metrics.jsonl")] == [1, 2]
