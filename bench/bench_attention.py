"""Gathered vs dense core attention on shared-prompt and packed rows: forward+backward CPU time and peak memory.

The same lists, side by side in one run (interleaved medians; ratios):
  padded           ListwiseCollator: B*K rows [prompt, y_k], causal mask (the baseline every layout is compared to)
  packed dense     the B*K sequences in one row, megatron's dense block-diagonal [1, 1, S, S] mask (S² scores;
                   left out above MAX_DENSE_ROW tokens)
  packed gathered  the same row, GatheredDotProductAttention: every sequence attends to itself only
  shared dense     one row [prompt, y_1..y_K] per list, the dense shared-prompt mask (S² scores)
  shared gathered  the same row part by part: the prompt once, each response to [prompt | itself]

Model: ``bench-moe`` (4 layers, hidden 128, 8 experts top-2, vocab 2048: the layers dominate, as in
Mixtral-8x7B). Memory: the activations one forward keeps for the backward (every tensor autograd saves, each
storage once, parameters left out), the part that grows with the dense scores; the CPU's resident-set peak
cannot see it (freed blocks are reused). The log-probs of the gathered and dense paths are compared too (max
relative difference).

    .venv/bin/python bench/bench_attention.py [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PAD = 0
# The dense variants build [heads, S, S] scores per layer and keep them for the backward: above this row
# length they take minutes and gigabytes on CPU, and are left out (the point of the gathered path).
MAX_DENSE_ROW = 4096


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward during ``fn()`` (each storage once, no parameters)."""
    storages = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


def variants_for(model, items, device):
    """The forward+backward callable of each variant, its no-grad log-probs callable, and its batch shape."""
    from bench_utils import to_device

    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import PackedLayout, PaddedLayout, SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    batches = {"padded": to_device(ListwiseCollator(PAD)(items), device),
               "packed": to_device(ListwiseCollator(PAD, packed=True)(items), device),
               "shared": to_device(collate_shared_prompt(items, PAD, pad_to_multiple_of=8), device)}

    layouts = {"padded": PaddedLayout, "packed": PackedLayout, "shared": SharedPromptLayout}

    def run(layout: str, dense: bool, grad: bool = True):
        def fn():
            with torch.enable_grad() if grad else torch.no_grad():
                model.zero_grad(set_to_none=True)
                out = layouts[layout](dense_masks=dense).logps(model, batches[layout])
                if grad:
                    out.sum().backward()
                return out.detach()
        return fn

    steps = {"padded": run("padded", dense=True)}
    values = {"padded": run("padded", dense=True, grad=False)}
    for layout in ("packed", "shared"):
        for dense in (True, False):
            if dense and batches[layout]["tokens"].shape[1] > MAX_DENSE_ROW:
                continue
            name = f"{layout} {'dense' if dense else 'gathered'}"
            steps[name] = run(layout, dense)
            values[name] = run(layout, dense, grad=False)
    rows = {name: batches[name.split()[0]]["tokens"].shape for name in steps}
    return steps, values, rows


def main() -> int:
    """Run the grid and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="two small points (smoke run)")
    args = parser.parse_args()

    from bench_utils import (
        bench_moe_preset,
        build_model,
        init_single_process,
        interleaved_medians,
        print_table,
        synthetic_items,
    )

    init_single_process()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    preset = bench_moe_preset()
    model = build_model(preset)
    grid = [(4, 64, 64), (8, 256, 128)] if args.quick else [(4, 128, 128), (4, 512, 128), (8, 512, 128),
                                                            (8, 1024, 256), (8, 128, "1024 + 7x32")]
    rows = []
    for k, prompt_len, response_len in grid:
        if isinstance(response_len, str):  # one long response and short others: parts of very different lengths
            items = synthetic_items(1, k, prompt_len, 32, seed=7, vocab=preset.vocab_size, jitter=0.0)
            items[0]["response_ids"][0] = synthetic_items(1, 1, 1, 1024, seed=8, vocab=preset.vocab_size,
                                                          jitter=0.0)[0]["response_ids"][0]
        else:
            items = synthetic_items(1, k, prompt_len, response_len, seed=k * 1000 + prompt_len,
                                    vocab=preset.vocab_size)
        steps, values, shapes = variants_for(model, items, device)
        med = interleaved_medians(steps, reps=args.reps, warmup=1)
        saved = {name: saved_activation_bytes(fn) / 2**20 for name, fn in steps.items()}
        diffs = {}
        for layout in ("packed", "shared"):
            if f"{layout} dense" not in values:
                continue
            dense, gathered = values[f"{layout} dense"](), values[f"{layout} gathered"]()
            diffs[layout] = ((dense - gathered).abs().max() / dense.abs().max()).item()
        base = med["padded"]["cpu"]
        for name in steps:
            layout = name.split()[0]
            rows.append([k, prompt_len, response_len, name, "x".join(map(str, shapes[name])),
                         1000 * med[name]["cpu"], base / med[name]["cpu"], saved[name],
                         saved[name] / saved["padded"],
                         f"{diffs[layout]:.1e}" if layout in diffs else ""])
        print(f"  done K={k} Lp={prompt_len} Lr={response_len}", file=sys.stderr, flush=True)
    print_table("bench-moe (4 layers, hidden 128, 4 heads / 2 KV groups, 8 experts top-2, vocab 2048), 1 list, "
                "forward+backward", ["K", "prompt", "resp", "variant", "tokens", "cpu ms", "speed-up vs padded",
                                     "saved activations MiB", "vs padded", "max rel |dlogp| dense vs gathered"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
