"""tests/torchrun.py: a launch that runs past its timeout is killed with its workers, none left spinning.

Killing torchrun alone (what ``subprocess.run``'s timeout did) is not enough: its workers run in sessions of
their own and hold the output pipe, so the helper then waited for them (planted: 608 s for a worker sleeping
600 s, instead of failing at the timeout).
"""

from __future__ import annotations

import time

import psutil
import pytest

from tests.torchrun import run_torchrun

TAG = f"torchrun-helper-{time.time_ns()}"


def tagged() -> list[int]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("NEMO_LPO_TEST_RUN_TAG") == TAG and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


def test_a_timed_out_launch_leaves_no_worker(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text("import time\nprint('worker up', flush=True)\ntime.sleep(600)\n")
    started = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 15 s"):
        run_torchrun(script, 2, timeout=15, env={"NEMO_LPO_TEST_RUN_TAG": TAG})
    assert time.monotonic() - started < 300, "the helper waited for the workers instead of killing them"
    deadline = time.monotonic() + 10
    while tagged() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not tagged(), f"processes of the timed-out launch still alive: {tagged()}"
