"""``nemo-lpo reproduce --compare-losses``: every listwise loss on the same K = 4 lists, at equal steps.

The runs go through the reproduce suite's own code (``reproduce.loss_comparison``: the trainer's config of
the demo, one reference pass, the held-out evaluation of ``nemo-lpo eval``); this module holds what is
compared, the table built from the runs' held-out results, and its section of ``report.md``.
"""

from __future__ import annotations

from nemo_lpo.losses import LOSS_SPECS

COMPARE_K = 4  # the lists every compared loss trains on (the K of Figure 1's LPO-abs run)
KPO_K = 2  # kpo's top positions on K = 4 lists, as conf/experiments/uf_kpo.yaml (k = 1: softmax-DPO; 3: listmle)
NOT_LISTWISE = ("dpo", "ipo", "sft")  # K = 2 only (dpo, ipo), or no preference at all (sft)
# held-out metric (``nemo_lpo.metrics.ranking_metrics`` key) -> column of the table
COLUMNS = {
    "implicit/accuracy": "held-out accuracy",
    "implicit/kendall_tau": "Kendall τ",
    "implicit/ndcg": "NDCG",
    "logps/best": "best-response log-lik",
}


def comparison_plan(losses: list[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Loss name -> its extra config overrides, for every listwise loss of the registry (or ``losses``)."""
    names = [name for name in LOSS_SPECS if name not in NOT_LISTWISE] if losses is None else list(losses)
    unknown = [name for name in names if name not in LOSS_SPECS or name in NOT_LISTWISE]
    if unknown:
        raise ValueError(f"cannot compare {unknown}: not listwise losses of nemo_lpo.losses.LOSS_SPECS")
    return {name: ("loss.options.k=" + str(KPO_K),) if name == "kpo" else () for name in names}


def comparison_rows(runs: dict[str, dict], start: dict) -> list[dict]:
    """One row per run (``{loss: run entry with its "heldout" metrics}``), the start model first.

    Each row: ``loss``, ``options`` (the extra overrides, as text) and the :data:`COLUMNS` metrics (None
    where a metric was undefined).
    """
    rows = [{"loss": "start model (no training)", "options": "", **{key: start.get(key) for key in COLUMNS}}]
    for loss, entry in runs.items():
        options = ", ".join(o.removeprefix("loss.options.") for o in entry.get("extra", ()))
        rows.append({"loss": loss, "options": options, **{key: entry["heldout"].get(key) for key in COLUMNS}})
    return rows


def _cell(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def comparison_section(comparison: dict) -> list[str]:
    """The markdown section of ``report.md`` for ``results["loss_comparison"]``."""
    rows = comparison["rows"]
    lines = ["### Listwise losses compared (equal steps)", "",
             f"Every listwise loss trained from the same start on the same K = {comparison['k']} lists for "
             f"{comparison['steps']} steps with the same optimiser settings (the LPO and LPO-abs runs are Figure 2's "
             f"K = {comparison['k']} runs); evaluated on the held-out K = 8 lists. Accuracy, Kendall τ and NDCG rank "
             "the responses by the implicit reward β(log π − log μ); the last column is the mean summed "
             "log-likelihood of each held-out list's best response.", "",
             "| loss | options | " + " | ".join(COLUMNS.values()) + " |",
             "|---|---|" + "---:|" * len(COLUMNS)]
    for row in rows:
        cells = [_cell(row[key], 2 if key == "logps/best" else 3) for key in COLUMNS]
        lines.append(f"| {row['loss']} | {row['options']} | " + " | ".join(cells) + " |")
    trained = [row for row in rows[1:] if row["implicit/accuracy"] is not None]
    if trained:
        best = max(trained, key=lambda row: row["implicit/accuracy"])
        lines += ["", f"Highest held-out accuracy: `{best['loss']}` ({best['implicit/accuracy']:.3f}). At this scale "
                  "(a 4M-parameter model, a few minutes of CPU) the differences show the losses run on equal "
                  "footing, not which is better on real data."]
    return [*lines, ""]
