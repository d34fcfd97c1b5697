"""Measure the training step time per list against K on a model preset, and where the time goes.

    python -m nemo_lpo.train.steptime --k 2 4 8 [--lists-per-step 8] [--steps 6] [--max-length 128]

For each K it packs the embedded demo lists (``nemo_lpo/demo/data/train_k8.jsonl``, K = 8, cut to K with
the packer's ``max_k``), trains the tiny preset in this process (online reference, fp32) and prints a
markdown table: median step time, time per list (wall and process CPU time, the latter robust to a
shared machine), tokens/s, and the split into reference forward,
policy forward+backward and optimizer (synchronised timers in ``train_step``). ``--profile`` adds
torch.profiler's top operators (self CPU time) of one step at the largest K.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nemo_lpo.config import load_config
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.data.transforms import LengthLimits
from nemo_lpo.model.parallel import destroy_parallel
from nemo_lpo.train.loop import Trainer, init_parallel
from nemo_lpo.train.reference import write_reference
from nemo_lpo.train.step import train_step

REPO = Path(__file__).resolve().parents[2]
DEMO_K8 = REPO / "nemo_lpo" / "demo" / "data" / "train_k8.jsonl"


def _pack(k: int, work: Path, max_length: int | None) -> Path:

    prefix = work / f"k{k}" / "lists"
    limits = LengthLimits(max_length=max_length, overflow="truncate_response") if max_length else LengthLimits()
    pack(PackConfig(inputs=[str(DEMO_K8)], output_prefix=str(prefix), max_k=k if k < 8 else None, limits=limits),
         log=lambda message: None)
    return prefix


def measure(k: int, work: Path, args) -> dict:
    """Train ``args.warmup + args.steps`` steps at list size ``k``; return the medians of the timed steps."""
    prefix = _pack(k, work, args.max_length)
    cfg = load_config(REPO / "conf" / "tiny_cpu.yaml", [
        f"data.train_prefix={prefix}", f"logging.run_dir={work / f'run{k}'}", f"model.preset={args.preset}",
        f"reference.mode={args.reference}", f"data.global_batch_size={args.lists_per_step}",
        f"data.micro_batch_size={args.micro_batch_size}", "logging.tensorboard=false",
        f"train.max_steps={args.warmup + args.steps}", "checkpoint.save_at_end=false", "checkpoint.resume=false",
    ])
    if args.reference == "precomputed":

        write_reference(cfg)
    trainer = Trainer(cfg)
    results, tokens, cpu = [], [], []
    for step in range(args.warmup + args.steps):
        batches = trainer.feeder.next_global_batch()
        if args.profile and k == max(args.k) and step == args.warmup + args.steps - 1:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                train_step(trainer.lpo, trainer.optimizer, trainer.scheduler, batches)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
            continue
        cpu_start = time.process_time()
        result = train_step(trainer.lpo, trainer.optimizer, trainer.scheduler, batches)
        cpu_time = time.process_time() - cpu_start
        if step >= args.warmup:
            cpu.append(cpu_time)
            results.append(result)
            tokens.append(sum(int(b["seq_lengths"].sum()) for b in batches))

    def med(values):
        return statistics.median(values)

    step_time = med([r.step_time for r in results])
    return {
        "K": k, "step_s": step_time, "per_list_ms": 1000 * step_time / args.lists_per_step,
        "cpu_per_list_ms": 1000 * med(cpu) / args.lists_per_step,
        "tokens_per_s": med(tokens) / step_time,
        "reference_ms": 1000 * med([r.timings.get("reference", 0.0) for r in results]),
        "fwd_bwd_ms": 1000 * med([r.timings["forward_backward"] for r in results]),
        "optimizer_ms": 1000 * med([r.timings["optimizer"] for r in results]),
        "tokens_per_step": med(tokens),
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the options, measure every K, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--preset", default="tiny-mixtral")
    parser.add_argument("--lists-per-step", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--reference", choices=["online", "precomputed"], default="online")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of one step at the largest K")
    args = parser.parse_args(argv)



    init_parallel(load_config(REPO / "conf" / "tiny_cpu.yaml"))
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in args.k:
                rows.append(measure(k, Path(tmp), args))
    finally:
        destroy_parallel()
    print(f"\n{args.preset}, {args.lists_per_step} lists/step (micro-batch {args.micro_batch_size}), "
          f"{args.reference} reference, torch threads {torch.get_num_threads()}, median of {args.steps} steps\n")
    print("| K | tokens/step | step (s) | per list (ms) | CPU time per list (ms) | tokens/s | reference fwd (ms) "
          "| policy fwd+bwd (ms) | optimizer (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['K']} | {r['tokens_per_step']:.0f} | {r['step_s']:.3f} | {r['per_list_ms']:.1f} | "
              f"{r['cpu_per_list_ms']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['reference_ms']:.0f} | {r['fwd_bwd_ms']:.0f} | {r['optimizer_ms']:.0f} |")


if __name__ == "__main__":
    main()
