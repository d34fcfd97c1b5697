"""The reproduce suite's SFT warm start on the real trainer (a few lists, a few steps).

``sft`` from the seeded start, then DPO and LPO-abs from the SFT checkpoint with it as their reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from nemo_lpo.io import atomic_write

N_LISTS = 8  # = the demo's global batch: every step sees every list, so step-1 values are dataset means


def _lines(path):
    return [json.loads(line) for line in open(path) if line.strip()]


def _best(engine, values):
    """Per list, ``values`` at the best response (highest reward, lowest slot on ties)."""
    rewards = np.where(engine.mask, engine.rewards, -np.inf)
    return values[np.arange(len(rewards)), rewards.argmax(axis=1)]


@pytest.mark.slow
def test_warm_start_trains_sft_then_dpo_and_lpo_abs_from_it(tmp_path):
    from nemo_lpo.data import ListwiseDataset
    from nemo_lpo.demo import reproduce, tasks
    from nemo_lpo.demo.config import DemoConfig
    from nemo_lpo.demo.pipeline import save_start_weights, write_sidecar
    from nemo_lpo.evaluate.engine import dataset_logps
    from nemo_lpo.evaluate.run import build_model, evaluate_checkpoint, resolve_checkpoint
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel

    splits = tasks.generate()
    train, held = tmp_path / "src" / "train_k4.jsonl", tmp_path / "src" / "heldout_k8.jsonl"
    atomic_write(train, tasks.to_jsonl(tasks.subset_lists(splits["train"], 4)[:N_LISTS]))
    atomic_write(held, tasks.to_jsonl(tasks.subset_lists(splits["heldout"], 8)[:N_LISTS]))
    suite = reproduce.Suite("tiny", {4: (train, None)}, train, held, steps=2, sft_steps=3)
    out, cfg = tmp_path / "out", DemoConfig(out_dir=tmp_path / "out", steps=2)
    pairs = reproduce._pack(train, out / "data" / "train_pairs", suite, pairs="zephyr")
    reproduce._pack(train, out / "data" / "train_k4", suite)
    held_prefix = reproduce._pack(held, out / "data" / "heldout_k8", suite)
    save_start_weights(out / "start", cfg.seed)
    write_sidecar(cfg, pairs, out / "start", out / "runs" / "ref")
    start = evaluate_checkpoint(out / "start", held_prefix, reference=out / "start", preset="tiny-mixtral")

    warm = reproduce.warm_start(suite, out, held_prefix, start["_policy_logps"], cfg)

    sft_ckpt = resolve_checkpoint(out / "runs" / "sft" / "checkpoints")
    initialize_parallel(seed=1)
    try:  # the start's and the SFT model's log-probs of the training pairs, by the evaluator
        ds = ListwiseDataset(pairs)
        at_start = dataset_logps(build_model("tiny-mixtral", out / "start"), ds)
        at_sft = dataset_logps(build_model("tiny-mixtral", sft_ckpt), ds)
    finally:
        destroy_parallel()
    sft_lines = _lines(warm["sft"]["metrics"])
    assert [line["step"] for line in sft_lines] == [1, 2, 3]
    # step 1 of `sft`: the mean over the lists of -log π_start(best) / len(best)
    nll = -_best(at_start, at_start.policy_logps) / _best(at_start, at_start.lengths)
    assert sft_lines[0]["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert sft_lines[-1]["loss"] < sft_lines[0]["loss"]  # the same 8 lists each step: the NLL goes down
    assert warm["sft"]["loss"] == "sft" and warm["sft_steps"] == 3
    for run in ("dpo_pairs_sft", "lpo_abs_k4_sft"):
        entry = warm["runs"][run]
        first = _lines(entry["metrics"])[0]
        # the run starts from the SFT weights, and they are its reference: every implicit reward is 0 at step 1
        assert first["rewards/chosen"] == 0.0 and first["rewards/margins"] == 0.0
        assert first["logps/chosen"] == pytest.approx(_best(at_sft, at_sft.policy_logps).mean(), rel=1e-5)
        assert entry["heldout"]["reference"] == str(sft_ckpt) and entry["heldout"]["lists"] == N_LISTS
    assert warm["runs"]["dpo_pairs_sft"]["loss"] == "dpo" and warm["runs"]["lpo_abs_k4_sft"]["loss"] == "lpo_abs"
