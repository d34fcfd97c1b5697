"""Padded vs packed vs shared-prompt batches on the REAL lengths of real samples (--data): useful tokens and step time.

Each dataset is packed with the real Mistral tokenizer (``nemo_lpo.data.pack``, max_length 2048, long
responses truncated) into a temporary directory, then read back through ``ListwiseDataset`` and the
trainer's sampler order. For every micro-batch the real collators give:

  padded   ListwiseCollator: N = B*K rows of T (pad to a multiple of 8)
  packed   ListwiseCollator(packed=True): one row of all sequences (prompts K times), S rounded to 8
  shared   collate_shared_prompt: one row per list [prompt, y_1..y_K] (each prompt once), rounded to 8

useful fraction = real tokens of the unpacked sequences / tensor slots the layout computes; "slots vs
padded" = the layout's slots / the padded slots (what a token-linear model pays, relative). Step time is
forward+backward of a small MoE on a few sampled micro-batches, interleaved (medians, CPU-time ratios);
token ids are folded into its 2048-token vocabulary (lengths, not ids, set the cost).

    .venv/bin/python bench/bench_padding.py [--reps 2] [--timed-batches 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from bench_utils import DATA_ENV, add_data_argument  # noqa: E402

DATASETS = {  # name: (file, lists per micro-batch in the timed part)
    "alpacaeval2 (K=8)": ("alpacaeval2/alpacaeval2_gpt4turbo_k8_a.jsonl", 1),
    "ultrafeedback_binarized (K=2)": ("ultrafeedback_binarized/train_clean.jsonl", 2),
    "hh_rlhf harmless (K=2)": ("hh_rlhf/harmless-base_test.jsonl.gz", 4),
}
MULTIPLE = 8
MAX_DENSE_ROW = 4096  # megatron's local attention is dense over a row: skip longer packed rows in the timing


def pack_dataset(src: Path, prefix: Path) -> None:
    """Tokenise + pack one real file (skipped records are counted in its manifest)."""
    from nemo_lpo.data.pack import PackConfig, pack
    from nemo_lpo.data.transforms import LengthLimits

    pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix), skip_invalid=True,
                    limits=LengthLimits(max_length=2048, overflow="truncate_response")), log=lambda m: None)


def microbatches(ds, micro_batch_size: int, seed: int = 1234):
    """One epoch of micro-batches in the trainer's sampler order."""
    from nemo_lpo.data import ListwiseSampler

    gbs = micro_batch_size * max(1, min(8, len(ds) // micro_batch_size))
    sampler = ListwiseSampler(len(ds), gbs, micro_batch_size, 0, 1, seed, shuffle=True, num_epochs=1)
    for indices in sampler:
        yield [ds[i] for i in indices]


def accounting(ds, micro_batch_size: int) -> dict[str, float]:
    """Token slots of the three layouts summed over one epoch."""
    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    padded_c, packed_c = ListwiseCollator(ds.pad_id, MULTIPLE), ListwiseCollator(ds.pad_id, MULTIPLE, packed=True)
    totals = dict(real=0, shared_real=0, padded=0, packed=0, shared=0)
    for items in microbatches(ds, micro_batch_size):
        padded = padded_c(items)
        totals["real"] += int(padded["seq_lengths"].sum())
        totals["padded"] += padded["tokens"].numel()
        totals["packed"] += packed_c(items)["tokens"].numel()
        shared = collate_shared_prompt(items, ds.pad_id, MULTIPLE)
        totals["shared"] += shared["tokens"].numel()
        totals["shared_real"] += int(shared["row_lengths"].sum())
    return totals


def fold(items: list[dict], vocab: int) -> list[dict]:
    """Token ids folded into ``vocab`` (ids >= 3 stay >= 3); lengths unchanged."""
    def f(ids):
        ids = np.asarray(ids, dtype=np.int64)
        return np.where(ids < 3, ids, 3 + ids % (vocab - 3))

    return [{**it, "prompt_ids": f(it["prompt_ids"]), "response_ids": [f(r) for r in it["response_ids"]]}
            for it in items]


def step_times(model, ds, micro_batch_size: int, timed: int, reps: int, vocab: int) -> dict[str, float]:
    """Median CPU seconds of forward+backward over ``timed`` sampled micro-batches, per layout."""
    from bench_utils import interleaved_medians

    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import SharedPromptLayout, sequence_layout_of
    from nemo_lpo.batch.logps import sequence_logps
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt

    rng = np.random.default_rng(0)
    chosen = rng.choice(len(ds), size=timed * micro_batch_size, replace=False)
    groups = [fold([ds[int(i)] for i in chosen[g::timed]], vocab) for g in range(timed)]
    batches = {"padded": [ListwiseCollator(ds.pad_id, MULTIPLE)(g) for g in groups],
               "packed": [ListwiseCollator(ds.pad_id, MULTIPLE, packed=True)(g) for g in groups],
               "shared": [collate_shared_prompt(g, ds.pad_id, MULTIPLE) for g in groups]}
    if max(b["tokens"].shape[1] for b in batches["packed"]) > MAX_DENSE_ROW:
        del batches["packed"]

    def run(name):
        def go():
            for batch in batches[name]:
                model.zero_grad(set_to_none=True)
                if name == "shared":
                    logps = SharedPromptLayout().logps(model, batch)
                else:
                    logps = sequence_logps(sequence_layout_of(batch).token_logps(model, batch), batch)
                logps.sum().backward()
        return go

    med = interleaved_medians({name: run(name) for name in batches}, reps=reps, warmup=1)
    return {name: m["cpu"] for name, m in med.items()}


def main() -> int:
    """Pack the real data, print the token accounting and the step-time table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--timed-batches", type=int, default=2)
    parser.add_argument("--no-timing", action="store_true")
    add_data_argument(parser)
    args = parser.parse_args()
    if args.data is None or not args.data.is_dir():
        print(f"SKIP: no folder of real samples (--data DIR or ${DATA_ENV}): {args.data}")
        return 0

    from bench_utils import bench_moe_preset, build_model, init_single_process, print_table

    from nemo_lpo.data import ListwiseDataset

    rows, time_rows, datasets = [], [], {}
    with tempfile.TemporaryDirectory(prefix="bench_padding_") as tmp:
        for name, (rel, _) in DATASETS.items():
            prefix = Path(tmp) / rel.split("/")[0] / "data"
            pack_dataset(args.data / rel, prefix)
            datasets[name] = ds = ListwiseDataset(prefix)
            skipped = ds.manifest["counts"]
            for mbs in (1, 4, 8):
                t = accounting(ds, mbs)
                rows.append([name, len(ds), mbs, t["real"] / t["padded"], t["real"] / t["packed"],
                             t["shared_real"] / t["shared"], t["packed"] / t["padded"], t["shared"] / t["padded"],
                             t["real"] / t["shared_real"]])
            print(f"  {name}: {len(ds)} lists, counts {skipped}", file=sys.stderr, flush=True)
        print_table("Useful tokens per layout (one epoch, sampler order, pad to multiple of 8)",
                    ["dataset", "lists", "lists/mb", "useful padded", "useful packed", "useful shared rows",
                     "slots packed/padded", "slots shared/padded", "prompt dedup (unpacked/shared real)"], rows)
        if args.no_timing:
            return 0

        init_single_process()
        preset = bench_moe_preset()
        vocab = preset.vocab_size
        model = build_model(preset)
        for name, (_, mbs) in DATASETS.items():
            cpu = step_times(model, datasets[name], mbs, args.timed_batches, args.reps, vocab)
            packed = cpu["padded"] / cpu["packed"] if "packed" in cpu else "- (row > 4096)"
            time_rows.append([name, mbs, args.timed_batches, cpu["padded"], packed, cpu["padded"] / cpu["shared"]])
            print(f"  timed {name}", file=sys.stderr, flush=True)
    print_table("Forward+backward CPU time (bench-moe, 4 layers, hidden 128, 8 experts top-2; interleaved medians)",
                ["dataset", "lists/mb", "micro-batches", "padded s", "speed-up packed", "speed-up shared"], time_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
