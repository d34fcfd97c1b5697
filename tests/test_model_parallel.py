"""Per-response log-probs under TP=2 + sequence parallel, EP=2 (alltoall) and PP=2 equal the single-process ones.

The single-process run saves a megatron dist checkpoint; each layout loads it (megatron reshards), so the
weights are the same by construction. Under TP2+SP the RMSNorm weight gradients (partial per sequence shard)
must also match after ``finalize_model_grads``, which is what the sequence-parallel tag of the CPU layer buys.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.torchrun import run_torchrun

WORKER = Path(__file__).parent / "dist" / "model_parity.py"
TOL = 1e-5
LAYOUTS = ["tp2sp", "ep2", "pp2"]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model_parity")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(WORKER), "save", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def layouts_log(reference_dir) -> str:
    """One 2-process launch checks every layout in turn (a launch costs ~20 s of start-up on 2 cores)."""
    return run_torchrun(WORKER, 2, "check", str(reference_dir), *LAYOUTS)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_reproduces_single_process_logps(layouts_log, layout):
    log = layouts_log
    parity = {m[0]: float(m[1]) for m in re.findall(rf"PARITY {layout} (\w+) (\S+)", log)}
    assert set(parity) == {"padded", "packed"}, log[-3000:]
    assert max(parity.values()) < TOL, parity
    grads = re.findall(rf"GRAD {layout} (\w+) (\S+) (\S+)", log)
    if layout != "pp2":
        assert len(grads) == 2, log[-3000:]
        for _, diff, scale in grads:
            assert float(scale) > 1e-3  # the compared gradients are not trivially zero
            assert float(diff) < TOL * max(1.0, float(scale)), grads
