"""Check an environment where nemo-lpo was installed with ``--no-deps`` (Dockerfile.nemo): nothing is missing.

Every dependency pyproject.toml declares must be installed at a version its range admits (read with
importlib.metadata; no resolver runs, so the image's own overrides never matter), and nemo-lpo's modules must
import. Prints each problem and exits 1; exits 0 when there is none.

Usage: python tools/check_installed.py [pyproject.toml]
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
MODULES = ("nemo_lpo.cli", "nemo_lpo.train.loop", "nemo_lpo.convert.hf_to_mcore", "nemo_lpo.bridge.task")
"""nemo-lpo modules that between them import every declared dependency."""


def version_problems(pyproject: Path, installed=importlib.metadata.version) -> list[str]:
    """One line per declared dependency that is missing or outside its range (``installed(name)`` -> version)."""
    found = []
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        req = Requirement(line)
        try:
            version = installed(req.name)
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{req.name}: not installed (pyproject.toml wants {req})")
            continue
        if not req.specifier.contains(version, prereleases=True):
            found.append(f"{req.name}: {version} installed, outside pyproject.toml's range {req}")
    return found


def import_problems(modules=MODULES) -> list[str]:
    """One line per module that does not import."""
    found = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - every failure is reported by name
            found.append(f"import {module}: {type(err).__name__}: {err}")
    return found


def main(argv: list[str]) -> int:
    """Print every problem of this environment; 1 when there is one, else 0."""
    found = version_problems(Path(argv[0]) if argv else PYPROJECT) + import_problems()
    for line in found:
        print(f"check_installed: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
