"""Whole training steps (the real trainer) in three batch layouts, side by side: lists/s, TFLOP/s, MFU, memory.

Runs ``nemo_lpo.train.loop.Trainer`` for a few steps per layout on one packed dataset and one model, in one
process, and prints the medians of the steps after the warm-up and the ratios against the padded layout:

  padded  ListwiseCollator: B*K rows [prompt, y_k], right-padded
  packed  data.packed=true: the B*K sequences of a micro-batch back to back
  shared  data.shared_prompt=true: one row [prompt, y_1, ..., y_K] per list (prompt computed once)

The model is a named preset, optionally cut to fewer layers (``--num-layers 1`` on ``mixtral-8x7b`` keeps
Mixtral's real layer shapes, so per-layer TFLOP/s mean what they mean at full size). On a GPU the steps
run in bf16 (``--dtype``); TFLOP/s and MFU come from the trainer's metrics (GPU only). Lists/s is the
comparable figure: the layouts compute different numbers of tokens for the same lists.

    .venv/bin/python bench/bench_train_step.py [--prefix data/lists] [--preset tiny-mixtral] [--steps 6]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "padded": ["data.packed=false", "data.shared_prompt=false"],
    "packed": ["data.packed=true", "data.shared_prompt=false"],
    "shared": ["data.packed=false", "data.shared_prompt=true"],
}


def register_preset(name: str, num_layers: int | None) -> str:
    """The preset to train: ``name`` itself, or a copy cut to ``num_layers`` layers (registered in-process)."""
    from nemo_lpo.model.presets import PRESETS

    if num_layers is None:
        return name
    cut = f"{name}-{num_layers}l"
    PRESETS[cut] = PRESETS[name].replace(name=cut, num_layers=num_layers)
    return cut


def pack_demo_lists(prefix: Path) -> str:
    """Pack the embedded demo lists (K = 4, Mistral tokenizer) at ``prefix``; returns it."""
    from nemo_lpo.data.pack import PackConfig, pack

    pack(PackConfig(inputs=[str(REPO / "nemo_lpo" / "demo" / "data" / "train.jsonl")], output_prefix=str(prefix)),
         log=lambda message: None)
    return str(prefix)


def run_layout(layout: str, args, preset: str, run_root: Path) -> dict:
    """Train ``args.steps`` steps in one layout; the medians of the steps after ``args.warmup``."""
    from nemo_lpo.config import load_config
    from nemo_lpo.model.parallel import destroy_parallel
    from nemo_lpo.train.loop import Trainer, init_parallel

    run_dir = run_root / layout
    overrides = [f"data.train_prefix={args.prefix}", f"model.preset={preset}", f"model.params_dtype={args.dtype}",
                 f"model.recompute={args.recompute}", f"reference.mode={args.reference}",
                 f"data.global_batch_size={args.global_batch}", f"data.micro_batch_size={args.micro_batch}",
                 f"train.max_steps={args.steps}", f"optim.lr={args.lr}", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
                 "checkpoint.save_at_end=false", "checkpoint.save_interval=null", "checkpoint.resume=false",
                 "data.shuffle=false", *LAYOUTS[layout]]
    cfg = load_config(str(REPO / "conf" / "tiny_cpu.yaml"), overrides)
    init_parallel(cfg)
    try:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        Trainer(cfg).run()
        peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    except torch.OutOfMemoryError as err:  # one layout out of memory must not cost the others their numbers
        print(f"  {layout}: out of memory: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        return None
    finally:
        destroy_parallel()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = lines[args.warmup:] or lines[-1:]

    def med(key):
        values = [line[key] for line in timed if key in line]
        return statistics.median(values) if values else float("nan")

    step_time = med("step_time")
    return {"layout": layout, "step_time": step_time, "lists_per_s": args.global_batch / step_time,
            "tokens": med("tokens"), "tflops": med("tflops_per_gpu"), "mfu": med("mfu"), "peak_gib": peak_gib,
            "loss_first": lines[0]["loss"], "loss_last": lines[-1]["loss"]}


def main() -> int:
    """Run every layout and print one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", help="packed dataset (nemo-lpo pack output); default: the embedded demo lists")
    parser.add_argument("--preset", default="tiny-mixtral")
    parser.add_argument("--num-layers", type=int, default=None, help="cut the preset to this many layers")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--recompute", default="none", choices=["none", "full", "selective"])
    parser.add_argument("--reference", default="online", choices=["online", "precomputed"])
    parser.add_argument("--global-batch", type=int, default=4, help="lists per step")
    parser.add_argument("--micro-batch", type=int, default=1, help="lists per micro-batch")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the medians")
    parser.add_argument("--layouts", default="padded,packed,shared")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bf16" if torch.cuda.is_available() else "fp32")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    preset = register_preset(args.preset, args.num_layers)
    print(f"device: {device}, torch {torch.__version__}; model {preset} {args.dtype}, reference {args.reference}, "
          f"{args.global_batch} lists/step, {args.micro_batch} per micro-batch, {args.steps} steps "
          f"(first {args.warmup} not timed); data {args.prefix or 'the embedded demo lists'}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.prefix is None:
            args.prefix = pack_demo_lists(Path(tmp) / "data" / "lists")
        for layout in args.layouts.split(","):
            row = run_layout(layout, args, preset, Path(tmp))
            if row is None:
                print(f"| {layout} | out of memory |")
                continue
            rows.append(row)
            print(f"  {layout}: {row}", file=sys.stderr, flush=True)
    if not rows:
        return 1
    base = next((r for r in rows if r["layout"] == "padded"), rows[0])
    print("| layout | step s | lists/s | vs padded | tokens computed | TFLOP/s | MFU | peak GiB | loss first -> last |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['step_time']:.3f} | {r['lists_per_s']:.2f} | "
              f"{r['lists_per_s'] / base['lists_per_s']:.2f}x | {r['tokens']:.0f} | {r['tflops']:.1f} | "
              f"{r['mfu']:.3f} | {r['peak_gib']:.1f} | {r['loss_first']:.4f} -> {r['loss_last']:.4f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
