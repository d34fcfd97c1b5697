"""The end-of-run summary of ``nemo-lpo train``: steps, time, throughput, validation, checkpoints.

It is printed on rank 0 (the validation table is the demo's ``summary_table``) and written to
``<run_dir>/summary.json`` (temp name + rename).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nemo_lpo.io import atomic_write

# validation metrics whose best value over the run is reported, and which way is better
BEST_OF = (("val/loss", "min"), ("val/rewards/accuracies", "max"), ("val/implicit/accuracy", "max"),
           ("val/implicit/kendall_tau", "max"), ("val/implicit/ndcg", "max"))


class RunSummary:
    """Collects what the summary reports while the trainer runs.

    Args:
        start_step: the step the run starts (or resumes) at.
    """

    def __init__(self, start_step: int) -> None:
        self.start_step = start_step
        self.started = time.perf_counter()
        self.tokens = 0
        self.step_time = 0.0
        self.validations: list[tuple[int, dict]] = []

    def add_step(self, record: dict) -> None:
        """Count one training step's tokens and time."""
        self.tokens += int(record.get("tokens", 0))
        self.step_time += float(record.get("step_time", 0.0))

    def add_validation(self, step: int, metrics: dict) -> None:
        """Keep one validation's ``val/`` metrics."""
        self.validations.append((step, {k: v for k, v in metrics.items() if k.startswith("val/")}))

    def best(self) -> dict:
        """``{metric: {"value", "step"}}`` of the best validation value of each ``BEST_OF`` metric reported."""
        out = {}
        for key, mode in BEST_OF:
            seen = [(v[key], step) for step, v in self.validations
                    if isinstance(v.get(key), int | float) and math.isfinite(v[key])]
            if seen:
                value, step = (min if mode == "min" else max)(seen, key=lambda item: item[0])
                out[key] = {"value": value, "step": step, "mode": mode}
        return out

    def to_dict(self, end_step: int, checkpoints: dict) -> dict:
        """The summary as plain data (``checkpoints``: latest / best paths and the keep_best record)."""
        wall = time.perf_counter() - self.started
        return {
            "steps": {"start": self.start_step, "end": end_step, "run": end_step - self.start_step},
            "wall_time_s": round(wall, 2), "train_time_s": round(self.step_time, 2), "tokens": self.tokens,
            "tokens_per_s": self.tokens / self.step_time if self.step_time > 0 else None,
            "validation": {"first": dict(zip(("step", "metrics"), self.validations[0], strict=True))
                           if self.validations else None,
                           "final": dict(zip(("step", "metrics"), self.validations[-1], strict=True))
                           if self.validations else None,
                           "best": self.best()},
            "checkpoints": checkpoints,
        }


def _finite(obj):
    """``obj`` with NaN / inf floats as None (strict JSON) and paths as strings."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return str(obj) if isinstance(obj, Path) else obj


def write_summary(summary: dict, path: str | Path) -> None:
    """Write the summary JSON atomically (NaN as null)."""
    path = Path(path)
    clean = _finite(summary)
    atomic_write(path, json.dumps(clean, indent=2) + "\n")


def _fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


SUMMARY_ROWS = (
    ("implicit/accuracy", "ranking accuracy (implicit reward β·(log π − log μ); a tie counts ½)"),
    ("implicit/kendall_tau", "Kendall τ (implicit reward)"),
    ("implicit/ndcg", "NDCG@K (implicit reward)"),
    ("likelihood/accuracy", "ranking accuracy (log π per token)"),
    ("logps/best", "log-likelihood of the best response"),
    ("logps/worst", "log-likelihood of the worst response"),
)


def summary_table(before: dict, after: dict, title: str, columns: tuple[str, str] = ("before", "after"),
                  prefix: str = ""):
    """A rich Table of ranking metrics before and after training, with the change.

    ``title`` says which lists they were computed on (the run summary's validation lists and the demo's held-out
    set differ); ``prefix`` is put before each key (``val/`` for a training run's validation records).
    """
    table = Table(title=title)
    for name, justify in (("metric", "left"), (columns[0], "right"), (columns[1], "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    for key, label in SUMMARY_ROWS:
        b, a = before.get(prefix + key), after.get(prefix + key)
        change = None if b is None or a is None else a - b
        table.add_row(label, _fmt(b), _fmt(a), _fmt(change, signed=True))
    return table


def print_summary(summary: dict) -> None:
    """Print the run summary; the validation part is the demo's before/after table (rich)."""
    console = Console()
    steps = summary["steps"]
    rate = summary["tokens_per_s"]
    print(f"run summary: steps {steps['start']} -> {steps['end']} ({steps['run']} run), wall time "
          f"{summary['wall_time_s']:.1f} s (training steps {summary['train_time_s']:.1f} s), "
          f"{summary['tokens']} tokens" + (f", {rate:.0f} tokens/s" if rate else ""), flush=True)
    val = summary["validation"]
    if val["first"] is not None:
        first, final = val["first"], val["final"]
        console.print(summary_table(first["metrics"], final["metrics"], prefix="val/",
                                    title="validation lists: first vs final validation",
                                    columns=(f"step {first['step']}", f"step {final['step']}")))
        print(f"validation table: {val.get('lists') or 'the data.valid_prefix lists'}", flush=True)
        for key, best in val["best"].items():
            print(f"best {key} ({best['mode']}): {best['value']:.4f} at step {best['step']}")
    ckpt = summary["checkpoints"]
    print(f"latest checkpoint: {ckpt.get('latest') or 'none'}")
    if ckpt.get("keep_best"):
        kb = ckpt["keep_best"]
        print(f"best checkpoint:   {kb['checkpoint']} ({kb['metric']} = {kb['value']:.4f}, step {kb['step']})")
    print(f"metrics (JSONL):   {summary['metrics']}")
