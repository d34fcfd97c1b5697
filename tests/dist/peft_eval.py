"""``nemo-lpo eval``'s scoring of an adapter checkpoint (tests/test_bridge_peft.py; one plain process, no torchrun).

Usage: python -m tests.dist.peft_eval WORK_DIR PREFIX, after tests/dist/peft_train.py's ``lora`` scenario trained WORK_DIR/lora.
``evaluate_checkpoint`` (what the CLI calls) scores lora's final adapter checkpoint (its base with the adapters;
the default reference is the run's base), then the same adapters merged into the base weights
(``convert.adapters.merge_adapter_checkpoint``: a weights-only checkpoint, scored by the ordinary path), then the
base itself; prints one ``RESULT {json}`` line with the three results' metrics and log-prob differences.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from tests.dist import bridge_te_shim

bridge_te_shim.install()
bridge_te_shim.bridge_peft_without_te()

METRICS = ("implicit/accuracy", "implicit/kendall_tau", "likelihood/accuracy", "loss")


def main(work: Path, prefix: str) -> None:
    from nemo_lpo.convert.adapters import merge_adapter_checkpoint
    from nemo_lpo.evaluate.run import evaluate_checkpoint
    from nemo_lpo.io import resolve_checkpoint
    from nemo_lpo.model.parallel import destroy_parallel

    ckpt = resolve_checkpoint(work / "lora" / "checkpoints")
    adapters = evaluate_checkpoint(ckpt, prefix)
    merged_dir = work / "eval_merged"
    shutil.rmtree(merged_dir, ignore_errors=True)
    merge_adapter_checkpoint(ckpt, merged_dir)
    destroy_parallel()
    merged = evaluate_checkpoint(merged_dir, prefix, reference=work / "init", beta=adapters["beta"])
    base = evaluate_checkpoint(work / "init", prefix, reference=work / "init", beta=adapters["beta"])
    logps = {name: np.nan_to_num(r["_policy_logps"]) for name, r in
             (("adapters", adapters), ("merged", merged), ("base", base))}
    print("RESULT " + json.dumps({
        "scenario": "eval", "reference": adapters["reference"], "checkpoint": adapters["checkpoint"],
        "vs_merged": float(np.abs(logps["adapters"] - logps["merged"]).max()),
        "vs_base": float(np.abs(logps["adapters"] - logps["base"]).max()),
        "metrics": {name: {key: r.get(key) for key in METRICS} for name, r in
                    (("adapters", adapters), ("merged", merged))}}), flush=True)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
