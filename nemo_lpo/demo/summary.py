"""The demo's final summary: held-out metrics before vs after training, and where the outputs are."""

from __future__ import annotations

import math


def _fmt(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


SUMMARY_ROWS = (
    ("implicit/accuracy", "held-out ranking accuracy (implicit reward β·(log π − log μ))"),
    ("implicit/kendall_tau", "held-out Kendall τ (implicit reward)"),
    ("implicit/ndcg", "held-out NDCG@K (implicit reward)"),
    ("likelihood/accuracy", "held-out ranking accuracy (log π per token)"),
    ("logps/best", "log-likelihood of the best response"),
    ("logps/worst", "log-likelihood of the worst response"),
)


def summary_table(before: dict, after: dict, title: str = "held-out lists: before vs after training",
                  columns: tuple[str, str] = ("before", "after"), prefix: str = ""):
    """A rich Table of the held-out metrics before and after training, with the change.

    ``prefix`` is put before each key (``val/`` for a training run's validation records).
    """
    from rich.table import Table

    table = Table(title=title)
    for name, justify in (("metric", "left"), (columns[0], "right"), (columns[1], "right"), ("change", "right")):
        table.add_column(name, justify=justify)
    for key, label in SUMMARY_ROWS:
        b, a = before.get(prefix + key), after.get(prefix + key)
        change = None if b is None or a is None else a - b
        table.add_row(label, _fmt(b), _fmt(a), _fmt(change, signed=True))
    return table


def print_summary(summary: dict) -> None:
    """Print the demo's summary table, timings and output paths."""
    from rich.console import Console

    console = Console()
    before, after = summary["heldout_before"], summary["heldout_after"]
    console.print(summary_table(before, after))
    console.print(f"{after['lists']} held-out lists, {after['pairs']} ordered pairs; β = {after['beta']}. Before "
                  "training the policy is its own reference, so every implicit reward is 0 (a coin flip: 0.5).")
    t = summary["timings_s"]
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    paths = summary["paths"]
    console.print(f"plots:            {', '.join(paths['plots'])}")
    console.print(f"metrics (JSONL):  {paths['metrics']}")
    console.print(f"checkpoint:       {paths['checkpoint']}")
    if paths.get("hf"):
        console.print(f"Hugging Face:     {paths['hf']}")
    console.print(f"summary (JSON):   {paths['out']}/summary.json")
