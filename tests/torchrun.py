"""Run a python script under torchrun (gloo, CPU) from a test and return its output."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil


def free_port() -> int:
    """Return a TCP port on localhost that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every process under it.

    torchrun starts each worker in a session of its own, so killing torchrun (what ``subprocess.run``'s timeout
    does) or its process group leaves the workers running: stuck in a collective, they spin for good and take the
    CPU from the rest of the suite.
    """
    try:
        os.kill(pid, signal.SIGSTOP)  # stopped, it starts no worker between the listing and the kill
        family = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    for member in family:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_torchrun(script: Path | str, nproc: int, *args: str, timeout: float = 600, env: dict | None = None) -> str:
    """Launch ``script`` with ``nproc`` CPU processes; raise with the full log when any rank fails.

    Returns the combined stdout+stderr so tests can parse what rank 0 printed.
    """
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc}", "--nnodes=1",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}",
        str(script), *args,
    ]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["CUDA_VISIBLE_DEVICES"] = ""
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), full_env.get("PYTHONPATH", "")]
    )
    if env:
        full_env.update(env)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"torchrun {script} (nproc={nproc}) timed out after {timeout} s (killed with its "
                                 f"workers):\n{(stdout + stderr)[-8000:]}") from None
    out = stdout + stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} (nproc={nproc}) failed with rc={proc.returncode}:\n{out[-8000:]}")
    return out
