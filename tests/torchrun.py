"""Run a python script under torchrun (gloo, CPU) from a test and return its output."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    """Return a TCP port on localhost that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} (nproc={nproc}) failed with rc={proc.returncode}:\n{out[-8000:]}")
    return out
