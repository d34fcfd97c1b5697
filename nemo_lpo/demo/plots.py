"""PNG plots of a training run from its metrics JSONL (TRL metric names), and multi-run comparison plots.

A metrics JSONL holds one JSON object per line; lines with a ``step`` (or ``iteration``) and at least one
of the plotted keys are training records, any other line (a header, an eval record) is skipped and counted.
matplotlib is imported inside the functions (Agg backend), so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nemo_lpo.io import atomic_path

# (file stem, title, y label, [(metric key, legend label)]): a training run's curve and, when the run
# validated (data.valid_prefix), its validation curve. Accuracy: the training curve is the loss module's
# rewards/accuracies (a tied pair of implicit rewards counts as wrong, so it starts at 0.0 while every reward is 0);
# the validation curve is implicit/accuracy, the measure of the end-of-run tables (a tie counts as half: 0.5).
TRAINING_PLOTS = (
    ("loss", "Loss", "loss", [("loss", "train"), ("val/loss", "validation")]),
    ("rewards_accuracies", "Ranking accuracy of the implicit reward", "pairwise accuracy",
     [("rewards/accuracies", "train: rewards/accuracies (a tie counts 0)"),
      ("val/implicit/accuracy", "validation: implicit/accuracy, as the tables (a tie counts ½)")]),
    ("logps", "Log-likelihood of chosen (best) and rejected responses", "log-likelihood (sum over response tokens)",
     [("logps/chosen", "logps/chosen"), ("logps/rejected", "logps/rejected"),
      ("val/logps/chosen", "validation logps/chosen"), ("val/logps/rejected", "validation logps/rejected")]),
)


def read_metrics(path: str | Path) -> tuple[list[dict], int]:
    """Return the training records of a metrics JSONL (sorted by step) and the number of lines skipped.

    Raises:
        ValueError: a line is not valid JSON (the message names the file and line).
    """
    records, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            step = obj.get("step", obj.get("iteration")) if isinstance(obj, dict) else None
            if not isinstance(step, int) or isinstance(step, bool):
                skipped += 1
                continue
            records.append(dict(obj, step=step))
    records.sort(key=lambda r: r["step"])
    return records, skipped


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Return ``(steps, values)`` of one metric, leaving out records without a finite number for it."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _save(fig, path: Path) -> Path:
    """Save a figure as PNG atomically (temp name + rename) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_lines(lines: dict[str, tuple[list, list]], path: str | Path, title: str, ylabel: str,
               xlabel: str = "step", hline: float | None = None, xticks: list | None = None) -> Path:
    """Plot named ``(x, y)`` lines on one axis and save them as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, (x, y) in lines.items():
        ax.plot(x, y, marker="o" if len(x) <= 30 else None, markersize=3, label=label)
    if xticks is not None:
        ax.set_xticks(xticks)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", linewidth=1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    return _save(fig, Path(path))


def plot_training(metrics_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``loss.png``, ``rewards_accuracies.png`` and ``logps.png`` for one run; returns the written paths.

    Each shows the training curve and, when the run validated, the validation curve (``val/`` keys) beside it.
    A plot whose metrics are absent from the file is not written.

    Raises:
        ValueError: the file holds no training record at all.
    """
    records, _ = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path}: no training records (lines with a 'step' and metric values)")
    written = []
    for stem, title, ylabel, keys in TRAINING_PLOTS:
        lines = {label: series(records, key) for key, label in keys}
        lines = {k: v for k, v in lines.items() if v[0]}
        if lines:
            hline = 0.5 if stem == "rewards_accuracies" else None
            written.append(plot_lines(lines, Path(out_dir) / f"{stem}.png", title, ylabel, hline=hline))
    return written
