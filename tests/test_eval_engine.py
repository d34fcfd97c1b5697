"""`nemo-lpo eval` end to end on a tiny packed dataset with a randomly initialised tiny Mixtral."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nemo_lpo.demo import tasks

N_LISTS = 6


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> str:
    from nemo_lpo.data.pack import PackConfig, pack

    work = tmp_path_factory.mktemp("eval_data")
    src = work / "lists.jsonl"
    lines = (tasks.DATA_DIR / "heldout.jsonl").read_text().splitlines()[:N_LISTS]
    src.write_text("\n".join(lines) + "\n")
    prefix = str(work / "packed")
    pack(PackConfig(inputs=[str(src)], output_prefix=prefix, tokenizer="mistral", format="listwise"),
         log=lambda message: None)
    return prefix


@pytest.fixture(scope="module")
def checkpoints(packed, tmp_path_factory):
    """Two weights-only checkpoints (start, perturbed) and the per-response log-probs computed by hand."""
    from nemo_lpo.data import ListwiseDataset
    from nemo_lpo.evaluate.engine import dataset_logps
    from nemo_lpo.evaluate.run import build_model
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel
    from nemo_lpo.train.checkpoint import save_model_weights

    work = tmp_path_factory.mktemp("eval_ckpt")
    ds = ListwiseDataset(packed)
    initialize_parallel(seed=7)
    try:
        model = build_model("tiny-mixtral", None)
        save_model_weights(model, work / "start")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        save_model_weights(model, work / "moved")
        engine = dataset_logps(model, ds, micro_batch_size=4)
        # by hand: full logits, log-softmax, gather the response tokens of list 0
        item = ds[0]
        by_hand = []
        with torch.no_grad():
            for response in item["response_ids"]:
                seq = torch.tensor(np.concatenate([item["prompt_ids"], response]), dtype=torch.long)[None]
                t = seq.shape[1]
                causal = torch.ones(t, t, dtype=torch.bool).triu(1)[None, None]  # True = masked
                logits = model(input_ids=seq, position_ids=torch.arange(t)[None], attention_mask=causal).float()
                logp = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, seq[0, 1:, None])[:, 0]
                by_hand.append(float(logp[len(item["prompt_ids"]) - 1:].sum()))
    finally:
        destroy_parallel()
    return work, engine, by_hand


def test_engine_matches_hand_computed_logps(checkpoints, packed):
    _, engine, by_hand = checkpoints
    k = len(by_hand)
    assert engine.policy_logps.shape == (N_LISTS, 4) and engine.mask.all()
    np.testing.assert_allclose(engine.policy_logps[0, :k], by_hand, rtol=1e-5, atol=1e-4)
    first = json.loads((tasks.DATA_DIR / "heldout.jsonl").read_text().splitlines()[0])
    np.testing.assert_allclose(engine.rewards[0], [r["reward"] for r in first["responses"]], rtol=1e-6)
    assert (engine.lengths >= 2).all()  # at least one token + EOS


def test_policy_against_itself_is_chance(checkpoints, packed):
    from nemo_lpo.evaluate.run import evaluate_checkpoint

    work, _, _ = checkpoints
    out = evaluate_checkpoint(work / "start", packed, reference=work / "start", beta=0.1, preset="tiny-mixtral")
    assert out["implicit/accuracy"] == 0.5 and out["implicit/kendall_tau"] == 0.0
    assert out["lists"] == N_LISTS


def test_cli_eval_writes_json_and_table(checkpoints, packed, capsys):
    from nemo_lpo.cli import main
    from nemo_lpo.metrics import ranking_metrics

    work, engine, _ = checkpoints
    out_json = work / "eval.json"
    rc = main(["eval", str(work / "moved"), packed, "--reference", str(work / "start"), "--beta", "0.5",
               "--preset", "tiny-mixtral", "--json", str(out_json)])
    assert rc == 0
    got = json.loads(out_json.read_text())
    assert "pairwise accuracy" in capsys.readouterr().out
    np.testing.assert_allclose(got["logps/best"], np.mean(
        [engine.policy_logps[i, engine.rewards[i].argmax()] for i in range(N_LISTS)]), rtol=1e-6)
    # the implicit-reward metrics agree with the pure function on the engine's arrays and the start model's
    from nemo_lpo.data import ListwiseDataset
    from nemo_lpo.evaluate.engine import dataset_logps
    from nemo_lpo.evaluate.run import build_model
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(seed=1)
    try:
        ref = dataset_logps(build_model("tiny-mixtral", work / "start"), ListwiseDataset(packed)).policy_logps
    finally:
        destroy_parallel()
    want = ranking_metrics(torch.from_numpy(engine.policy_logps), torch.from_numpy(ref),
                           torch.from_numpy(engine.rewards.astype(np.float64)), torch.from_numpy(engine.mask), 0.5)
    assert got["implicit/accuracy"] == pytest.approx(want["implicit/accuracy"])
    assert got["implicit/kendall_tau"] == pytest.approx(want["implicit/kendall_tau"])
    assert got["reference"] == str(Path(work / "start"))


def test_cli_eval_missing_reference_is_a_clear_error(checkpoints, packed, capsys):
    from nemo_lpo.cli import main

    work, _, _ = checkpoints
    assert main(["eval", str(work / "moved"), packed]) == 1
    assert "no reference" in capsys.readouterr().err
