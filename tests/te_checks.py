"""GPU + Transformer Engine checks, run one per fresh process by tests/test_te.py (the suite hides the GPU).

CODE ONLY where this was written (no GPU, no Transformer Engine there): tools/container_check.sh executes it in
a user's NGC image. ``--smoke`` runs the same code on the CPU with megatron's local spec (no TE), which checks
the harness itself, not TE, and compares only what could differ there: ``te_vs_local`` compares the converted
checkpoint on the local spec with the HF original, ``layouts`` / ``bench`` the layouts with each other,
``kernels`` the bf16 reference kernel with the fp32 one; ``grouped_gemm`` and ``fp8`` report ``not_applicable``
(nothing on CPU could differ). tests/test_te_smoke.py runs every check in smoke mode in the CPU suite. Each check
prints one ``RESULT {json}`` line; tests/test_te.py asserts on it.

    python -m tests.te_checks NAME [--dtype fp32|bf16] [--backend flash|fused|unfused] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nemo_lpo.batch.collate import ListwiseCollator
from nemo_lpo.batch.layouts import PackedLayout, PaddedLayout, SharedPromptLayout
from nemo_lpo.batch.shared_prompt import collate_shared_prompt
from nemo_lpo.model.build import build_gpt_model
from nemo_lpo.model.presets import PRESETS, transformer_config
from tests.te_kernels import CPU_SIZES, reference_kernel_check, te_kernel_check
from tests.te_verdicts import BACKEND_SWITCHES
from tests.test_shared_prompt import PAD, make_items

LAYOUTS = ("padded", "packed", "shared")


def _device(smoke: bool) -> torch.device:
    return torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())


def _batches(items: list[dict], multiple: int, device) -> dict[str, dict]:
    batches = {"padded": ListwiseCollator(PAD, pad_to_multiple_of=multiple)(items),
               "packed": ListwiseCollator(PAD, pad_to_multiple_of=multiple, packed=True)(items),
               "shared": collate_shared_prompt(items, PAD, pad_to_multiple_of=multiple)}
    return {name: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for name, batch in batches.items()}


def _logps(model, layout: str, batch: dict, use_te: bool) -> torch.Tensor:
    """[B, K] log-probs of ``batch`` through the batch layouts (``te_varlen`` on TE's spec).

    TE: the causal padded path, THD packed rows, gathered shared rows; the local spec (``--smoke``): its paths.
    """
    layouts = {"padded": PaddedLayout, "packed": PackedLayout, "shared": SharedPromptLayout}
    return layouts[layout](te_varlen=use_te).logps(model, batch)


def _forward_backward(model, layout: str, batch: dict, use_te: bool):
    model.zero_grad(set_to_none=True)
    logps = _logps(model, layout, batch, use_te)
    weights = torch.linspace(-1.0, 1.0, logps.numel(), device=logps.device).view_as(logps)
    (logps * weights * batch["response_mask"]).sum().backward()
    grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
    return logps.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _model(preset, smoke: bool, dtype: str = "fp32", **config_kwargs):
    bf16 = dtype == "bf16"
    config = transformer_config(preset, params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
                                moe_aux_loss_coeff=0.0, **config_kwargs)
    model = build_gpt_model(preset, config, use_te=not smoke, te_gathered_attention=not smoke)
    return model.to(_device(smoke))


def te_vs_local(args) -> dict:
    """One converted checkpoint (tiny HF Mixtral -> megatron dist checkpoint) in TE's and the local spec."""
    from nemo_lpo.convert.hf_to_mcore import convert_hf_to_mcore
    from nemo_lpo.model.sidecar import read_checkpoint_preset
    from nemo_lpo.train.checkpoint import load_model_weights
    from tests.test_convert_roundtrip import make_hf_model

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_hf_model(Path(tmp) / "hf", "MixtralForCausalLM")
        convert_hf_to_mcore(hf, Path(tmp) / "ckpt")
        preset = read_checkpoint_preset(Path(tmp) / "ckpt")
        batch = _batches(make_items(seed=3, vocab=256), 8, _device(args.smoke))["padded"]
        if args.smoke:  # no TE spec here: the local spec against the HF original, which could differ
            return _local_vs_hf(hf, Path(tmp) / "ckpt", preset, batch)
        logps = {}
        for spec, use_te in (("local", False), ("te", True)):
            config = transformer_config(preset, moe_aux_loss_coeff=0.0)
            model = build_gpt_model(preset, config, use_te=use_te).to(_device(args.smoke)).eval()
            load_model_weights(model, Path(tmp) / "ckpt")
            with torch.no_grad():
                logps[spec] = _logps(model, "padded", batch, use_te)
    return {"rel_diff": _rel(logps["te"], logps["local"]), "responses": int(batch["response_mask"].sum())}


def _local_vs_hf(hf: Path, ckpt: Path, preset, batch: dict) -> dict:
    """Smoke: the converted checkpoint's logits on megatron's local spec vs the HF model's (fp32, CPU)."""
    from nemo_lpo.convert.verify import hf_logits, megatron_logits
    from nemo_lpo.train.checkpoint import load_model_weights

    model = build_gpt_model(preset, transformer_config(preset, moe_aux_loss_coeff=0.0), use_te=False).eval()
    load_model_weights(model, ckpt)
    tokens = batch["tokens"]
    with torch.no_grad():
        local, reference = megatron_logits(model, tokens), hf_logits(hf, tokens)
    return {"rel_diff": _rel(local, reference), "responses": int(batch["response_mask"].sum()),
            "compared": "local spec vs HF transformers (smoke: no TE)"}


def layouts(args) -> dict:
    """Packed (THD) and shared-prompt (gathered varlen) vs padded on TE: log-probs and parameter gradients."""
    torch.manual_seed(0)
    model = _model(PRESETS["tiny-mixtral"], args.smoke, args.dtype)
    batches = _batches(make_items(seed=5, ks=(3, 2, 4)), 16, _device(args.smoke))
    results = {name: _forward_backward(model, name, batches[name], not args.smoke) for name in LAYOUTS}
    logps, grads = results["padded"]
    out = {}
    for name in ("packed", "shared"):
        out[f"{name}_logps_rel"] = _rel(results[name][0], logps)
        out[f"{name}_grads_rel"] = _rel(results[name][1], grads)
        out[f"{name}_grads_cosine"] = _cosine(results[name][1], grads)
    return out


def grouped_gemm(args) -> dict:
    """TEGroupedMLP vs SequentialMLP experts from one checkpoint: log-probs and gradients."""
    from nemo_lpo.train.checkpoint import load_model_weights, save_model_weights

    if args.smoke:  # megatron's local spec has no grouped GEMM: both sides would be SequentialMLP, equal by design
        return {"not_applicable": "smoke: the local spec has no grouped GEMM (TEGroupedMLP needs TE)"}

    preset = PRESETS["tiny-mixtral"]
    batch = _batches(make_items(seed=7, ks=(3, 2)), 16, _device(args.smoke))["padded"]
    torch.manual_seed(0)
    sequential = _model(preset, args.smoke)
    with tempfile.TemporaryDirectory() as tmp:
        save_model_weights(sequential, Path(tmp) / "w")
        grouped = _model(preset, args.smoke, moe_grouped_gemm=not args.smoke)
        load_model_weights(grouped, Path(tmp) / "w")
    (a, ga), (b, gb) = (_forward_backward(m, "padded", batch, not args.smoke) for m in (grouped, sequential))
    kinds = sorted({type(m).__name__ for m in grouped.modules() if "MLP" in type(m).__name__})
    return {"logps_rel": _rel(a, b), "grads_rel": _rel(ga, gb), "grouped_modules": kinds}


def _long_items(k: int, prompt: int, response: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    responses = [rng.integers(3, vocab, int(response * rng.uniform(0.75, 1.25))) for _ in range(k)]
    return [{"prompt_ids": rng.integers(3, vocab, prompt), "response_ids": responses,
             "rewards": rng.random(k).astype(np.float32), "ref_logps": None, "index": 0}]


def bench(args) -> dict:
    """Step time (forward + backward) and peak memory of the three layouts on Mixtral-8x7B layer shapes."""
    preset = PRESETS["tiny-mixtral"] if args.smoke else dataclasses.replace(PRESETS["mixtral-8x7b"], num_layers=1)
    torch.manual_seed(0)
    model = _model(preset, args.smoke, "fp32" if args.smoke else "bf16", moe_grouped_gemm=not args.smoke)
    items = _long_items(args.k, args.prompt, args.response, preset.vocab_size)
    batches = _batches(items, 16, _device(args.smoke))
    out, reference = {}, None
    for name in LAYOUTS:
        batch = batches[name]
        if not args.smoke:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for rep in range(args.warmup + args.reps):
            start = time.perf_counter()
            logps, _ = _forward_backward(model, name, batch, not args.smoke)
            if not args.smoke:
                torch.cuda.synchronize()
            if rep >= args.warmup:
                times.append(time.perf_counter() - start)
        reference = logps if reference is None else reference
        out[name] = {"ms": 1000 * statistics.median(times), "tokens": int(batch["tokens"].numel()),
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if not args.smoke else None,
                     "logps_rel_vs_padded": _rel(logps, reference)}
    return out


def kernels(args) -> dict:
    """TE's varlen calls vs the fp32 reference kernel with one backend forced (tests/te_kernels.py)."""
    if args.smoke:
        return reference_kernel_check(CPU_SIZES)
    switches = {name: os.environ.get(name) for name in BACKEND_SWITCHES.values()}
    if switches[BACKEND_SWITCHES[args.backend]] != "1" or sum(v == "0" for v in switches.values()) != 2:
        raise SystemExit(f"kernels --backend {args.backend}: set TE's switches first (te_kernels.backend_env), got "
                         f"{switches}")
    return te_kernel_check(args.backend)


def fp8(args) -> dict:
    """FP8 (hybrid, delayed) vs bf16 from one set of weights on padded, packed and shared-prompt batches.

    FP8 must have run: TE's delayed-scaling state (amax history) changed in every layer's modules, and the
    log-probs differ from bf16 (by more than 0; reported per layout).
    """
    from nemo_lpo.train.checkpoint import load_model_weights, save_model_weights

    if args.smoke:
        return {"not_applicable": "smoke: FP8 needs Transformer Engine on a GPU"}
    preset = PRESETS["tiny-mixtral"]
    batches = _batches(make_items(seed=9, ks=(3, 2, 4)), 32, _device(False))
    torch.manual_seed(0)
    bf16 = _model(preset, False, "bf16")
    fp8_model = _model(preset, False, "bf16", fp8="hybrid", fp8_recipe="delayed")
    with tempfile.TemporaryDirectory() as tmp:
        save_model_weights(bf16, Path(tmp) / "w")
        load_model_weights(fp8_model, Path(tmp) / "w")
    before = fp8_scaling_state(fp8_model)
    out = {}
    for name in LAYOUTS:
        reference, _ = _forward_backward(bf16, name, batches[name], True)
        got, _ = _forward_backward(fp8_model, name, batches[name], True)
        out[f"{name}_logps_rel"] = _rel(got, reference)
    after = fp8_scaling_state(fp8_model)
    out["scaling_modules"], out["scaling_changed"] = len(after), len(fp8_state_changes(before, after))
    out["layers"] = preset.num_layers
    return out


def fp8_scaling_state(model) -> dict[str, float]:
    """Sum of |amax history| of TE's forward delayed-scaling state, per module that has one."""
    state = {}
    for name, module in model.named_modules():
        meta = getattr(module, "fp8_meta", None)
        if isinstance(meta, dict) and "scaling_fwd" in meta:
            state[name] = float(meta["scaling_fwd"].amax_history.float().abs().sum())
    return state


def fp8_state_changes(before: dict[str, float], after: dict[str, float]) -> list[str]:
    """Modules whose FP8 scaling state changed (absent before counts as zero); finite values only."""
    return [name for name, value in after.items() if np.isfinite(value) and value != before.get(name, 0.0)]


CHECKS = {"te_vs_local": te_vs_local, "layouts": layouts, "grouped_gemm": grouped_gemm, "bench": bench,
          "kernels": kernels, "fp8": fp8}


def main(argv: list[str] | None = None) -> int:
    """Run one check and print its ``RESULT`` line."""
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--backend", choices=sorted(BACKEND_SWITCHES), default="fused", help="kernels: TE backend")
    parser.add_argument("--smoke", action="store_true", help="CPU, local spec: the harness only, not TE")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--response", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    initialize_parallel(seed=1234)
    try:
        result = CHECKS[args.check](args)
    finally:
        destroy_parallel()
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
