"""The ``eval`` scenario of tests/dist/peft_train.py: ``nemo-lpo eval``'s scoring of an adapter checkpoint.

After the ``lora`` scenario trained WORK_DIR/lora, ``evaluate_checkpoint`` (what the CLI calls; inside the one-rank
launch it keeps the worker's process group) scores lora's final adapter checkpoint (its base with the adapters;
the default reference is the run's base), then the same adapters merged into the base weights
(``convert.adapters.merge_adapter_checkpoint``: a weights-only checkpoint, scored by the ordinary path), then the
base itself; the result holds the three results' metrics and log-prob differences.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

METRICS = ("implicit/accuracy", "implicit/kendall_tau", "likelihood/accuracy", "loss")


def eval_and_compare(work: Path, prefix: str) -> dict:
    """The adapter checkpoint's, its merged weights' and the base's evaluations, compared."""
    from nemo_lpo.convert.adapters import merge_adapter_checkpoint
    from nemo_lpo.evaluate.run import evaluate_checkpoint
    from nemo_lpo.io import resolve_checkpoint

    ckpt = resolve_checkpoint(work / "lora" / "checkpoints")
    adapters = evaluate_checkpoint(ckpt, prefix)
    merged_dir = work / "eval_merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    merge_adapter_checkpoint(ckpt, merged_dir)
    merged = evaluate_checkpoint(merged_dir, prefix, reference=work / "init", beta=adapters["beta"])
    base = evaluate_checkpoint(work / "init", prefix, reference=work / "init", beta=adapters["beta"])
    logps = {name: np.nan_to_num(r["_policy_logps"]) for name, r in
             (("adapters", adapters), ("merged", merged), ("base", base))}
    return {
        "reference": adapters["reference"], "checkpoint": adapters["checkpoint"],
        "vs_merged": float(np.abs(logps["adapters"] - logps["merged"]).max()),
        "vs_base": float(np.abs(logps["adapters"] - logps["base"]).max()),
        "metrics": {name: {key: r.get(key) for key in METRICS} for name, r in
                    (("adapters", adapters), ("merged", merged))}}
