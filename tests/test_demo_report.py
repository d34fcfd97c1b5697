"""The reproduce report: figures and plain verdicts from synthetic runs; LPO(preference) vs DPO bit check."""

from __future__ import annotations

import json
from types import SimpleNamespace

from nemo_lpo.demo import report

BETA = 0.1


def _metrics(path, chosen):
    """A metrics JSONL whose chosen log-likelihood change (rewards/chosen / β) follows ``chosen``."""
    path.write_text("".join(json.dumps({"step": i + 1, "loss": 0.5, "rewards/chosen": BETA * v,
                                        "logps/chosen": -40.0 + 3.0 * (i % 2)}) + "\n"  # raw: batch noise only
                            for i, v in enumerate(chosen)))
    return str(path)


def _run(path, chosen, best=-40.0):
    return {"metrics": _metrics(path, chosen), "heldout": {"logps/best": best, "beta": BETA}}


def _results(tmp_path, dpo_chosen, lpo_abs_chosen, acc, warm=None):
    runs = {"dpo_pairs": _run(tmp_path / "dpo.jsonl", [0.0] + [0.5] * 19, best=-43.0),
            "lpo_pref_pairs": _run(tmp_path / "lpo_pref.jsonl", [0.0])}
    for k, (a, b) in acc.items():
        runs[f"lpo_k{k}"] = {"metrics": _metrics(tmp_path / f"lpo{k}.jsonl", [0.0]),
                             "heldout": {"implicit/accuracy": a, "implicit/kendall_tau": 2 * a - 1}}
        runs[f"lpo_abs_k{k}"] = {"metrics": _metrics(tmp_path / f"abs{k}.jsonl", [0.0] + [6.0] * 19),
                                 "heldout": {"implicit/accuracy": b, "implicit/kendall_tau": 2 * b - 1,
                                             "logps/best": -38.0}}
    res = {"suite": "synthetic", "steps": 20, "seconds": 1.0, "beta": BETA, "runs": runs,
           "start": {"implicit/accuracy": 0.5, "logps/best": -44.0},
           "table1": {"steps": 20, "steps_identical": 20, "tensors": 10, "tensors_identical": 10,
                      "loss_function": {"lists": 32, "differing_bits_lists": 0}}}
    if warm is not None:  # held-out best of the SFT model -37, then (DPO, LPO-abs) end values
        res["warm_start"] = {"sft_steps": 20, "sft": {"heldout": {"logps/best": -37.0}},
                             "runs": {"dpo_pairs_sft": _run(tmp_path / "dpo_sft.jsonl", dpo_chosen, warm[0]),
                                      "lpo_abs_k4_sft": _run(tmp_path / "abs_sft.jsonl", lpo_abs_chosen, warm[1])}}
    return res


def _report(res, tmp_path):
    res["figures"] = {k: str(p) for k, p in report.draw_figures(res, tmp_path / "fig").items()}
    return report.write_report([res], tmp_path / "report.md", total_seconds=12.0,
                               demo_cfg=SimpleNamespace(seed=1, beta=BETA, lr=1e-3, global_batch_size=8)).read_text()


def test_report_states_where_the_effect_shows(tmp_path):
    res = _results(tmp_path, dpo_chosen=[-0.5 * i for i in range(20)], lpo_abs_chosen=[0.5 * i for i in range(20)],
                   acc={2: (0.55, 0.56), 4: (0.6, 0.62), 8: (0.58, 0.7)}, warm=(-38.5, -33.0))
    text = _report(res, tmp_path)
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {
        "figure1_chosen_logps.png", "figure1_random_init_chosen_logps.png", "figure2_accuracy_vs_k.png"}
    assert "shows the paper's effect from the SFT model" in text and "Equal to the last bit." in text
    assert "DPO -9.00 nats on train batches, -1.50 held-out; LPO-abs +9.00 and +4.00" in text  # last 3 of 20 steps
    assert "| SFT model | DPO on Zephyr pairs | -9.00 | -9.50 | +0.00 | -37.00 → -38.50 (-1.50) |" in text
    assert "| random init | DPO on Zephyr pairs | +0.50 | +0.00 | +0.50 | -44.00 → -43.00 (+1.00) |" in text
    assert "From the random start, DPO's chosen log-likelihood changes by +0.50 nats (+1.00 held-out)" in text
    assert "LPO: accuracy does NOT grow monotonically" in text  # 0.6 -> 0.58 at K=8
    assert "LPO-abs: accuracy grows monotonically" in text
    assert "](fig/figure1_chosen_logps.png)" in text  # figure links relative to the report
    change = report.chosen_change(res["warm_start"]["runs"]["dpo_pairs_sft"]["metrics"], BETA)
    assert change == {"end": -9.0, "lowest": -9.5, "highest": 0.0}


def test_report_says_when_the_effect_is_absent(tmp_path):
    # DPO's chosen log-likelihood falls on train batches but not held out: not the paper's effect on both measures
    res = _results(tmp_path, dpo_chosen=[-0.1 * i for i in range(20)], lpo_abs_chosen=[0.5 * i for i in range(20)],
                   acc={2: (0.5, 0.5), 4: (0.5, 0.5), 8: (0.5, 0.5)}, warm=(-36.5, -33.0))
    res["table1"]["steps_identical"] = 19
    text = _report(res, tmp_path)
    assert "does NOT show the paper's effect as stated from the SFT model" in text and "NOT bit-identical" in text
    assert ("DPO's chosen log-likelihood falls on train batches (-1.80 nats) and rises held-out (+0.50); LPO-abs's "
            "rises on train batches (+9.00) and rises held-out (+4.00)") in text
    # a held-out change under 0.1 nats is no change
    res["warm_start"]["runs"]["dpo_pairs_sft"]["heldout"]["logps/best"] = -37.05
    assert "and is flat held-out (-0.05)" in _report(res, tmp_path)


def test_report_without_warm_start(tmp_path):
    """Results of a run without the SFT stage (``--sft-steps 0``, or older results): Figure 1 from random init."""
    res = _results(tmp_path, dpo_chosen=[], lpo_abs_chosen=[], acc={2: (0.5, 0.5), 4: (0.5, 0.5), 8: (0.5, 0.5)})
    text = _report(res, tmp_path)
    assert {p.name for p in (tmp_path / "fig").iterdir()} == {"figure1_chosen_logps.png", "figure2_accuracy_vs_k.png"}
    assert ("does NOT show the paper's effect as stated from the random init: DPO's chosen log-likelihood rises on "
            "train batches (+0.50 nats) and rises held-out (+1.00)") in text
    assert "the paper's DPO decline is measured from an SFT model" in text


def test_lpo_preference_equals_dpo_bitwise():
    from nemo_lpo.demo.reproduce import loss_function_check

    out = loss_function_check(trials=20)
    assert out["lists"] == 320 and out["differing_bits_lists"] == 0


def test_embedded_suite_sources(tmp_path):
    from nemo_lpo.demo import reproduce

    suite = reproduce.embedded_suite(tmp_path, steps=5)
    sizes = {}
    for k, (path, max_k) in suite.train.items():
        lists = [json.loads(line) for line in path.read_text().splitlines()]
        assert max_k is None and len(lists) == 320
        sizes[k] = {len(x["responses"]) for x in lists}
    assert sizes == {2: {2}, 4: {4}, 8: {8}}
    assert suite.pairs_source == suite.train[4][0]
    held = [json.loads(line) for line in suite.heldout.read_text().splitlines()]
    assert len(held) == 64 and {len(x["responses"]) for x in held} == {8}


def test_alpacaeval_suite_split(tmp_path, shared_data):
    from nemo_lpo.demo import reproduce

    assert reproduce.alpacaeval_suite(tmp_path, None, steps=5) is None  # no folder of real samples: no real suite
    suite = reproduce.alpacaeval_suite(tmp_path, shared_data, steps=5)
    assert suite is not None
    train = suite.train[8][0].read_text().splitlines()
    held = suite.heldout.read_text().splitlines()
    assert len(held) == 64 and len(train) + len(held) == 269
    assert not {json.loads(x)["id"] for x in train} & {json.loads(x)["id"] for x in held}
    assert suite.train[2][1] == 2 and suite.train[4][1] == 4  # K-subsets by the packer's --max-k
