"""``nemo-lpo generate`` and ``score`` on tiny local models (CPU): seeds, EOS / truncation, DP, resume, rewards."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForSequenceClassification

from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.onpolicy import shards
from nemo_lpo.onpolicy.engines import SamplingSettings, split_at_eos
from nemo_lpo.onpolicy.generate import GenerateConfig, generate, resolve_seed
from nemo_lpo.onpolicy.score import ScoreConfig, ScoreError, score
from tests.onpolicy_fixtures import PROMPTS, build_policy, build_reward_model, tiny_tokenizer, write_prompts
from tests.torchrun import run_torchrun

REPO = Path(__file__).resolve().parents[1]
K, MAX_NEW, BATCH = 4, 8, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("onpolicy")
    tok = tiny_tokenizer(root / "tok")
    vocab = len(AutoTokenizer.from_pretrained(tok))
    return {"tok": str(tok), "policy": str(build_policy(root / "policy", vocab)), "vocab": vocab,
            "prompts": str(write_prompts(root / "prompts.jsonl")), "root": root}


def _cfg(models, out, seed=7, **sampling) -> GenerateConfig:
    settings = SamplingSettings(**{"k": K, "max_new_tokens": MAX_NEW, "seed": seed, "prompts_per_batch": BATCH, **sampling})
    return GenerateConfig(model=models["policy"], prompts=models["prompts"], out=str(out), sampling=settings,
                          tokenizer=models["tok"], progress=False)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(models):
    out = models["root"] / "gen_seed7.jsonl"
    generate(_cfg(models, out))
    return out


def test_eos_cut_and_truncation_marked():
    assert split_at_eos([5, 9, 2, 7, 2], eos_id=2, max_new_tokens=5).__dict__ == {"ids": [5, 9], "finish_reason": "stop"}
    assert split_at_eos([5, 9, 7], eos_id=2, max_new_tokens=3).__dict__ == {"ids": [5, 9, 7], "finish_reason": "length"}


def test_k_responses_each_ending_in_eos_or_truncated(generated, models):
    records = _records(generated)
    assert [r["id"] for r in records] == [p["id"] for p in PROMPTS] and [r["index"] for r in records] == list(range(6))
    tok = AutoTokenizer.from_pretrained(models["tok"])
    reasons = []
    for record in records:
        assert len(record["responses"]) == K
        for response in record["responses"]:
            reasons.append(response["finish_reason"])
            assert response["truncated"] == (response["finish_reason"] == "length")
            if response["truncated"]:
                assert response["num_tokens"] == MAX_NEW
            else:
                assert response["num_tokens"] < MAX_NEW
            assert tok.eos_token not in response["text"]
    assert {"stop", "length"} <= set(reasons), reasons  # the policy stops at EOS often, not always
    meta = json.loads(shards.meta_path(generated).read_text())
    assert meta["sampling"] == {"k": K, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": MAX_NEW, "seed": 7,
                                "prompts_per_batch": BATCH}
    assert meta["generator"]["engine"] == "hf"


def test_sampling_reproducible_with_seed_and_different_without(generated, models):
    again = models["root"] / "gen_seed7_again.jsonl"
    generate(_cfg(models, again))
    assert again.read_bytes() == generated.read_bytes()
    fresh = [models["root"] / f"gen_fresh{i}.jsonl" for i in range(2)]
    for path in fresh:
        generate(_cfg(models, path, seed=resolve_seed(None)))
    texts = [[r["text"] for rec in _records(p) for r in rec["responses"]] for p in (generated, *fresh)]
    assert texts[0] != texts[1] and texts[1] != texts[2]


def test_finished_output_is_reused_and_changed_settings_are_not(generated, models):
    assert generate(_cfg(models, generated)) is None  # complete with these settings: nothing redone
    out = models["root"] / "gen_topp.jsonl"
    generate(_cfg(models, out, top_p=0.5))
    assert out.read_bytes() != generated.read_bytes()


def test_two_ranks_give_the_same_file_as_one(generated, models):
    out = models["root"] / "gen_dp2.jsonl"
    run_torchrun(REPO / "nemo_lpo" / "cli.py", 2, "generate", "--model", models["policy"], "--prompts",
                 models["prompts"], "--out", str(out), "--k", str(K), "--max-new-tokens", str(MAX_NEW), "--seed", "7", "--prompts-per-batch", str(BATCH),
                 "--tokenizer", models["tok"], "--no-progress", timeout=300)
    assert out.read_bytes() == generated.read_bytes()
    assert json.loads(shards.meta_path(out).read_text())["world_size"] == 2
    assert not shards.parts_dir(out).exists()


def test_kill_mid_generation_resumes_without_duplicates(generated, models):
    out = models["root"] / "gen_killed.jsonl"
    cmd = [sys.executable, "-m", "nemo_lpo.cli", "generate", "--model", models["policy"], "--prompts",
           models["prompts"], "--out", str(out), "--k", str(K), "--max-new-tokens", str(MAX_NEW), "--seed", "7", "--prompts-per-batch", str(BATCH),
           "--tokenizer", models["tok"], "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEMO_LPO_TEST_KILL_AT": "generate/after_prompt#3",
           "NEMO_LPO_CRASH_TEST": "1"}
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert not out.exists()
    (part,) = shards.parts_dir(out).glob("part-*.jsonl")
    assert len(part.read_text().splitlines()) == 3
    with part.open("ab") as f:  # a line torn by a kill mid-write is cut off on restart
        f.write(b'{"index": 3, "id": "p3", "messages": [')
    resumed = generate(_cfg(models, out))  # the same command again (in this process: one start-up less)
    assert (resumed["sampled"], resumed["resumed"]) == (3, 3)
    assert out.read_bytes() == generated.read_bytes()


def test_resume_with_other_settings_is_refused(models):
    out = models["root"] / "gen_mixed.jsonl"
    shards.check_settings(out, {"sampling": {"seed": 1}}, rank=0)
    with pytest.raises(shards.ShardError, match="other settings"):
        generate(_cfg(models, out))


def _hand_score(model: LlamaForSequenceClassification, tok, text: str) -> float:
    """The score head on the last token's final hidden state, one unpadded sequence."""
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
        return float(model.score(hidden)[0])


def test_reward_model_matches_a_hand_computed_score(generated, models):
    rm_dir = models["root"] / "rm"
    model = build_reward_model(rm_dir, models["vocab"])
    tok = AutoTokenizer.from_pretrained(models["tok"])
    tok.save_pretrained(rm_dir)
    out = models["root"] / "scored_rm.jsonl"
    meta = score(ScoreConfig(generated=str(generated), out=str(out), reward_model=str(rm_dir), batch_size=3,
                             progress=False))
    assert meta["reward"]["kind"] == "model" and meta["sampling"]["seed"] == 7
    for record in _records(out):
        prompt = record["messages"][0]["content"]
        for response in record["responses"]:
            text = f"<s><|user|>\n{prompt}\n<|assistant|>\n{response['text']}</s>\n"
            assert response["reward"] == pytest.approx(_hand_score(model, tok, text), abs=1e-5)


def length_reward(prompt: str, response: str) -> float:
    """A rule-based reward for the tests: the response's length in characters."""
    return float(len(response))


def raising_reward(prompt: str, response: str) -> float:
    """Raises on the third prompt."""
    if prompt == "Name a colour.":
        raise ValueError("cannot judge colours")
    return 1.0


def nan_reward(prompt: str, response: str) -> float:
    """NaN on two prompts."""
    return math.nan if prompt in ("Say hello.", "Spell cat.") else 0.5


def test_scored_lists_feed_pack_unchanged(generated, models):
    out = models["root"] / "scored_fn.jsonl"
    score(ScoreConfig(generated=str(generated), out=str(out), reward_fn="tests.test_onpolicy:length_reward",
                      progress=False))
    records = _records(out)
    assert all(r["reward"] == len(r["text"]) for rec in records for r in rec["responses"])
    meta = json.loads(shards.meta_path(out).read_text())
    assert meta["reward"] == {"kind": "function", "function": "tests.test_onpolicy:length_reward"}
    assert meta["generator"]["engine"] == "hf" and meta["sampling"]["k"] == K
    manifest = pack(PackConfig(inputs=[str(out)], output_prefix=str(models["root"] / "packed" / "train"),
                               tokenizer=models["tok"], skip_invalid=True), log=lambda m: None)
    usable = sum(sum(bool(r["text"].strip()) for r in rec["responses"]) >= 2 for rec in records)
    assert manifest["counts"]["lists_read"] == len(PROMPTS) and manifest["counts"]["lists_written"] == usable
    assert usable >= len(PROMPTS) - 1  # empty responses (EOS first) are the only thing pack drops here


def test_raising_reward_function_names_the_prompt(generated, models):
    out = models["root"] / "scored_raise.jsonl"
    with pytest.raises(ScoreError, match=r"gen_seed7.jsonl:3 \(prompt id 'p2'\).*raised ValueError: cannot judge"):
        score(ScoreConfig(generated=str(generated), out=str(out), reward_fn="tests.test_onpolicy:raising_reward",
                          progress=False))
    assert not out.exists()


def test_nan_rewards_are_reported_per_prompt_never_written(generated, models):
    out = models["root"] / "scored_nan.jsonl"
    with pytest.raises(ScoreError, match=r"(?s)2 prompt\(s\).*prompt id 'p1'.*response 0 reward nan.*prompt id 'p4'"):
        score(ScoreConfig(generated=str(generated), out=str(out), reward_fn="tests.test_onpolicy:nan_reward",
                          progress=False))
    assert not out.exists()
    written = shards.done_records(out)
    assert sorted(written) == [0, 2, 3, 5]  # the good prompts are kept for a resume; the bad ones are not written
    dropped = models["root"] / "scored_nan_dropped.jsonl"
    meta = score(ScoreConfig(generated=str(generated), out=str(dropped), reward_fn="tests.test_onpolicy:nan_reward",
                             on_bad_reward="drop", progress=False))
    assert meta["dropped_rewards_per_prompt"] == {"p1": K, "p4": K}
    assert all(math.isfinite(r["reward"]) for rec in _records(dropped) for r in rec["responses"])
