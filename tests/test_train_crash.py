"""SIGKILL at the worst moments, on 2 ranks (PP2), and the restarted command continues exactly.

Deterministic kill points (``nemo_lpo/killpoint.py``: ``NEMO_LPO_TEST_KILL_AT`` with ``NEMO_LPO_CRASH_TEST=1``),
one of them between two shard writes of a save. Each kill is checked to be what was planned: the process said
``killpoint: SIGKILL at NAME`` and torchrun's failure report gives that rank's exit as -9 (a pack killed alone:
its exit status -9); and NOTHING of the killed run is left (no worker, no helper process such as the
multiprocessing Manager megatron's checkpoint writer used to start). After each kill the test checks that
nothing half-written is taken for complete (``latest``, the packed dataset's manifest, the reference sidecar's
metadata), and the restarted command's per-step metrics equal an uninterrupted run's EXACTLY (every logged value
but timings).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from nemo_lpo import killpoint
from tests.dist.train_common import REPO, TINY_CONF, metrics_lines, without_timings, write_ragged_lists
from tests.torchrun import free_port

CLI = REPO / "nemo_lpo" / "cli.py"
pytestmark = pytest.mark.distributed

STEPS = 4
COMMON = ["parallel.pp=2", "reference.mode=online", f"train.max_steps={STEPS}", f"optim.decay_steps={STEPS}",
          "optim.lr=1e-3", "optim.warmup_steps=0", "data.global_batch_size=4", "data.micro_batch_size=1",
          "checkpoint.save_interval=2", "checkpoint.keep_last=0", "logging.tensorboard=false"]

TAG_ENV = "NEMO_LPO_TEST_RUN_TAG"  # inherited by every process a launch starts, helpers included
TAG = f"{os.getpid()}-{time.time_ns()}"


def env_with(kill_at: str | None, tag: str = TAG) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", TAG_ENV: tag,
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(killpoint.ENV, None)
    env.pop(killpoint.ARM_ENV, None)
    if kill_at:
        env.update({killpoint.ENV: kill_at, killpoint.ARM_ENV: "1"})
    return env


def launch(nproc: int, *args: str, kill_at: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(CLI), *args]
    log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the run goes on, and a full pipe blocks
    proc = subprocess.Popen(cmd, env=env_with(kill_at), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def output(proc: subprocess.Popen) -> str:
    proc.log.seek(0)
    return proc.log.read()


def left_behind(tag: str = TAG, grace: float = 30.0) -> list[str]:
    """The processes still carrying ``tag`` after ``grace`` seconds (exiting ones get that long to go)."""
    deadline = time.monotonic() + grace
    while True:
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(TAG_ENV) == tag and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(f"pid {process.pid} (parent {process.ppid()}): {' '.join(process.cmdline())[:200]}")
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def assert_sigkilled_at(out: str, kill_at: str, *, torchrun: bool = True) -> None:
    """The run died where planned: the kill point said so, and (torchrun) its report gives that rank exit -9."""
    point, _, rank = kill_at.partition("@")
    said = re.findall(r"killpoint: SIGKILL at (\S+) \(#\d+, rank (\d+)", out)
    assert len(said) == 1 and said[0][0] == point.partition("#")[0], f"not killed at {kill_at}:\n{out[-4000:]}"
    assert not rank or said[0][1] == rank, said
    if torchrun:  # the first observed failure (the others were stopped by torchrun): that rank, signal 9
        root = re.search(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", out, re.S)
        assert root and root.groups() == (said[0][1], "-9"), f"torchrun's report:\n{out[-3000:]}"


def finish(proc: subprocess.Popen, kill_at: str | None = None) -> str:
    """Wait for the launch; it ended as planned (killed at ``kill_at``, or rc 0) and left no process behind."""
    proc.wait(timeout=900)
    out = output(proc)
    if kill_at:
        assert proc.returncode != 0, f"the run was not killed:\n{out[-4000:]}"
        assert_sigkilled_at(out, kill_at)
    else:
        assert proc.returncode == 0, f"rc={proc.returncode}:\n{out[-6000:]}"
    left = left_behind()
    assert not left, "processes of the finished run are still alive:\n" + "\n".join(left)
    return out


def train(prefix: Path, run: Path, *extra: str, kill_at: str | None = None) -> str:
    args = ["train", str(TINY_CONF), f"data.train_prefix={prefix}", f"logging.run_dir={run}", *COMMON, *extra]
    return finish(launch(2, *args, kill_at=kill_at), kill_at)


def pack(src: Path, prefix: Path, kill_at: str | None = None) -> None:
    proc = subprocess.run([sys.executable, str(CLI), "pack", "--input", str(src), "--output-prefix", str(prefix),
                           "--no-progress"], env=env_with(kill_at), capture_output=True, text=True, timeout=300)
    if kill_at:
        assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
        assert_sigkilled_at(proc.stderr, kill_at, torchrun=False)
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

    # 2. restarted; rank 0 killed in the step-4 save between its two shard writes (megatron writes a rank's last
    # shard file first, then the others in threads: one of rank 0's files is on disk, the other never started)
    train(prefix, run, kill_at="checkpoint/between_shard_writes@0")
    saving = run / "checkpoints" / "step_0000004.tmp"
    assert len(list(saving.glob("__0_*.distcp"))) == 1, sorted(p.name for p in saving.iterdir())
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
    finish(launch(2, *ref, kill_at="ref-logps/before_metadata"), "ref-logps/before_metadata")
    assert list(prefix.parent.glob("lists.ref_logps*.bin"))  # the arrays were in place ...
    assert not ListwiseDataset(prefix).has_ref_logps  # ... without the metadata that marks them complete
    finish(launch(2, *ref))
    assert ListwiseDataset(prefix).has_ref_logps
    run = tmp_path / "run"
    train(prefix, run, "reference.mode=precomputed", f"train.max_steps={STEPS // 2}")
    same_lines(run, straight, [1, 2])  # precomputed from the rerun sidecar == the online reference, exactly


def test_the_leftover_check_sees_an_orphaned_helper():
    """The check of ``finish`` on a planted orphan, which it must name.

    A process that starts a multiprocessing Manager (as megatron's checkpoint writer did) and is SIGKILLed leaves
    the Manager behind.
    """
    tag = f"{TAG}-planted"
    code = ("import multiprocessing, os, signal\n"
            "manager = multiprocessing.get_context('spawn').Manager()\n"
            "print(manager._process.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    with tempfile.TemporaryFile("w+") as out:  # not a pipe: the orphan would hold it open
        proc = subprocess.run([sys.executable, "-c", code], env=env_with(None, tag), stdout=out,
                              stderr=subprocess.STDOUT, text=True, timeout=300)
        out.seek(0)
        printed = out.read()
    assert proc.returncode == -signal.SIGKILL, printed
    orphan = int(printed.split()[0])
    try:
        left = left_behind(tag, grace=2.0)
        assert any(line.startswith(f"pid {orphan} ") for line in left), left
    finally:  # the planted orphans (the Manager, and the resource tracker spawn starts), by their pids
        for process in psutil.process_iter():
            try:
                if process.environ().get(TAG_ENV) == tag:
                    os.kill(process.pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
    assert not left_behind(tag)
    assert not multiprocessing.active_children()
