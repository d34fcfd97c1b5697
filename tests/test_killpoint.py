"""The crash tests' kill hook (nemo_lpo/killpoint.py) needs BOTH variables, and every command says when one is set."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lpo import killpoint
from nemo_lpo.cli import main

ARMED = "WILL SIGKILL itself"
NOT_ARMED = "NOT armed"


@pytest.fixture
def clean_env(monkeypatch):
    for name in (killpoint.ENV, killpoint.ARM_ENV, "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(killpoint, "_reached", {})
    return monkeypatch


def test_one_variable_alone_kills_nothing(clean_env):
    """A leaked NEMO_LPO_TEST_KILL_AT (no NEMO_LPO_CRASH_TEST=1) is inert: this test process survives its point."""
    clean_env.setenv(killpoint.ENV, "somewhere")
    killpoint.kill_point("somewhere")
    clean_env.setenv(killpoint.ARM_ENV, "yes")  # only "1" arms it
    killpoint.kill_point("somewhere")

    class Library:
        @staticmethod
        def write():
            return "written"

    original = Library.write
    killpoint.after_calls(Library, "write", "somewhere")
    assert Library.write is original  # unarmed: nothing of the library is replaced


def test_both_variables_kill_at_the_named_point():
    code = ("from nemo_lpo.killpoint import kill_point\n"
            "kill_point('other'); print('passed other', flush=True)\n"
            "kill_point('here'); print('passed here once', flush=True)\n"
            "kill_point('here'); print('survived', flush=True)\n")
    env = {killpoint.ENV: "here#2", killpoint.ARM_ENV: "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert proc.stdout.split("\n")[:2] == ["passed other", "passed here once"] and "survived" not in proc.stdout
    assert "killpoint: SIGKILL at here (#2, rank 0" in proc.stderr


@pytest.mark.parametrize(("env", "said"), [({}, None), ({killpoint.ENV: "x"}, NOT_ARMED),
                                           ({killpoint.ARM_ENV: "1"}, NOT_ARMED),
                                           ({killpoint.ENV: "x", killpoint.ARM_ENV: "1"}, ARMED),
                                           ({killpoint.ENV: "x", killpoint.ARM_ENV: "1", "RANK": "1"}, None),
                                           ({killpoint.ENV: "x", "SLURM_PROCID": "3"}, None)])
def test_warning_when_either_variable_is_present(clean_env, capsys, env, said):
    """One warning on rank 0, saying whether the hook is armed; nothing without the variables or on other ranks."""
    for name, value in env.items():
        clean_env.setenv(name, value)
    killpoint.warn_if_set()
    err = capsys.readouterr().err
    if said is None:
        assert err == ""
    else:
        assert err.count("WARNING") == 1 and said in err and killpoint.ENV in err


def test_every_command_warns_at_its_start(clean_env, capsys, tmp_path):
    """``nemo-lpo <command>`` prints the warning once, before the command runs (here one that fails at once)."""
    clean_env.setenv(killpoint.ENV, "train/before_optimizer_step")
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("WARNING: test variables set") == 1 and NOT_ARMED in err
    assert err.index("WARNING") < err.index("config file not found")
