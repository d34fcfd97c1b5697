"""`nemo-lpo demo` end to end with a reduced step count (pack, reference, eval, train, eval, plots, HF export)."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    from nemo_lpo.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "step 4/4" in printed  # the trainer's progress line of every step
    assert "ranking accuracy" in printed and str(out / "hf") in printed
    # the two tables name their lists: the run summary's validation (16) and the demo's held-out table (64)
    assert "all 64 held-out lists" in printed and "the first 16 of 64 lists (train.eval_lists)" in printed

    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["heldout_before"], summary["heldout_after"]
    assert before["lists"] == after["lists"] == 64
    assert before["implicit/accuracy"] == 0.5  # the policy is its own reference before training
    assert after["implicit/accuracy"] != 0.5  # four steps moved the policy away from it
    assert before["logps/best"] != after["logps/best"]

    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3, 4]  # step 0: the validation of the starting weights
    assert all("logps/chosen" in m and "rewards/accuracies" in m for m in metrics[1:])
    assert [m["step"] for m in metrics if "val/loss" in m] == [0, 4] and metrics[-1]["val/lists"] == 16
    for name in ("loss.png", "rewards_accuracies.png", "logps.png"):
        assert (out / "plots" / name).read_bytes()[:4] == b"\x89PNG"

    hf = out / "hf"
    config = json.loads((hf / "config.json").read_text())
    assert config["num_local_experts"] == 4 and config["vocab_size"] == 32000
    assert list(hf.glob("*.safetensors")) and (hf / "tokenizer.model").is_file()


def test_demo_missing_input_is_a_clear_error(tmp_path, capsys):
    from nemo_lpo.cli import main

    assert main(["demo", "--out", str(tmp_path), "--train-file", str(tmp_path / "nope.jsonl")]) == 1
    assert "nope.jsonl: file not found" in capsys.readouterr().out
