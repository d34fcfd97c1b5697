"""SIGKILL at the worst moments, on 2 ranks (PP2), and the restarted command continues exactly.

Deterministic kill points (``nemo_lpo/killpoint.py``: ``NEMO_LPO_TEST_KILL_AT``) and one timed kill (shards of a
save half-written: the first shard file seen). After each kill the test checks that nothing half-written is
taken for complete (``latest``, the packed dataset's manifest, the reference sidecar's metadata), and the
restarted command's per-step metrics equal an uninterrupted run's EXACTLY (every logged value but timings).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from tests.dist.train_common import REPO, TINY_CONF, metrics_lines, without_timings, write_ragged_lists
from tests.torchrun import free_port

CLI = REPO / "nemo_lpo" / "cli.py"
pytestmark = pytest.mark.distributed

STEPS = 4
COMMON = ["parallel.pp=2", "reference.mode=online", f"train.max_steps={STEPS}", f"optim.decay_steps={STEPS}",
          "optim.lr=1e-3", "optim.warmup_steps=0", "data.global_batch_size=4", "data.micro_batch_size=1",
          "checkpoint.save_interval=2", "checkpoint.keep_last=0", "logging.tensorboard=false"]


TAG = f"{os.getpid()}-{time.time_ns()}"  # inherited by every process a launch starts (see reap)


def env_with(kill_at: str | None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "NEMO_LPO_CRASH_TEST": TAG,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("NEMO_LPO_TEST_KILL_AT", None)
    if kill_at:
        env["NEMO_LPO_TEST_KILL_AT"] = kill_at
    return env


def launch(nproc: int, *args: str, kill_at: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(CLI), *args]
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the test polls, and a full pipe blocks
    proc = subprocess.Popen(cmd, env=env_with(kill_at), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def reap() -> None:
    """SIGKILL what a killed launch left running (they carry this module's TAG in their environment).

    The workers' helper processes (multiprocessing spawn children) outlive a SIGKILLed parent.
    """
    for process in psutil.process_iter():
        try:
            if process.environ().get("NEMO_LPO_CRASH_TEST") == TAG:
                process.send_signal(signal.SIGKILL)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def finish(proc: subprocess.Popen, *, killed: bool) -> str:
    proc.wait(timeout=600)
    reap()
    out = output(proc)
    if killed:
        assert proc.returncode != 0, f"the run was not killed:\n{out[-4000:]}"
    else:
        assert proc.returncode == 0, f"rc={proc.returncode}:\n{out[-6000:]}"
    return out


def train(prefix: Path, run: Path, *extra: str, kill_at: str | None = None) -> str:
    args = ["train", str(TINY_CONF), f"data.train_prefix={prefix}", f"logging.run_dir={run}", *COMMON, *extra]
    return finish(launch(2, *args, kill_at=kill_at), killed=kill_at is not None)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (sessions of their own) and torchrun itself."""
    for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    reap()


def pack(src: Path, prefix: Path, kill_at: str | None = None) -> None:
    proc = subprocess.run([sys.executable, str(CLI), "pack", "--input", str(src), "--output-prefix", str(prefix),
                           "--no-progress"], env=env_with(kill_at), capture_output=True, text=True, timeout=300)
    if kill_at:
        assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 0, proc.stdout + proc.stderr


def same_lines(run: Path, straight: Path, steps: list[int]) -> None:
    got = [without_timings(line) for line in metrics_lines(run / "metrics.jsonl")]
    want = [without_timings(line) for line in metrics_lines(straight / "metrics.jsonl")]
    assert [line["step"] for line in got] == steps
    assert got == [line for line in want if line["step"] in steps]  # bit-identical losses, grad norms, metrics


def latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """The ragged parity lists, as JSONL and packed by the CLI (uninterrupted)."""
    root = tmp_path_factory.mktemp("crash")
    src = write_ragged_lists(root / "ragged.jsonl")
    pack(src, root / "data" / "lists")
    return src, root / "data" / "lists"


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> Path:
    """4 steps without interruption (checkpoints at 2 and 4)."""
    run = tmp_path_factory.mktemp("straight")
    train(data[1], run)
    assert [line["step"] for line in metrics_lines(run / "metrics.jsonl")] == [1, 2, 3, 4]
    return run


def test_kills_during_a_step_and_during_saves(data, straight, tmp_path):
    """Three kills in a row on one run folder, each restart resuming from the last complete checkpoint."""
    prefix, run = data[1], tmp_path / "run"
    # 1. rank 1 killed in step 3 (backward done, optimizer step not taken), after the step-2 checkpoint
    train(prefix, run, kill_at="train/before_optimizer_step#3@1")
    assert latest(run) == "step_0000002" and not list((run / "checkpoints").glob("*.tmp"))
    assert [line["step"] for line in metrics_lines(run / "metrics.jsonl")] == [1, 2]
    same_lines(run, straight, [1, 2])

    # 2. restarted; killed (every process) while the step-4 save writes its shards: the first shard file seen
    proc = launch(2, "train", str(TINY_CONF), f"data.train_prefix={prefix}", f"logging.run_dir={run}", *COMMON)
    saving = run / "checkpoints" / "step_0000004.tmp"
    try:
        deadline = time.monotonic() + 600
        while not (saving.is_dir() and list(saving.glob("*.distcp"))):
            assert proc.poll() is None, f"the restarted run ended before its step-4 save:\n{output(proc)[-4000:]}"
            assert time.monotonic() < deadline, "the step-4 save never started"
            time.sleep(0.001)
    finally:
        kill_tree(proc)
    assert not (saving / "metadata.json").exists(), "killed too late: the save had completed"
    assert latest(run) == "step_0000002"  # the half-written save is not named
    same_lines(run, straight, [1, 2, 3, 4])  # the restart resumed at step 2: steps 3, 4 as the straight run

    # 3. restarted; rank 0 killed with step 4 completely written under step_0000004.tmp, never renamed
    train(prefix, run, kill_at="checkpoint/before_rename")
    assert (saving / "metadata.json").is_file() and not (run / "checkpoints" / "step_0000004").exists()
    assert latest(run) == "step_0000002"  # complete but unrenamed: still not taken
    same_lines(run, straight, [1, 2, 3, 4])

    # 4. restarted without a kill: from step 2 again, to the end; the stale .tmp is cleared by the save
    out = train(prefix, run)
    assert "resumed from" in out and "at step 2" in out
    assert latest(run) == "step_0000004" and not list((run / "checkpoints").glob("*.tmp"))
    same_lines(run, straight, [1, 2, 3, 4])


def test_kills_during_pack_and_ref_logps(data, straight, tmp_path):
    """Pack killed before its manifest, ref-logps before its metadata: neither is taken as complete.

    Rerun, pack gives the uninterrupted pack's bytes, and training on the rerun sidecar equals the online run.
    """
    from nemo_lpo.data import ListwiseDataset

    src, uninterrupted = data
    prefix = tmp_path / "data" / "lists"
    pack(src, prefix, kill_at="pack/before_manifest")
    assert list(prefix.parent.glob("lists*.bin"))  # the parts were in place ...
    with pytest.raises(FileNotFoundError, match="no manifest"):  # ... but it is not a dataset
        ListwiseDataset(prefix)
    pack(src, prefix)
    for want in uninterrupted.parent.glob(uninterrupted.name + "*"):
        assert (prefix.parent / want.name).read_bytes() == want.read_bytes(), want.name

    ref = ["ref-logps", str(TINY_CONF), f"data.train_prefix={prefix}", *COMMON]
    finish(launch(2, *ref, kill_at="ref-logps/before_metadata"), killed=True)
    assert list(prefix.parent.glob("lists.ref_logps*.bin"))  # the arrays were in place ...
    assert not ListwiseDataset(prefix).has_ref_logps  # ... without the metadata that marks them complete
    finish(launch(2, *ref), killed=False)
    assert ListwiseDataset(prefix).has_ref_logps
    run = tmp_path / "run"
    train(prefix, run, "reference.mode=precomputed", f"train.max_steps={STEPS // 2}")
    same_lines(run, straight, [1, 2])  # precomputed from the rerun sidecar == the online reference, exactly
