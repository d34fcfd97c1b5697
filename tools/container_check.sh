#!/usr/bin/env bash
# The self-check a user runs in their own NGC image (or any machine), from the repository root:
#   bash tools/container_check.sh            (OUT=folder for the logs and the JUnit report; default a temp dir)
# It runs the GPU tests (`pytest -m gpu`, tests/test_gpu.py) and the Transformer Engine tests (`pytest -m te`,
# tests/test_te.py), prints ONE table (check, status, seconds, numbers or skip reason) and exits non-zero when
# a check fails. On a machine whose `nvidia-smi -L` lists a GPU every check must run: a skipped one (TE does not
# import, CUDA does not work) is a FAILURE with its reason. Only on a machine without a GPU is every item
# reported skipped, with its reason, and it exits 0.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$(mktemp -d -t container_check.XXXXXX)}
mkdir -p "$OUT"
if [[ -z ${PYTHON:-} ]]; then  # the image's python3, or a development checkout's virtual environment
    PYTHON=python3
    [[ -x .venv/bin/python ]] && PYTHON=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1

echo "== environment"
gpu_listed=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    gpu_listed=(--gpu-listed)
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "no NVIDIA GPU (nvidia-smi -L): every GPU / TE item is skipped"
fi
"$PYTHON" - <<'PY'
import importlib.metadata as md
import sys

import torch

print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
for name in ("megatron-core", "transformer-engine", "transformer_engine"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        pass
PY

echo "== pytest -m 'gpu or te' (log: $OUT/pytest.log)"
"$PYTHON" -m pytest tests/test_gpu.py tests/test_te.py -m "gpu or te" -q -rA -p no:cacheprovider \
    -o junit_family=legacy --junitxml="$OUT/report.xml" >"$OUT/pytest.log" 2>&1
pytest_rc=$?
"$PYTHON" tools/container_report.py "$OUT/report.xml" --pytest-rc "$pytest_rc" "${gpu_listed[@]}"
