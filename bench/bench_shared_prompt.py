"""Shared-prompt packing vs the unpacked batches: forward+backward time against K and prompt length.

Three layouts of the same lists, measured interleaved in one run (medians, ratios):
  padded  ListwiseCollator: B*K rows [prompt, y_k], right-padded (every prompt computed K times)
  packed  ListwiseCollator(packed=True): the B*K sequences back to back, no padding (prompts still K times)
  shared  collate_shared_prompt: one row [prompt, y_1, ..., y_K] per list (every prompt computed once)

Model: ``bench-moe`` (tiny-mixtral's family: 4 layers, hidden 128, 8 experts top-2) with a 2048-token
vocabulary, so that the transformer layers, not the output layer, dominate the FLOPs as in Mixtral-8x7B
(where the output layer is ~1% of them); then the real ``tiny-mixtral`` (vocab 32000) at one point.
On a CPU shared with other jobs, the CPU-time ratios are the reliable ones (one intra-op thread).

    .venv/bin/python bench/bench_shared_prompt.py [--reps 3] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PAD = 0
# The packed layout puts the prompt K times into one row; beyond this it is left out (it was quadratic in the
# row length on megatron's dense local attention, before the gathered core attention; kept for comparability).
MAX_PACKED_ROW = 2048


def variants_for(model, items, device):
    """Map each layout name to (callable doing one forward+backward, tokens in the batch, real tokens computed)."""
    from bench_utils import to_device

    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import SharedPromptLayout, sequence_layout_of
    from nemo_lpo.batch.logps import sequence_logps
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    padded = to_device(ListwiseCollator(PAD)(items), device)
    packed = to_device(ListwiseCollator(PAD, packed=True)(items), device)
    shared = to_device(collate_shared_prompt(items, PAD), device)

    def unpacked_step(batch):
        model.zero_grad(set_to_none=True)
        sequence_logps(sequence_layout_of(batch).token_logps(model, batch), batch).sum().backward()

    def shared_step():
        model.zero_grad(set_to_none=True)
        SharedPromptLayout().logps(model, shared).sum().backward()

    real_unpacked = int(padded["seq_lengths"].sum())
    out = {
        "padded": (lambda: unpacked_step(padded), padded["tokens"].numel(), real_unpacked),
        "shared": (shared_step, shared["tokens"].numel(), int(shared["row_lengths"].sum())),
    }
    if packed["tokens"].shape[1] <= MAX_PACKED_ROW:
        out["packed"] = (lambda: unpacked_step(packed), packed["tokens"].numel(), real_unpacked)
    return out


def check_parity(model, items, device) -> float:
    """Max |shared - padded| sequence log-prob difference, relative to the largest |log-prob| (no grad)."""
    from bench_utils import to_device

    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import SharedPromptLayout, sequence_layout_of
    from nemo_lpo.batch.logps import sequence_logps
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    padded = to_device(ListwiseCollator(PAD)(items), device)
    with torch.no_grad():
        a = sequence_logps(sequence_layout_of(padded).token_logps(model, padded), padded)
        b = SharedPromptLayout().logps(model, to_device(collate_shared_prompt(items, PAD), device))
    return ((a - b).abs().max() / a.abs().max()).item()


def sweep(model, vocab, grid, num_lists, response_len, reps, device, title):
    """Time every (K, prompt length) point of ``grid`` and print one table."""
    from bench_utils import interleaved_medians, print_table, synthetic_items

    rows = []
    for k, prompt_len in grid:
        items = synthetic_items(num_lists, k, prompt_len, response_len, seed=k * 1000 + prompt_len,
                                vocab=vocab)
        vs = variants_for(model, items, device)
        med = interleaved_medians({name: v[0] for name, v in vs.items()}, reps=reps, warmup=1)
        parity = check_parity(model, items, device)
        tok = {name: v[2] for name, v in vs.items()}
        packed_cpu = med["packed"]["cpu"] / med["shared"]["cpu"] if "packed" in med else "- (row too long)"
        rows.append([k, prompt_len, response_len, vs["padded"][1], tok["padded"], tok["shared"],
                     tok["padded"] / tok["shared"],
                     med["padded"]["cpu"] / med["shared"]["cpu"], med["padded"]["wall"] / med["shared"]["wall"],
                     packed_cpu, 1000 * med["shared"]["cpu"], f"{parity:.1e}"])
        print(f"  done K={k} Lp={prompt_len}", file=sys.stderr, flush=True)
    print_table(title, ["K", "prompt", "resp", "padded slots", "unpacked tok", "shared tok", "tok ratio",
                        "cpu padded/shared", "wall padded/shared", "cpu packed/shared", "shared ms (cpu)",
                        "max rel |dlogp|"], rows)


def main() -> int:
    """Run the sweep and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--lists", type=int, default=1, help="lists per micro-batch")
    parser.add_argument("--response-len", type=int, default=48)
    parser.add_argument("--quick", action="store_true", help="a 2x2 grid (smoke run)")
    args = parser.parse_args()

    from bench_utils import bench_moe_preset, build_model, init_single_process

    from nemo_lpo.model.presets import PRESETS

    init_single_process()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    bench_moe = bench_moe_preset()
    ks, prompts = ((2, 8), (32, 512)) if args.quick else ((2, 4, 8), (32, 128, 512))
    grid = [(k, p) for k in ks for p in prompts]
    model = build_model(bench_moe)
    sweep(model, bench_moe.vocab_size, grid, args.lists, args.response_len, args.reps, device,
          f"bench-moe (4 layers, hidden 128, 8 experts top-2, vocab 2048), {args.lists} lists/micro-batch, "
          f"forward+backward")
    del model
    tiny = build_model(PRESETS["tiny-mixtral"])
    sweep(tiny, 32000, [(4, 128), (8, 256)], args.lists, args.response_len, args.reps, device,
          "tiny-mixtral (2 layers, hidden 64, vocab 32000: the output layer dominates), forward+backward")
    print("\ntok ratio = real tokens unpacked / shared (the prompt is computed once instead of K times);"
          " padded slots include padding. Shared and packed rows are attended part by part (the local spec's "
          "GatheredDotProductAttention; bench_attention.py compares it with megatron's dense mask).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
