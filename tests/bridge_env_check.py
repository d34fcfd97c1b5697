"""Check the Megatron-Bridge test environment (``make bridge-env``): run it with that environment's python.

Megatron-Bridge's training entry points and megatron-core import (through the test-only TE shim), with the
versions constraints-bridge.txt pins rather than the main venv's, and without nvidia-resiliency-ext (whose
PyPI release breaks ``import megatron.core.dist_checkpointing``). Exits non-zero naming what is wrong.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from tests.dist import bridge_te_shim
from tools.check_installed import import_problems

PINS = Path(__file__).resolve().parents[1] / "constraints-bridge.txt"
ENTRY_POINTS = ("megatron.core.dist_checkpointing", "megatron.bridge.training.finetune",
                "megatron.bridge.training.setup", "megatron.bridge.training.train",
                "megatron.bridge.training.checkpointing", "megatron.bridge.data.loaders")


def pinned() -> dict[str, str]:
    """Name -> version of every ``name==version`` line of constraints-bridge.txt."""
    lines = [line.split("#")[0].strip() for line in PINS.read_text().splitlines()]
    return dict(line.split("==") for line in lines if "==" in line)


def problems() -> list[str]:
    """What is wrong with this environment (empty: it is the Bridge test environment)."""
    found = []
    for name, version in pinned().items():
        try:
            got = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            got = None
        if got != version:
            found.append(f"{name}: {got} installed, constraints-bridge.txt pins {version}")
    if importlib.util.find_spec("nvidia_resiliency_ext") is not None:
        found.append("nvidia_resiliency_ext is installed (it breaks megatron-core's dist_checkpointing import)")
    bridge_te_shim.install()
    return found + import_problems(ENTRY_POINTS)


if __name__ == "__main__":
    found = problems()
    for line in found:
        print(f"bridge env ({sys.prefix}): {line}", file=sys.stderr)
    sys.exit(1 if found else 0)
