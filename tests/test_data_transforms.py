"""Reward transforms, --pairs / --max-k conversions and length limits, by hand and through pack."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nemo_lpo.data import ListwiseDataset
from nemo_lpo.data.examples import BAD_REWARD, InvalidRecord, ListwiseExample
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.data.transforms import LengthLimits, RewardTransform, limit_k, list_rng, to_pairs

FIXTURES = Path(__file__).parent / "fixtures" / "data"


def example(rewards):
    return ListwiseExample([{"role": "user", "content": "q"}], [f"r{k}" for k in range(len(rewards))],
                           list(rewards), "ex")


def test_reward_transforms_by_hand():
    assert RewardTransform("affine", scale=2.0, shift=-1.0)([0.0, 1.5]) == [-1.0, 2.0]
    assert RewardTransform("logodds", eps=0.01)([0.5, 0.0, 0.75]) == pytest.approx([0.0, math.log(0.01 / 0.99),
                                                                                    math.log(3.0)])
    assert RewardTransform("rank")([3.0, 1.0, 3.0, 2.0]) == [2.5, 0.0, 2.5, 1.0]
    with pytest.raises(InvalidRecord) as err:
        RewardTransform("logodds")([0.5, 1.5])
    assert err.value.reason == BAD_REWARD
    with pytest.raises(ValueError):
        RewardTransform("sqrt")


def test_pairs_by_hand():
    ex = example([1.0, 4.0, 2.0, 4.0, 0.5])
    one_vs_0, tied = to_pairs(ex, "1vs0", list_rng(0, 0))
    assert [p.responses for p in one_vs_0] == [["r1", "r0"], ["r1", "r2"], ["r1", "r4"]] and tied == 1
    assert [p.rewards for p in one_vs_0] == [[4.0, 1.0], [4.0, 2.0], [4.0, 0.5]]
    everything, tied = to_pairs(ex, "all", list_rng(0, 0))
    assert len(everything) == 9 and tied == 1
    assert all(p.rewards[0] > p.rewards[1] for p in everything)
    picks = {to_pairs(ex, "zephyr", list_rng(seed, 7))[0][0].responses[1] for seed in range(30)}
    assert picks == {"r0", "r2", "r4"}  # random, but never the tied best r3
    assert to_pairs(ex, "zephyr", list_rng(5, 7))[0][0].id == to_pairs(ex, "zephyr", list_rng(5, 7))[0][0].id
    assert to_pairs(example([2.0, 2.0]), "zephyr", list_rng(0, 0)) == ([], 1)


def test_max_k_keeps_best_and_order():
    ex = example([0.1, 0.9, 0.3, 0.5, 0.2, 0.0])
    kept = [limit_k(ex, 3, list_rng(seed, 0)) for seed in range(20)]
    assert all(len(k.responses) == 3 and "r1" in k.responses for k in kept)
    assert all(k.responses == sorted(k.responses) for k in kept)  # original order kept
    assert len({tuple(k.responses) for k in kept}) > 1
    assert limit_k(ex, 6, list_rng(0, 0)) is ex


def test_length_limits_by_hand():
    bos, prompt, responses = 1, [1, 10, 11, 12, 13], [[20, 21, 2], [30, 2]]
    assert LengthLimits(max_prompt_length=3).apply(prompt, responses, bos) == ([1, 12, 13], responses, 1, 0)
    assert LengthLimits(max_response_length=2).apply(prompt, responses, bos) == (prompt, [[20, 21], [30, 2]], 0, 1)
    assert LengthLimits(max_length=6).apply(prompt, responses, bos) == ([1, 12, 13], responses, 1, 0)
    assert LengthLimits(max_length=7, overflow="truncate_response").apply(prompt, responses, bos) == \
        (prompt, [[20, 21], [30, 2]], 0, 1)
    assert LengthLimits(max_length=7, overflow="drop").apply(prompt, responses, bos) is None
    assert LengthLimits(max_length=4).apply(prompt, responses, bos) is None  # no room for BOS + 1 prompt token
    assert LengthLimits(max_length=8).apply(prompt, responses, bos) == (prompt, responses, 0, 0)


def pack_fixture(tmp_path, name, **kwargs):
    prefix = tmp_path / name
    manifest = pack(PackConfig(inputs=[str(FIXTURES / "listwise_messages.jsonl")], output_prefix=str(prefix),
                               **kwargs), log=lambda m: None)
    return ListwiseDataset(prefix), manifest


def test_pack_pairs_and_max_k(tmp_path):
    records = [json.loads(line) for line in (FIXTURES / "listwise_messages.jsonl").open()]
    ds, manifest = pack_fixture(tmp_path, "1vs0", pairs="1vs0")
    assert len(ds) == sum(len(r["responses"]) - 1 for r in records) == manifest["counts"]["lists_written"]
    assert manifest["counts"]["lists_kept"] == 3 and manifest["stats"]["k_histogram"] == {"2": len(ds)}
    assert all(ds[i]["rewards"][0] > ds[i]["rewards"][1] for i in range(len(ds)))
    first = ds[0]
    assert first["rewards"].tolist() == [1.0, -1.0]
    ds_z, _ = pack_fixture(tmp_path, "z", pairs="zephyr", seed=3)
    ds_z2, _ = pack_fixture(tmp_path, "z2", pairs="zephyr", seed=3)
    assert len(ds_z) == 3
    assert [ds_z[i]["rewards"].tolist() for i in range(3)] == [ds_z2[i]["rewards"].tolist() for i in range(3)]
    picks = set()
    for seed in range(8):
        z, _ = pack_fixture(tmp_path, f"s{seed}", pairs="zephyr", seed=seed)
        picks.add(tuple(z[1]["rewards"].tolist()))
    assert len(picks) > 1  # the "other" response depends on the seed
    ds_k, manifest = pack_fixture(tmp_path, "k3", max_k=3, reward_transform=RewardTransform("rank"))
    assert manifest["stats"]["k_histogram"] == {"2": 1, "3": 2}
    assert manifest["options"]["reward_transform"]["kind"] == "rank" and manifest["options"]["max_k"] == 3
    assert 2.0 in ds_k[1]["rewards"].tolist()  # the best (rank K-1 = 2) is always kept


def test_pack_truncation_counts(tmp_path):
    plain, _ = pack_fixture(tmp_path, "plain")
    prompt_lengths = [len(plain[i]["prompt_ids"]) for i in range(len(plain))]
    response_lengths = [len(r) for i in range(len(plain)) for r in plain[i]["response_ids"]]
    ds, manifest = pack_fixture(tmp_path, "t", limits=LengthLimits(max_prompt_length=8, max_response_length=5))
    counts = manifest["counts"]
    assert counts["prompts_truncated"] == sum(n > 8 for n in prompt_lengths) > 0
    assert counts["responses_truncated"] == sum(n > 5 for n in response_lengths) > 0
    for i in range(len(ds)):
        item = ds[i]
        assert len(item["prompt_ids"]) <= 8 and item["prompt_ids"][0] == 1  # BOS kept
        assert all(len(r) <= 5 for r in item["response_ids"])
    limit = sorted(prompt_lengths)[1]  # drops the lists with the longest prompt(s)
    _, dropped = pack_fixture(tmp_path, "d", limits=LengthLimits(max_prompt_length=limit, overflow="drop"))
    too_long = sum(n > limit for n in prompt_lengths)
    assert too_long > 0 and dropped["counts"]["skipped"] == {"too_long": too_long}
    assert dropped["counts"]["lists_written"] == len(plain) - too_long
    mixed = np.concatenate([ds[0]["prompt_ids"], ds[0]["response_ids"][0]])
    assert mixed.dtype == np.int32
