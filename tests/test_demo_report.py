"""The reproduce report: figures and plain verdicts from synthetic runs; LPO(preference) vs DPO bit check."""

from __future__ import annotations

import json
from types import SimpleNamespace

from nemo_lpo.demo import report


def _metrics(path, chosen):
    path.write_text("".join(json.dumps({"step": i + 1, "loss": 0.5, "logps/chosen": v}) + "\n"
                            for i, v in enumerate(chosen)))
    return str(path)


def _results(tmp_path, dpo_chosen, lpo_abs_chosen, acc):
    runs = {"dpo_pairs": {"metrics": _metrics(tmp_path / "dpo.jsonl", dpo_chosen)},
            "lpo_pref_pairs": {"metrics": _metrics(tmp_path / "lpo_pref.jsonl", dpo_chosen)}}
    for k, (a, b) in acc.items():
        runs[f"lpo_k{k}"] = {"metrics": _metrics(tmp_path / f"lpo{k}.jsonl", [0.0]),
                             "heldout": {"implicit/accuracy": a, "implicit/kendall_tau": 2 * a - 1}}
        runs[f"lpo_abs_k{k}"] = {"metrics": _metrics(tmp_path / f"abs{k}.jsonl", lpo_abs_chosen),
                                 "heldout": {"implicit/accuracy": b, "implicit/kendall_tau": 2 * b - 1}}
    return {"suite": "synthetic", "steps": 20, "seconds": 1.0, "runs": runs,
            "start": {"implicit/accuracy": 0.5},
            "table1": {"steps": 20, "steps_identical": 20, "tensors": 10, "tensors_identical": 10,
                       "loss_function": {"lists": 32, "differing_bits_lists": 0}}}


def test_report_states_where_the_effect_shows(tmp_path):
    res = _results(tmp_path, dpo_chosen=[-10.0 - 0.5 * i for i in range(20)],
                   lpo_abs_chosen=[-10.0 + 0.5 * i for i in range(20)],
                   acc={2: (0.55, 0.56), 4: (0.6, 0.62), 8: (0.58, 0.7)})
    res["figures"] = [str(p) for p in report.draw_figures(res, tmp_path / "fig")]
    assert all((tmp_path / "fig" / n).is_file() for n in ("figure1_chosen_logps.png", "figure2_accuracy_vs_k.png"))
    path = report.write_report([res], tmp_path / "report.md", total_seconds=12.0,
                               demo_cfg=SimpleNamespace(seed=1, beta=0.1, lr=1e-3, global_batch_size=8))
    text = path.read_text()
    assert "shows the paper's effect" in text and "Equal to the last bit." in text
    assert "LPO: accuracy does NOT grow monotonically" in text  # 0.6 -> 0.58 at K=8
    assert "LPO-abs: accuracy grows monotonically" in text
    assert "](fig/figure1_chosen_logps.png)" in text  # figure links relative to the report
    trend = report.chosen_trend(res["runs"]["dpo_pairs"]["metrics"])
    assert trend["change"] < 0 and trend["first"] == -10.5  # mean of the first 3 of 20 steps: -10, -10.5, -11


def test_report_says_when_the_effect_is_absent(tmp_path):
    res = _results(tmp_path, dpo_chosen=[-10.0 + i for i in range(20)], lpo_abs_chosen=[-10.0 + i for i in range(20)],
                   acc={2: (0.5, 0.5), 4: (0.5, 0.5), 8: (0.5, 0.5)})
    res["table1"]["steps_identical"] = 19
    res["figures"] = [str(p) for p in report.draw_figures(res, tmp_path)]
    text = report.write_report([res], tmp_path / "r.md", 1.0,
                               SimpleNamespace(seed=1, beta=0.1, lr=1e-3, global_batch_size=8)).read_text()
    assert "does NOT show the paper's effect" in text and "DPO's chosen log-likelihood rises too" in text
    assert "NOT bit-identical" in text


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

    suite = reproduce.alpacaeval_suite(tmp_path, steps=5)
    assert suite is not None
    train = suite.train[8][0].read_text().splitlines()
    held = suite.heldout.read_text().splitlines()
    assert len(held) == 64 and len(train) + len(held) == 269
    assert not {json.loads(x)["id"] for x in train} & {json.loads(x)["id"] for x in held}
    assert suite.train[2][1] == 2 and suite.train[4][1] == 4  # K-subsets by the packer's --max-k
