"""tools/check_installed.py: the Dockerfile.nemo check that a --no-deps install of nemo-lpo is complete."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from tools.check_installed import PYPROJECT, import_problems, version_problems

REPO = Path(__file__).resolve().parents[1]


def test_this_environment_passes():
    assert version_problems(PYPROJECT) == []
    assert import_problems() == []


def test_a_version_outside_the_range_and_a_missing_package_are_named():
    def installed(name):
        if name == "transformers":
            return "5.99.0"
        if name == "omegaconf":
            raise importlib.metadata.PackageNotFoundError(name)
        return importlib.metadata.version(name)

    found = version_problems(PYPROJECT, installed)
    assert len(found) == 2, found
    assert found[0].startswith("omegaconf: not installed") or found[1].startswith("omegaconf: not installed"), found
    assert any(line.startswith("transformers: 5.99.0 installed, outside") for line in found), found


def test_a_module_that_does_not_import_is_named():
    assert import_problems(["nemo_lpo.no_such_module"]) == [
        "import nemo_lpo.no_such_module: ModuleNotFoundError: No module named 'nemo_lpo.no_such_module'"]


def test_dockerfile_nemo_installs_without_dependencies_and_runs_the_check():
    text = (REPO / "Dockerfile.nemo").read_text()
    assert "pip install --no-cache-dir --no-deps --no-build-isolation -e ." in text
    assert "python tools/check_installed.py" in text
    assert "pip install --no-cache-dir -c" not in text and "-r /opt" not in text  # no second resolution of the graph
