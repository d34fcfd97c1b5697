"""Helpers of the bench/ scripts: interleaved timing with medians, tables, synthetic lists, model building.

Benchmarks on a shared machine compare variants measured side by side in ONE run: every repetition
runs each variant once, in rotating order, after warm-up, and the medians are compared as ratios. Both
wall time and this process's CPU time are reported (CPU time is far less disturbed by other processes
on a busy machine; with one intra-op thread it is the compute the variant needed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

DATA_ENV = "NEMO_LPO_DATA"


def add_data_argument(parser: argparse.ArgumentParser) -> None:
    """``--data DIR``: a folder of real third-party samples (ultrafeedback_binarized/, alpacaeval2/, hh_rlhf/).

    Default: ``$NEMO_LPO_DATA``; benches fall back to generated or embedded data (or skip) without one.
    """
    default = os.environ.get(DATA_ENV)
    parser.add_argument("--data", type=Path, default=Path(default) if default else None,
                        help=f"folder of real samples (ultrafeedback_binarized/, alpacaeval2/; default ${DATA_ENV})")


def interleaved_medians(variants: dict[str, Callable[[], object]], reps: int = 5,
                        warmup: int = 1) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds of each variant, measured interleaved (rotating order per repetition).

    Args:
        variants: name -> zero-argument callable doing one unit of work (e.g. a forward+backward).
        reps: timed repetitions of every variant.
        warmup: untimed runs of every variant first.

    Returns:
        name -> {"wall": median wall seconds, "cpu": median process CPU seconds}.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            w0, c0 = time.perf_counter(), time.process_time()
            variants[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    return {name: {"wall": statistics.median(wall[name]), "cpu": statistics.median(cpu[name])} for name in names}


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """Print a Markdown table (floats with 3 significant digits) under a title."""
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(fmt(v) for v in row) + " |")


def synthetic_items(num_lists: int, k: int, prompt_len: int, response_len: int, seed: int = 0,
                    vocab: int = 32000, jitter: float = 0.25) -> list[dict]:
    """Lists shaped like dataset items: prompts of ~prompt_len, K responses of ~response_len (EOS = 2 last).

    Lengths vary by +-``jitter`` so that padding exists as in real batches.
    """
    rng = np.random.default_rng(seed)

    def length(mean: int) -> int:
        return max(1, int(rng.integers(int(mean * (1 - jitter)), int(mean * (1 + jitter)) + 1)))

    items = []
    for b in range(num_lists):
        prompt = rng.integers(3, vocab, length(prompt_len)).astype(np.int32)
        responses = []
        for _ in range(k):
            r = rng.integers(3, vocab, length(response_len)).astype(np.int32)
            r[-1] = 2
            responses.append(r)
        items.append({"prompt_ids": prompt, "response_ids": responses,
                      "rewards": rng.random(k).astype(np.float32), "ref_logps": None, "index": b})
    return items


def init_single_process(seed: int = 1234) -> None:
    """One-process megatron (gloo on CPU); one intra-op thread on CPU for stable timings."""
    from nemo_lpo.model.parallel import initialize_parallel

    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    initialize_parallel(seed=seed)


def bench_moe_preset():
    """``bench-moe``: tiny-mixtral's family with the layers, not the output layer, dominating the FLOPs.

    As in Mixtral-8x7B: 4 layers, hidden 128, 4 heads / 2 KV groups, 8 experts top-2, vocab 2048.
    """
    from nemo_lpo.model.presets import PRESETS

    return PRESETS["tiny-mixtral"].replace(name="bench-moe", num_layers=4, hidden_size=128, ffn_hidden_size=256,
                                           num_attention_heads=4, num_query_groups=2, vocab_size=2048,
                                           num_experts=8, moe_router_topk=2)


def build_model(preset, seed: int = 0, **config_kwargs):
    """The megatron GPTModel of ``preset`` (train mode; on the GPU when there is one)."""
    from nemo_lpo.model.build import build_gpt_model
    from nemo_lpo.model.presets import transformer_config

    torch.manual_seed(seed)
    model = build_gpt_model(preset, transformer_config(preset, **config_kwargs))
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def to_device(batch: dict, device: torch.device) -> dict:
    """Every tensor of ``batch`` on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Extra peak memory of one call of ``fn`` over what was resident before it.

    GPU: CUDA peak allocated. CPU (Linux): the process's peak resident set (``VmHWM``), reset through
    ``/proc/self/clear_refs`` first; glibc returns large tensor blocks to the OS, so it tracks tensors.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - base
