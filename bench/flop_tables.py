"""FLOP model of one preference-optimisation step per list, for docs/performance.md.

The FLOP model is the trainer's (``nemo_lpo.train.flops``): 2 FLOPs per multiply-add over the ACTIVE parameters
(for MoE: top-k experts), the output layer once, causal attention as 4·h FLOPs per attended (query, key) pair
per layer (QK^T and AV), backward = 2 x forward. No recompute.

Layouts of a list (prompt of ``Lp`` tokens, K responses of ``Lr``):
  unpacked  K sequences [prompt, y_k]: K·(Lp + Lr) tokens, K causal triangles of (Lp + Lr)
  shared    one row [prompt, y_1..y_K] with a block-sparse kernel: Lp + K·Lr tokens; attended pairs = the
            prompt's triangle + for every response its prompt block and its own triangle

    .venv/bin/python bench/flop_tables.py   # prints the tables of docs/performance.md
"""

from __future__ import annotations

from dataclasses import dataclass

from nemo_lpo.model.presets import PRESETS
from nemo_lpo.train.flops import active_linear_flops_per_token, forward_flops

H100_MEGATRON_MIXTRAL_TFLOPS = 468.0  # Megatron-core, Mixtral-8x7B pre-training, BF16, TP1 EP8 PP4 VP8


@dataclass(frozen=True)
class ListShape:
    """One list: prompt length, K, response length (tokens, EOS included)."""

    prompt_len: int
    k: int
    response_len: int


def _triangle(n: int) -> int:
    return n * (n + 1) // 2


def list_forward_flops(preset, shape: ListShape, layout: str) -> float:
    """Forward FLOPs of all K responses of one list under ``layout`` (``unpacked`` or ``shared``)."""
    lp, k, lr = shape.prompt_len, shape.k, shape.response_len
    if layout == "unpacked":
        tokens, pairs = k * (lp + lr), k * _triangle(lp + lr)
    elif layout == "shared":
        tokens, pairs = lp + k * lr, _triangle(lp) + k * (lr * lp + _triangle(lr))
    else:
        raise ValueError(f"layout must be 'unpacked' or 'shared', got {layout!r}")
    return forward_flops(preset, tokens, pairs)


def method_flops(preset, shape: ListShape) -> dict[str, float]:
    """Step FLOPs per list (policy forward+backward = 3 forwards, online reference = 1 forward) per method.

    DPO (Zephyr) trains one pair per list; DPO-1vs0 K-1 pairs; DPO-pw all K(K-1)/2 pairs (no ties). A pair
    is two unpacked sequences, as in TRL's DPOTrainer.
    """
    pair = ListShape(shape.prompt_len, 2, shape.response_len)
    f_list = {lay: list_forward_flops(preset, shape, lay) for lay in ("unpacked", "shared")}
    f_pair = list_forward_flops(preset, pair, "unpacked")
    k = shape.k
    return {
        "LPO, precomputed ref, shared-prompt": 3 * f_list["shared"],
        "LPO, precomputed ref, unpacked": 3 * f_list["unpacked"],
        "LPO, online ref, unpacked": 4 * f_list["unpacked"],
        "DPO (Zephyr pair), online ref": 4 * f_pair,
        "DPO-1vs0, online ref": 4 * (k - 1) * f_pair,
        "DPO-pw, online ref": 4 * (k * (k - 1) // 2) * f_pair,
    }


def main() -> None:
    """Print the Mixtral-8x7B tables used in docs/performance.md."""
    preset = PRESETS["mixtral-8x7b"]
    print(f"mixtral-8x7b: active linear forward FLOPs per token = "
          f"{active_linear_flops_per_token(preset) / 1e9:.2f} GFLOP")
    for shape in (ListShape(256, 4, 256), ListShape(512, 4, 256), ListShape(1024, 4, 256)):
        flops = method_flops(preset, shape)
        base = flops["LPO, precomputed ref, unpacked"]
        print(f"\n### K={shape.k}, prompt {shape.prompt_len}, responses {shape.response_len} tokens\n")
        print("| method | TFLOP per list | vs LPO precomputed unpacked | H100-seconds per list at 468 TFLOP/s |")
        print("|---|---|---|---|")
        for name, value in flops.items():
            print(f"| {name} | {value / 1e12:.1f} | {value / base:.2f} | "
                  f"{value / (H100_MEGATRON_MIXTRAL_TFLOPS * 1e12):.3f} |")


if __name__ == "__main__":
    main()
