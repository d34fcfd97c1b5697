"""``nemo-lpo reproduce --compare-losses``: the comparison runs on the real trainer, their table and report section.

A tiny run (8 lists, 1 step per loss): listmle and kpo trained from the seeded start with the start's stored
log-probs as reference, so at step 1 every implicit reward is 0 and the logged loss has a closed form:
each response i contributes log(1 + number of responses rewarded below it) (each factor of the Plackett-Luce
likelihood is 1 / (that number + 1) when all scores tie); kpo keeps positions 1..2 only.
"""

from __future__ import annotations

import json
import math

import pytest

from nemo_lpo.demo import compare
from nemo_lpo.io import atomic_write

N_LISTS = 8  # = the demo's global batch: step 1 sees every list, so its loss is the mean over the dataset


def _step_one_loss(rewards_per_list, top_k=None):
    """Mean over the lists of sum_i log(1 + #{j: r_j < r_i}) over positions <= top_k (all equal scores)."""
    total = 0.0
    for rewards in rewards_per_list:
        for r in rewards:
            position = 1 + sum(other > r for other in rewards)
            if top_k is None or position <= top_k:
                total += math.log(1 + sum(other < r for other in rewards))
    return total / len(rewards_per_list)


def test_plan_covers_every_listwise_loss_and_sets_kpo_k():
    plan = compare.comparison_plan()
    assert {"lpo", "lpo_abs", "listmle", "kpo", "dpo_pw", "dpo_1vs0", "lipo_lambda", "nca", "infonca"} <= set(plan)
    assert not {"dpo", "ipo", "sft"} & set(plan)  # K = 2 only, or not a preference loss
    assert plan["kpo"] == ("loss.options.k=2",) and plan["listmle"] == ()
    with pytest.raises(ValueError, match="cannot compare.*dpo"):
        compare.comparison_plan(["listmle", "dpo"])


def test_bad_loss_name_fails_before_any_run(tmp_path, capsys):
    from nemo_lpo.demo.reproduce import run_reproduce

    assert run_reproduce(tmp_path / "out", steps=1, include_real=False, compare_losses=["listmle", "sft"]) == 2
    assert "--compare-losses: cannot compare ['sft']" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_rows_and_report_section_from_run_entries():
    start = {"implicit/accuracy": 0.5, "implicit/kendall_tau": 0.0, "implicit/ndcg": 0.71, "logps/best": -40.0}
    runs = {"lpo": {"heldout": {"implicit/accuracy": 0.61, "implicit/kendall_tau": 0.2, "implicit/ndcg": 0.8,
                                "logps/best": -38.5}},
            "kpo": {"extra": ["loss.options.k=2"], "heldout": {"implicit/accuracy": 0.64, "implicit/kendall_tau": None,
                                                               "implicit/ndcg": 0.82, "logps/best": -39.25}}}
    rows = compare.comparison_rows(runs, start)
    assert [row["loss"] for row in rows] == ["start model (no training)", "lpo", "kpo"]
    assert rows[2]["options"] == "k=2" and rows[2]["implicit/kendall_tau"] is None
    lines = compare.comparison_section({"k": 4, "steps": 3, "rows": rows})
    assert "| kpo | k=2 | 0.640 | n/a | 0.820 | -39.25 |" in lines
    assert "| lpo |  | 0.610 | 0.200 | 0.800 | -38.50 |" in lines
    assert any("Highest held-out accuracy: `kpo` (0.640)" in line for line in lines)


def test_cli_flag_is_off_by_default_and_takes_loss_names():
    import argparse

    from nemo_lpo.demo.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["reproduce"]).compare_losses is None
    assert parser.parse_args(["reproduce", "--compare-losses"]).compare_losses == []
    assert parser.parse_args(["reproduce", "--compare-losses", "listmle", "kpo"]).compare_losses == ["listmle", "kpo"]


@pytest.mark.slow
def test_tiny_comparison_trains_each_loss_and_tabulates(tmp_path):
    from nemo_lpo.data import ListwiseDataset
    from nemo_lpo.demo import reproduce, tasks
    from nemo_lpo.demo.config import DemoConfig
    from nemo_lpo.demo.pipeline import save_start_weights, write_sidecar
    from nemo_lpo.evaluate.run import evaluate_checkpoint

    splits = tasks.generate()
    train, held = tmp_path / "src" / "train_k4.jsonl", tmp_path / "src" / "heldout_k8.jsonl"
    atomic_write(train, tasks.to_jsonl(tasks.subset_lists(splits["train"], 4)[:N_LISTS]))
    atomic_write(held, tasks.to_jsonl(tasks.subset_lists(splits["heldout"], 8)[:N_LISTS]))
    suite = reproduce.Suite("tiny", {4: (train, None)}, train, held, steps=1, compare_losses=["lpo", "listmle", "kpo"])
    out, cfg = tmp_path / "out", DemoConfig(out_dir=tmp_path / "out", steps=1)
    k4 = reproduce._pack(train, out / "data" / "train_k4", suite)
    held_prefix = reproduce._pack(held, out / "data" / "heldout_k8", suite)
    save_start_weights(out / "start", cfg.seed)
    write_sidecar(cfg, k4, out / "start", out / "runs" / "ref")
    start = evaluate_checkpoint(out / "start", held_prefix, reference=out / "start", preset="tiny-mixtral")
    start_logps = start.pop("_policy_logps")
    # Figure 2's lpo run on the K = 4 lists is reused, not trained again (a stand-in entry: no trainer call)
    lpo_entry = {"loss": "lpo", "heldout": {"implicit/accuracy": 0.75, "implicit/kendall_tau": 0.5,
                                            "implicit/ndcg": 0.9, "logps/best": -50.0}}
    results = {"runs": {"lpo_k4": lpo_entry}, "start": start}

    comparison = reproduce.loss_comparison(suite, out, held_prefix, start_logps, cfg, results)

    assert comparison["runs"]["lpo"] is lpo_entry and not (out / "runs" / "compare_lpo").exists()
    rewards = [ListwiseDataset(k4)[i]["rewards"].tolist() for i in range(N_LISTS)]
    for loss, top_k in (("listmle", None), ("kpo", 2)):
        entry = comparison["runs"][loss]
        lines = [json.loads(line) for line in open(entry["metrics"]) if line.strip()]
        assert [line["step"] for line in lines] == [1] and entry["loss"] == loss
        assert lines[0]["loss"] == pytest.approx(_step_one_loss(rewards, top_k), rel=1e-5)
        assert entry["heldout"]["lists"] == N_LISTS and 0.0 <= entry["heldout"]["implicit/accuracy"] <= 1.0
    assert comparison["runs"]["kpo"]["extra"] == ["loss.options.k=2"]
    rows = comparison["rows"]
    assert [row["loss"] for row in rows] == ["start model (no training)", "lpo", "listmle", "kpo"]
    assert rows[0]["implicit/accuracy"] == start["implicit/accuracy"] and rows[1]["logps/best"] == -50.0
    assert rows[3]["logps/best"] == comparison["runs"]["kpo"]["heldout"]["logps/best"]
    section = compare.comparison_section(comparison)
    assert sum(line.startswith("| kpo | k=2 |") for line in section) == 1
