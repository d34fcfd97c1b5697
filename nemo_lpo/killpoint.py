"""TEST HOOK for the crash-safety tests: SIGKILL this process at a named point. Does nothing unless armed.

Armed only when BOTH ``NEMO_LPO_TEST_KILL_AT=NAME[#N][@RANK]`` and ``NEMO_LPO_CRASH_TEST=1`` are set (a single
leaked variable, from a shell profile or Slurm's ``--export=ALL``, must not make a production job kill itself);
every command warns at its start when either is present (``warn_if_set``, called by ``nemo_lpo.cli.main``).
Armed, the process prints ``killpoint: SIGKILL at NAME ...`` to stderr and kills itself with SIGKILL (no
cleanup, no ``finally``: as a node failure or the OOM killer would) the N-th time (default: the first) it
reaches ``kill_point(NAME)``, on global rank RANK only when given (``$RANK``, as torchrun and the Slurm mapping
set it). Only tests set them (tests/test_train_crash.py, tests/test_onpolicy.py); the points are:

- ``train/before_optimizer_step``: a step's forward and backward done, its optimizer step not yet taken;
- ``checkpoint/between_shard_writes``: a checkpoint's shard file written by this rank under ``step_N.tmp/``
  (megatron writes each rank's shards in parallel files, then rank 0 writes the metadata): the save is half
  written (``after_calls`` wraps megatron's per-file writer only while armed);
- ``checkpoint/before_rename``: a checkpoint fully written under ``step_N.tmp/``, not yet renamed or named by
  ``latest`` (rank 0, the one that renames);
- ``ref-logps/before_metadata``: the reference sidecar's arrays renamed into place, its metadata (which marks
  it complete) not yet;
- ``pack/before_manifest``: a packed dataset's parts renamed into place, its manifest (which marks it
  complete) not yet;
- ``generate/after_prompt``: a prompt's K samples appended to this rank's part file, the output not yet merged
  (tests/test_onpolicy.py).
"""

from __future__ import annotations

import functools
import os
import signal
import sys

ENV = "NEMO_LPO_TEST_KILL_AT"
ARM_ENV = "NEMO_LPO_CRASH_TEST"  # must be "1" as well
_reached: dict[str, int] = {}


def _armed_spec() -> str | None:
    spec = os.environ.get(ENV)
    return spec if spec and os.environ.get(ARM_ENV) == "1" else None


def warn_if_set() -> None:
    """One warning on stderr (rank 0 of a torchrun or srun launch) when either test variable is present, armed or not."""
    present = {name: os.environ[name] for name in (ENV, ARM_ENV) if name in os.environ}
    if not present or os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":  # srun: before the mapping
        return
    values = " ".join(f"{name}={value!r}" for name, value in present.items())
    if _armed_spec():
        effect = "this run WILL SIGKILL itself at that test kill point (crash-safety tests only)"
    else:
        effect = f"the kill hook is NOT armed (it needs both {ENV} and {ARM_ENV}=1); unset them outside the tests"
    print(f"WARNING: test variables set: {values}: {effect}", file=sys.stderr, flush=True)


def kill_point(name: str) -> None:
    """SIGKILL this process when the armed ``$NEMO_LPO_TEST_KILL_AT`` names this point, this time and this rank."""
    spec = _armed_spec()
    if not spec:
        return
    _reached[name] = _reached.get(name, 0) + 1
    point, _, rank = spec.partition("@")
    point, _, nth = point.partition("#")
    here = os.environ.get("RANK", "0")
    if point == name and _reached[name] == int(nth or 1) and rank in ("", here):
        print(f"killpoint: SIGKILL at {name} (#{_reached[name]}, rank {here}, pid {os.getpid()})", file=sys.stderr,
              flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def after_calls(owner: type, attribute: str, name: str) -> None:
    """While armed for ``name``, make the static method ``owner.attribute`` reach ``kill_point(name)`` after each call.

    For a point inside a library (megatron's per-file checkpoint writer). Unarmed (every real run), nothing is
    replaced.
    """
    spec = _armed_spec()
    original = getattr(owner, attribute)
    if not spec or spec.partition("@")[0].partition("#")[0] != name or getattr(original, "_kill_point", None):
        return

    @functools.wraps(original)
    def then_kill_point(*args, **kwargs):
        result = original(*args, **kwargs)
        kill_point(name)
        return result

    then_kill_point._kill_point = name
    setattr(owner, attribute, staticmethod(then_kill_point))
