"""TEST HOOK for the crash-safety tests: SIGKILL this process at a named point. Does nothing unless set.

``NEMO_LPO_TEST_KILL_AT=NAME[#N][@RANK]`` makes the process kill itself with SIGKILL (no cleanup, no
``finally``: as a node failure or the OOM killer would) the N-th time (default: the first) it reaches
``kill_point(NAME)``, on global rank RANK only when given (``$RANK``, as torchrun and the Slurm mapping set it).
Only tests set it (tests/test_train_crash.py); the points are:

- ``train/before_optimizer_step``: a step's forward and backward done, its optimizer step not yet taken;
- ``checkpoint/before_rename``: a checkpoint fully written under ``step_N.tmp/``, not yet renamed or named by
  ``latest`` (rank 0, the one that renames);
- ``ref-logps/before_metadata``: the reference sidecar's arrays renamed into place, its metadata (which marks
  it complete) not yet;
- ``pack/before_manifest``: a packed dataset's parts renamed into place, its manifest (which marks it
  complete) not yet.
"""

from __future__ import annotations

import os
import signal

ENV = "NEMO_LPO_TEST_KILL_AT"
_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process when ``$NEMO_LPO_TEST_KILL_AT`` names this point, this time and this rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    _reached[name] = _reached.get(name, 0) + 1
    point, _, rank = spec.partition("@")
    point, _, nth = point.partition("#")
    if point == name and _reached[name] == int(nth or 1) and rank in ("", os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
