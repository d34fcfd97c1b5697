"""The end-of-run tables say which lists they were computed on; the accuracy plot's validation curve is the tables' measure."""

from __future__ import annotations

import json

from nemo_lpo.config import load_config
from nemo_lpo.demo import plots
from nemo_lpo.demo.summary import print_summary as print_demo_summary
from nemo_lpo.train.summary import print_summary
from nemo_lpo.train.validation import ValidationSet
from tests.dist.train_common import DEMO_LISTS, TINY_CONF, pack_lists

METRICS = {"implicit/accuracy": 0.5, "implicit/kendall_tau": 0.0, "implicit/ndcg": 0.8, "likelihood/accuracy": 0.4,
           "logps/best": -40.0, "logps/worst": -45.0}


def test_validation_set_says_which_lists(tmp_path):
    prefix = pack_lists(DEMO_LISTS, tmp_path / "heldout", 5)
    capped = ValidationSet(load_config(TINY_CONF, [f"data.valid_prefix={prefix}", "train.eval_lists=3",
                                                   "reference.mode=online"]))
    whole = ValidationSet(load_config(TINY_CONF, [f"data.valid_prefix={prefix}", "reference.mode=online"]))
    assert capped.describe() == "the first 3 of 5 lists (train.eval_lists) of heldout"
    assert whole.describe() == "all 5 lists of heldout"


def test_both_tables_name_their_lists(capsys, tmp_path):
    val = {f"val/{k}": v for k, v in METRICS.items()}
    print_summary({"steps": {"start": 0, "end": 4, "run": 4}, "wall_time_s": 1.0, "train_time_s": 1.0, "tokens": 10,
                   "tokens_per_s": None, "checkpoints": {}, "metrics": "m.jsonl",
                   "validation": {"first": {"step": 0, "metrics": val}, "final": {"step": 4, "metrics": val},
                                  "best": {}, "lists": "the first 16 of 64 lists (train.eval_lists) of heldout"}})
    print_demo_summary({"heldout_before": {**METRICS, "lists": 64, "pairs": 300, "beta": 0.1},
                        "heldout_after": {**METRICS, "lists": 64, "pairs": 300, "beta": 0.1}, "timings_s": {},
                        "paths": {"plots": [], "metrics": "m", "checkpoint": "c", "out": str(tmp_path)}})
    out = capsys.readouterr().out
    assert "the first 16 of 64 lists (train.eval_lists) of heldout" in out
    assert "all 64 held-out lists" in out
    assert "held-out ranking accuracy" not in out  # the row names no longer claim one set for both tables


def _png(tmp_path, name: str, records: list[dict]):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plots.plot_training(path, tmp_path / name)
    return (tmp_path / name / "rewards_accuracies.png").read_bytes()


def test_accuracy_plot_validation_curve_is_the_tables_measure(tmp_path):
    train = [{"step": s, "loss": 1.0, "rewards/accuracies": 0.1 * s} for s in range(1, 5)]
    # at step 0 every implicit reward is 0: the loss module's measure reads 0.0, the tables' 0.5
    loss_measure = [{"step": 0, "val/loss": 1.0, "val/rewards/accuracies": 0.0}, *train]
    table_measure = [{"step": 0, "val/loss": 1.0, "val/implicit/accuracy": 0.5}, *train]
    without = _png(tmp_path, "train_only", train)
    assert _png(tmp_path, "loss_measure", loss_measure) == without  # the loss module's val measure is not drawn
    assert _png(tmp_path, "table_measure", table_measure) != without  # the tables' measure is
