"""Validation during training (``data.valid_prefix``), ``checkpoint.keep_best`` and the end-of-run summary.

One process: a 3-step run of the tiny Mixtral validating after every step; its final ``val/`` metrics must equal
what ``nemo-lpo eval`` reports on the same checkpoint and lists (eval runs its own single-process forward and
recomputes the reference from the starting weights; validation used the sidecar of ``nemo-lpo ref-logps``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.dist.train_common import DEMO_LISTS, TINY_CONF, metrics_lines, pack_lists

HELDOUT = DEMO_LISTS.parent / "heldout.jsonl"
N_VALID = 5  # lists packed into the validation set
EVAL_LISTS = 4  # the cap: validation uses the first 4
STEPS = 3


def overrides(root: Path, run: str, *extra: str) -> list[str]:
    return [f"data.train_prefix={root / 'train'}", f"data.valid_prefix={root / 'valid'}",
            f"model.init_checkpoint={root / 'start'}", "data.global_batch_size=4", "data.micro_batch_size=2",
            "reference.mode=precomputed", f"train.max_steps={STEPS}", "train.eval_interval=1",
            f"train.eval_lists={EVAL_LISTS}", "optim.lr=1e-2", "optim.warmup_steps=0", "loss.type=lpo_abs",
            "checkpoint.save_interval=null", "checkpoint.keep_last=1", "checkpoint.resume=false",
            f"logging.run_dir={root / run}", "logging.tensorboard=false", *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Packed train (8 lists) and valid (5) sets, seeded start weights, sidecars of both from `ref-logps`."""
    from nemo_lpo.cli import main
    from nemo_lpo.demo.pipeline import save_start_weights

    root = tmp_path_factory.mktemp("validation")
    pack_lists(DEMO_LISTS, root / "train", 8)
    pack_lists(HELDOUT, root / "valid", N_VALID)
    save_start_weights(root / "start", 1234)
    assert main(["ref-logps", str(TINY_CONF), *overrides(root, "ref")]) == 0  # one command: both prefixes
    return root


@pytest.fixture(scope="module")
def trained(work) -> tuple[Path, dict]:
    """A 3-step run that keeps its best val/implicit/accuracy checkpoint; returns (run folder, summary)."""
    from nemo_lpo.config import load_config
    from nemo_lpo.train.loop import train

    train(load_config(TINY_CONF, overrides(work, "run", "checkpoint.keep_best=val/loss")))
    return work / "run", json.loads((work / "run" / "summary.json").read_text())


def test_ref_logps_covers_the_validation_prefix(work):
    from nemo_lpo.data import ListwiseDataset

    assert ListwiseDataset(work / "train").has_ref_logps and ListwiseDataset(work / "valid").has_ref_logps


def test_validation_runs_at_start_every_interval_and_at_the_end(trained):
    run, _ = trained
    lines = metrics_lines(run / "metrics.jsonl")
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert "loss" not in lines[0] and "val/loss" in lines[0]  # step 0: validation only
    for line in lines:
        assert line["val/lists"] == EVAL_LISTS  # the cap
    # before any step the policy is its own reference: every implicit reward is 0, a coin flip in eval's terms
    assert lines[0]["val/implicit/accuracy"] == 0.5 and lines[0]["val/rewards/margins"] == 0.0
    assert abs(lines[0]["val/loss"] - lines[1]["val/loss"]) > 1e-6  # the policy moved (lr 1e-2)


def test_validation_equals_nemo_lpo_eval(work, trained):
    from nemo_lpo.data import ListwiseDataset
    from nemo_lpo.evaluate.run import evaluate_checkpoint

    run, _ = trained
    final = metrics_lines(run / "metrics.jsonl")[-1]
    # the same lists as a packed set of their own: the first EVAL_LISTS of valid
    pack_lists(HELDOUT, work / "valid_head", EVAL_LISTS)
    assert len(ListwiseDataset(work / "valid_head")) == EVAL_LISTS
    ckpt = run / "checkpoints" / f"step_{STEPS:07d}"
    result = evaluate_checkpoint(ckpt, work / "valid_head", reference=work / "start")
    keys = [k for k in result if isinstance(result[k], int | float) and k != "beta"]
    assert {"loss", "rewards/accuracies", "rewards/margins", "implicit/kendall_tau", "implicit/ndcg", "logps/best",
            "logps/worst"} <= set(keys)
    for key in keys:
        got, want = final[f"val/{key}"], result[key]
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4), (key, got, want)


def test_keep_best_keeps_the_step_with_the_lowest_val_loss(trained):
    run, summary = trained
    lines = metrics_lines(run / "metrics.jsonl")
    want = min(lines[1:], key=lambda line: line["val/loss"])  # step 0 is the starting weights, not a candidate
    best = json.loads((run / "checkpoints" / "best.json").read_text())
    assert best["step"] == want["step"] and best["value"] == pytest.approx(want["val/loss"])
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    # keep_last=1 keeps the final step; the best survives beside it
    assert kept == sorted({f"step_{STEPS:07d}", f"step_{want['step']:07d}"})
    assert summary["checkpoints"]["keep_best"]["step"] == want["step"]


def test_end_summary(trained, capsys):
    run, summary = trained
    lines = metrics_lines(run / "metrics.jsonl")
    assert summary["steps"] == {"start": 0, "end": STEPS, "run": STEPS}
    assert summary["tokens"] == sum(line["tokens"] for line in lines[1:])
    assert summary["validation"]["final"]["step"] == STEPS
    assert summary["validation"]["final"]["metrics"]["val/loss"] == pytest.approx(lines[-1]["val/loss"])
    best_loss = summary["validation"]["best"]["val/loss"]
    assert best_loss["value"] == pytest.approx(min(line["val/loss"] for line in lines))
    assert summary["checkpoints"]["latest"].endswith(f"step_{STEPS:07d}")
    from nemo_lpo.train.summary import print_summary

    print_summary(summary)
    out = capsys.readouterr().out
    assert f"run summary: steps 0 -> {STEPS} ({STEPS} run)" in out and "tokens/s" in out
    assert "validation lists: first vs final validation" in out
    assert f"best checkpoint:   {summary['checkpoints']['keep_best']['checkpoint']}" in out
