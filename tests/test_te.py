"""Transformer Engine on a CUDA device: the production path of an NGC image (``pytest -m te``).

CODE ONLY where these were written: that machine had no GPU and no Transformer Engine, so every test here
skipped there with its reason; ``tools/container_check.sh`` runs them in a user's image and prints one table.
Each check runs in a fresh process with the GPU visible (``tests/te_checks.py``; the suite hides the GPU from
itself, tests/conftest.py). What they hold, with the tolerances stated:

- TE's layer spec and the local spec give the same log-probs from one converted checkpoint (fp32, 1e-3
  relative: TE may run fp32 GEMMs in TF32);
- packed batches (megatron's THD path with ``packed_seq_params``) and shared-prompt rows (the K/V-gathered
  varlen core attention) give the padded batch's log-probs and parameter gradients on TE: fp32 1e-4 / 1e-3
  relative; bf16 3e-2 relative log-probs and gradient cosine >= 0.99;
- FP8 (hybrid, delayed scaling) training tracks bf16 over 20 steps of the real trainer: every step's loss within
  5% relative, both finite;
- grouped-GEMM experts (TEGroupedMLP) equal sequential experts from one checkpoint (fp32, 1e-4 / 1e-3);
- the three layouts' step time and peak memory on Mixtral-8x7B layer shapes (1 layer, bf16, K=4, prompt 256,
  responses ~256): reported, not asserted, beside their log-prob agreement (3e-2 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import cache

import numpy as np
import pytest

from tests.conftest import GPU_PRESENT, cuda_failure, gpu_env
from tests.dist.train_common import DEMO_LISTS, REPO, TINY_CONF, metrics_lines, pack_lists


def _env() -> dict:
    env = gpu_env(dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    env.pop("RANK", None)
    return env


@cache
def te_import_failure() -> str | None:
    """Why Transformer Engine does not import with the GPU visible (asked in a fresh process); None: it does."""
    probe = subprocess.run([sys.executable, "-c", "import transformer_engine.pytorch"], capture_output=True,
                           text=True, env=_env(), timeout=300)
    lines = (probe.stdout + probe.stderr).strip().splitlines()
    return None if probe.returncode == 0 else (lines[-1] if lines else f"exit status {probe.returncode}")


def _not_runnable() -> str | None:
    """The skip reason on this machine. On a GPU machine tools/container_report.py reports a skip as a FAILURE."""
    if not GPU_PRESENT:
        return "needs an NVIDIA GPU (nvidia-smi -L)"
    if cuda_failure() is not None:
        return f"CUDA does not work with the GPU visible: {cuda_failure()}"
    if te_import_failure() is not None:
        return f"Transformer Engine does not import in this image: {te_import_failure()}"
    return None


pytestmark = [pytest.mark.te, pytest.mark.skipif(_not_runnable() is not None, reason=str(_not_runnable()))]


def run_check(name: str, *args: str) -> dict:
    """``python -m tests.te_checks NAME ARGS`` on the GPU; its RESULT dict."""
    proc = subprocess.run([sys.executable, "-m", "tests.te_checks", name, *args], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"te check {name} failed (rc {proc.returncode}):\n{out[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"te check {name} printed no RESULT line:\n{out[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_te_spec_matches_local_spec_from_one_converted_checkpoint(record_property):
    result = run_check("te_vs_local")
    record_property("detail", f"max rel diff {result['rel_diff']:.1e} over {result['responses']} responses (tol 1e-3)")
    assert result["rel_diff"] < 1e-3


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_te_packed_and_shared_prompt_match_padded(record_property, dtype):
    r = run_check("layouts", "--dtype", dtype)
    record_property("detail", ", ".join(f"{key} {value:.1e}" for key, value in r.items()))
    for name in ("packed", "shared"):
        if dtype == "fp32":
            assert r[f"{name}_logps_rel"] < 1e-4 and r[f"{name}_grads_rel"] < 1e-3
        else:
            assert r[f"{name}_logps_rel"] < 3e-2 and r[f"{name}_grads_cosine"] > 0.99


def test_te_fp8_hybrid_tracks_bf16_over_20_steps(tmp_path, record_property):
    prefix = pack_lists(DEMO_LISTS, tmp_path / "data" / "lists", 16)
    losses = {}
    for name, extra in (("bf16", []), ("fp8", ["model.fp8=hybrid", "model.fp8_recipe=delayed"])):
        run = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "nemo_lpo.cli", "train", str(TINY_CONF), f"data.train_prefix={prefix}",
             f"logging.run_dir={run}", "model.params_dtype=bf16", "reference.mode=online", "train.max_steps=20",
             "optim.lr=2e-3", "data.global_batch_size=4", "data.micro_batch_size=4", "data.pad_to_multiple_of=16",
             "data.shuffle=false", "logging.tensorboard=false", "checkpoint.save_interval=null",
             "checkpoint.save_at_end=false", *extra], capture_output=True, text=True, env=_env(), timeout=900)
        assert proc.returncode == 0, f"{name} training failed:\n{(proc.stdout + proc.stderr)[-6000:]}"
        losses[name] = np.array([line["loss"] for line in metrics_lines(run / "metrics.jsonl")])
    rel = np.abs(losses["fp8"] - losses["bf16"]) / np.abs(losses["bf16"])
    record_property("detail", f"loss bf16 {losses['bf16'][0]:.4f}->{losses['bf16'][-1]:.4f}, fp8 "
                              f"{losses['fp8'][0]:.4f}->{losses['fp8'][-1]:.4f}, max rel diff {rel.max():.1e} (tol 5e-2)")
    assert len(losses["fp8"]) == len(losses["bf16"]) == 20
    assert np.isfinite(losses["fp8"]).all() and np.isfinite(losses["bf16"]).all()
    assert rel.max() < 5e-2


def test_te_grouped_gemm_matches_sequential_experts(record_property):
    r = run_check("grouped_gemm")
    record_property("detail", f"logps {r['logps_rel']:.1e}, grads {r['grads_rel']:.1e} (tol 1e-4 / 1e-3), "
                              f"experts {r['grouped_modules']}")
    assert "TEGroupedMLP" in r["grouped_modules"]
    assert r["logps_rel"] < 1e-4 and r["grads_rel"] < 1e-3


def test_te_layouts_step_time_and_memory_on_mixtral_layer_shapes(record_property):
    r = run_check("bench")
    record_property("detail", "; ".join(
        f"{name} {v['ms']:.1f} ms, {v['peak_gib']:.1f} GiB, {v['tokens']} slots, dlogp {v['logps_rel_vs_padded']:.1e}"
        for name, v in r.items()))
    for name in ("packed", "shared"):
        assert r[name]["logps_rel_vs_padded"] < 3e-2
