"""The embedded default dataset: byte-identical regeneration and independently recomputed rewards."""

from __future__ import annotations

import functools
import json
import re

import pytest

from nemo_lpo.demo import tasks


def _load(name):
    with open(tasks.DATA_DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _edit_distance(a, b):
    # a second, recursive implementation (memoised) so the generator's own is not trusted
    @functools.cache
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


def _truth(prompt):
    if m := re.fullmatch(r"What is (\d+) \+ (\d+)\?", prompt):
        return int(m[1]) + int(m[2])
    if m := re.fullmatch(r"What is (\d+) \* (\d+)\?", prompt):
        return int(m[1]) * int(m[2])
    if m := re.fullmatch(r"Reverse the letters of '(\w+)'\.", prompt):
        return m[1][::-1]
    if m := re.fullmatch(r"Write '(\w+)' in uppercase\.", prompt):
        return m[1].upper()
    if m := re.fullmatch(r"Sort the letters of '(\w+)' alphabetically\.", prompt):
        return "".join(sorted(m[1]))
    raise AssertionError(f"unexpected prompt {prompt!r}")


def test_regeneration_is_byte_identical(tmp_path):
    tasks.write_files(tmp_path)
    for name in tasks.FILES:
        assert (tmp_path / name).read_bytes() == (tasks.DATA_DIR / name).read_bytes(), name


def test_other_seed_gives_other_data():
    assert tasks.render_files(seed=1)["train.jsonl"] != (tasks.DATA_DIR / "train.jsonl").read_bytes()


@pytest.mark.parametrize("name", sorted(tasks.FILES))
def test_rewards_are_correct_and_graded(name):
    split, k = tasks.FILES[name]
    lists = _load(name)
    assert len(lists) == (tasks.NUM_TRAIN if split == "train" else tasks.NUM_HELDOUT)
    for item in lists:
        truth = _truth(item["prompt"])
        texts = [r["text"] for r in item["responses"]]
        assert len(texts) == k and len(set(texts)) == k, item["id"]  # K distinct candidates
        assert texts.count(str(truth)) == 1, item["id"]
        for r in item["responses"]:
            if isinstance(truth, int):
                expected = max(0.0, 1 - abs(int(r["text"]) - truth) / max(abs(truth), 10))
            else:
                expected = 1 - _edit_distance(r["text"], truth) / max(len(r["text"]), len(truth))
            assert r["reward"] == pytest.approx(expected, abs=5e-5), (item["id"], r)
            assert (r["reward"] == 1.0) == (r["text"] == str(truth))
    # the best answer is not always in the same slot
    slots = {[r["reward"] for r in item["responses"]].index(1.0) for item in lists}
    assert len(slots) > 1


def test_splits_are_nested_and_disjoint():
    train4, train8 = _load("train.jsonl"), _load("train_k8.jsonl")
    for a, b in zip(train4, train8, strict=True):
        assert a["prompt"] == b["prompt"]
        assert all(r in b["responses"] for r in a["responses"])
    k2 = tasks.subset_lists(tasks.generate()["train"], 2)
    for a, b in zip(k2, train4, strict=True):
        assert len(a["responses"]) == 2 and all(r in b["responses"] for r in a["responses"])
        assert max(r["reward"] for r in a["responses"]) == 1.0
    held = {x["prompt"] for x in _load("heldout.jsonl")}
    assert not held & {x["prompt"] for x in train4}
    held_words = {re.search(r"'(\w+)'", p)[1] for p in held if "'" in p}
    train_words = {re.search(r"'(\w+)'", x["prompt"])[1] for x in train4 if "'" in x["prompt"]}
    assert held_words and not held_words & train_words
    assert {x["task"] for x in train4} == set(tasks.TASKS)


def test_texts_are_short():
    for item in _load("train_k8.jsonl"):
        assert len(item["prompt"]) <= 60
        assert all(len(r["text"]) <= 12 for r in item["responses"])


def test_reward_helpers_hand_worked():
    assert tasks.levenshtein("kitten", "sitting") == 3
    assert tasks.word_reward("tenalp", "tenalp") == 1.0
    assert tasks.word_reward("tenapl", "tenalp") == round(1 - 2 / 6, 4)
    assert tasks.number_reward(19, 20) == 0.95
    assert tasks.number_reward(7, 8) == 0.9  # small truths are scaled by 10, not by 8
    assert tasks.number_reward(100, 20) == 0.0
