"""The demo's final summary: held-out metrics before vs after training, and where the outputs are."""

from __future__ import annotations

from rich.console import Console

from nemo_lpo.train.summary import summary_table


def print_summary(summary: dict) -> None:
    """Print the demo's summary table, timings and output paths."""
    console = Console()
    before, after = summary["heldout_before"], summary["heldout_after"]
    console.print(summary_table(before, after, title="held-out lists: before vs after training"))
    # plain print: a rich line would wrap inside the list count
    print(f"held-out table: all {after['lists']} held-out lists (nemo-lpo eval), {after['pairs']} ordered pairs; "
          f"β = {after['beta']}. Before training the policy is its own reference, so every implicit reward is 0 "
          "(a coin flip: 0.5; ranking accuracy counts a tie as half).", flush=True)
    t = summary["timings_s"]
    console.print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()))
    paths = summary["paths"]
    console.print(f"plots:            {', '.join(paths['plots'])}")
    console.print(f"metrics (JSONL):  {paths['metrics']}")
    console.print(f"checkpoint:       {paths['checkpoint']}")
    if paths.get("hf"):
        console.print(f"Hugging Face:     {paths['hf']}")
    console.print(f"summary (JSON):   {paths['out']}/summary.json")
