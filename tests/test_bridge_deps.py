"""pyproject.toml's dependency ranges install into the NeMo 26.08 image's stack and into the tested set.

pip's own resolver (``--dry-run --ignore-installed``, nothing installed) resolves nemo-lpo under the versions
of the NGC NeMo Framework 26.08 image that nemo-lpo must not replace (megatron-core 0.19.0, transformers
5.12.1 as its Megatron-Bridge 0.6 requires) and under constraints.txt (the exact tested set); a conflict fails
the test. Needs the package index (PyPI); skipped with the reason when it is unreachable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The image's versions nemo-lpo must keep. torch: the tested one (the image's own NGC build is a local version
# of the same minor that PyPI does not serve; Dockerfile.nemo freezes the real one at build time).
NEMO_2608 = ["megatron-core==0.19.0", "transformers==5.12.1", "torch==2.14.1"]


def index_reachable() -> str | None:
    try:
        urllib.request.urlopen("https://pypi.org/simple/megatron-core/", timeout=10).close()
    except OSError as err:
        return f"PyPI unreachable: {err}"
    return None


UNREACHABLE = index_reachable()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(UNREACHABLE is not None, reason=str(UNREACHABLE))]


def resolve(constraints: Path, tmp_path: Path) -> dict[str, str]:
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--disable-pip-version-check", "--report", str(report), "-c", str(constraints), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"pip could not resolve nemo-lpo under {constraints}:\n{proc.stderr[-4000:]}"
    items = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in items}


def test_ranges_admit_the_nemo_2608_stack(tmp_path):
    constraints = tmp_path / "nemo-26.08.txt"
    constraints.write_text("\n".join(NEMO_2608) + "\n")
    got = resolve(constraints, tmp_path)
    for pin in NEMO_2608:
        name, version = pin.split("==")
        assert got[name] == version, (name, got.get(name))


def test_constraints_give_the_tested_set(tmp_path):
    got = resolve(REPO / "constraints.txt", tmp_path)
    pins = dict(line.strip().split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    for name in ("torch", "megatron-core", "transformers", "tokenizers", "numpy", "datasets"):
        assert got[name] == pins[name], (name, got[name], pins[name])
    assert all(pins.get(name, version) == version for name, version in got.items() if name != "nemo-lpo")
