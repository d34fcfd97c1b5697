"""Each CPU-compat patch is necessary: the megatron call fails without that one patch and works with all.

One subprocess imports megatron once and forks a child per run (tests/dist/model_cpu_compat_probe.py),
so the whole module costs one megatron import plus about a second per run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_lpo.model import cpu_compat

PROBE = Path(__file__).parent / "dist" / "model_cpu_compat_probe.py"

SCENARIOS = ["forward", "forward_default_mask", "train_step", "train_step_dense", "bf16_optimizer",
             "bf16_distributed_optimizer", "norm_sequence_parallel", "alltoall_split_sizes", "recompute", "noop_with_cuda", "idempotent"]

# (scenario, excluded patch, text expected in the failure: the megatron site that assumes CUDA)
WITHOUT = [
    ("forward", "cuda_device_queries", "rotary_pos_embedding.py"),
    ("forward", "rng_tracker", "model_parallel_cuda_manual_seed"),
    ("forward", "moe_alltoall_stream", "token_dispatcher.py"),
    ("forward", "cuda_current_stream", "_maybe_dtoh_and_synchronize"),
    ("forward_default_mask", "cuda_literal_factories", "get_default_causal_mask"),
    ("train_step_dense", "cuda_current_stream", "param_and_grad_buffer.py"),
    ("train_step", "clip_grads_type_check", "clip_grad_by_total_norm_fp32"),
    ("bf16_optimizer", "optimizer_param_type", "must be one of torch.cuda.FloatTensor"),
    ("bf16_distributed_optimizer", "optimizer_param_type", "must be one of torch.cuda.FloatTensor"),
    ("norm_sequence_parallel", "torch_norm_sequence_parallel", "sequence parallel not supported"),
    ("alltoall_split_sizes", "moe_alltoall_split_sizes", "all_to_all_single(): incompatible function arguments"),
]


@pytest.fixture(scope="module")
def probe_results() -> dict[str, dict]:
    specs = [f"{s}:" for s in SCENARIOS] + [f"{s}:{patch}" for s, patch, _ in WITHOUT]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(PROBE), *specs], capture_output=True, text=True, env=env, timeout=600)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            results[record["run"]] = record
    assert len(results) == len(specs), f"probe produced {len(results)}/{len(specs)} results:\n{proc.stderr[-4000:]}"
    return results


def test_every_patch_is_exercised():
    assert {patch for _, patch, _ in WITHOUT} == set(cpu_compat.PATCHES)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_scenario_works_with_all_patches(probe_results, scenario):
    record = probe_results[f"{scenario}:"]
    assert record["ok"], record["error"]


@pytest.mark.parametrize(("scenario", "patch", "site"), WITHOUT, ids=[f"{p}-{s}" for s, p, _ in WITHOUT])
def test_scenario_fails_without_patch(probe_results, scenario, patch, site):
    record = probe_results[f"{scenario}:{patch}"]
    assert not record["ok"], f"{scenario} ran without patch {patch}: the patch is not needed there"
    assert site in record["error"], record["error"]


def test_unknown_patch_name_is_rejected(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)
    monkeypatch.setattr(cpu_compat.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="unknown cpu-compat patches"):
        cpu_compat.apply_cpu_compat(exclude=["no_such_patch"])
