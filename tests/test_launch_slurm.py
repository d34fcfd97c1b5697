"""The tiny CPU recipe on a real single-node Slurm (.ci/slurm_test.sh), when this machine allows it.

The script installs Debian's slurm + munge, starts the daemons on localhost, submits a trivial job and
then recipes/tiny_cpu.sbatch, checks metrics and a checkpoint, signals the job as at its time limit,
checks that it requeued and resumed from its checkpoint, and always stops the daemons. It needs root and
either Slurm already installed or Debian's package registry; otherwise the test skips with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".ci" / "slurm_test.sh"
DAEMONS = ("slurmctld", "slurmd", "sbatch", "munged")


def _can_run() -> str | None:
    """None when the script can run here, else why not."""
    if os.geteuid() != 0:
        return "needs root (installs slurm/munge and starts their daemons)"
    if not (REPO / ".venv" / "bin" / "nemo-lpo").is_file():
        return f"{REPO / '.venv'} has no nemo-lpo (run 'make setup')"
    if all(shutil.which(d) for d in DAEMONS):
        return None
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    try:
        proc = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return "apt-get update timed out: Debian's package registry is not reachable"
    if proc.returncode != 0:
        return f"apt-get update failed (Debian's registry unreachable?): {proc.stderr.strip()[-300:]}"
    return None


@pytest.mark.slurm
@pytest.mark.slow
def test_tiny_recipe_on_a_real_slurm_requeues_and_resumes() -> None:
    reason = _can_run()
    if reason is not None:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NEMO_LPO_"))}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f".ci/slurm_test.sh failed (rc={proc.returncode}):\n{out[-12000:]}"
    assert "PASS" in out and "resumed from step_" in out, out[-4000:]
    # the requeued run's per-step metrics equal an uninterrupted run's (the script compares them exactly)
    assert "requeued == uninterrupted on every metric" in out, out[-4000:]
    # the trap stopped every daemon it started (they ran with the script's state folder in their arguments)
    left = subprocess.run(["pgrep", "-af", "nemo-lpo-slurm"], capture_output=True, text=True).stdout
    daemons = [line for line in left.splitlines()
               if Path(line.split()[1]).name in ("slurmctld", "slurmd", "munged", "setpriv")]
    assert not daemons, f"daemons left running: {daemons}"
