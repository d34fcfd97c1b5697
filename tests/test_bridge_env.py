"""The Megatron-Bridge test environment as `make test` builds and uses it (main venv; reads files only)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from nemo_lpo.bridge import INSTALL_COMMAND, missing_bridge_message

REPO = Path(__file__).resolve().parents[1]
MAKEFILE = (REPO / "Makefile").read_text()


def make_variable(name: str) -> str:
    match = re.search(rf"^{name} :?= (.*)$", MAKEFILE, re.MULTILINE)
    assert match, f"Makefile sets no {name}"
    return match.group(1)


def test_make_test_runs_every_bridge_test_file_in_the_bridge_env():
    marked = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                    if re.search(r"^pytestmark = .*pytest\.mark\.bridge", p.read_text(), re.MULTILINE))
    assert marked and sorted(make_variable("BRIDGE_TESTS").split()) == marked
    assert "$(BRIDGE_VENV)/bin/python -m pytest -m bridge $(BRIDGE_TESTS)" in make_variable("BRIDGE_PYTEST")
    test_recipe = MAKEFILE.split("\ntest: setup\n")[1].split("\n\n")[0]
    assert "-m pytest $(NOT_BRIDGE)" in test_recipe and "$(BRIDGE_PYTEST)" in test_recipe
    # the .venv run must not even collect them: test_bridge_cpu_compat imports Megatron-Bridge at its top
    not_bridge = subprocess.run(["make", "-s", "--no-print-directory", "-C", str(REPO), "--eval",
                                 "print-not-bridge: ; @echo '$(NOT_BRIDGE)'", "print-not-bridge"],
                                capture_output=True, text=True, check=True).stdout
    not_bridge = shlex.split(not_bridge)
    assert not_bridge[:2] == ["-m", "not bridge"], not_bridge  # (as make expands it: after BRIDGE_TESTS is set)
    assert not_bridge[2:] == [f"--ignore={path}" for path in make_variable("BRIDGE_TESTS").split()], not_bridge
    assert re.search(r"^setup: .*\$\(BRIDGE_STAMP\)", MAKEFILE, re.MULTILINE)  # make setup / make test build it


def test_the_pinned_set_is_bridge_062_without_what_breaks_megatron_core():
    lines = (REPO / "constraints-bridge.txt").read_text().splitlines()
    pins = dict(line.lower().replace("_", "-").split("==") for line in lines if "==" in line and not line.startswith("#"))
    assert pins["megatron-bridge"].startswith("0.6.") and pins["transformers"] == "5.12.1"
    for absent in ("nvidia-resiliency-ext", "transformer-engine", "apex", "torch", "megatron-core"):
        assert absent not in pins, absent  # never installed; torch and megatron-core come from the main venv
    assert "--no-deps -r constraints-bridge.txt" in MAKEFILE


def test_the_missing_bridge_message_names_the_container_and_a_real_target():
    message = missing_bridge_message("ModuleNotFoundError: No module named 'megatron.bridge'")
    assert "nvcr.io/nvidia/nemo:26.08" in message and f"`{INSTALL_COMMAND}`" in message
    target = INSTALL_COMMAND.removeprefix("make ")
    assert re.search(rf"^{target}: ", MAKEFILE, re.MULTILINE), INSTALL_COMMAND
