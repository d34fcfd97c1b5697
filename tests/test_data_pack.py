"""Pack → ListwiseDataset on the real AlpacaEval K=8 lists with the real Mistral tokenizer."""

import gzip
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nemo_lpo.batch.collate import ListwiseCollator
from nemo_lpo.data import ListwiseDataset, write_reference_logps
from nemo_lpo.data.pack import PackConfig, _Reader, pack
from nemo_lpo.data.readers import read_listwise
from nemo_lpo.data.templates import MistralChatTokenizer
from nemo_lpo.data.transforms import RewardTransform, limit_k, list_rng, to_pairs

ALPACA = "alpacaeval2/alpacaeval2_gpt4turbo_k8_a.jsonl"


def head(src: Path, dst: Path, n: int) -> Path:
    with open(src, "rb") as f:
        dst.write_bytes(b"".join(line for _, line in zip(range(n), f, strict=False)))
    return dst


@pytest.fixture(scope="module")
def mistral():
    return MistralChatTokenizer()


@pytest.fixture(scope="module")
def alpaca(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("alpaca")
    src = head(shared_data / ALPACA, tmp / "alpaca.jsonl", 12)
    prefix = tmp / "packed" / "alpaca"
    manifest = pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix),
                               reward_transform=RewardTransform("logodds", eps=1e-6)), log=lambda m: None)
    return src, prefix, manifest


def files_of(prefix: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(prefix.parent.iterdir()) if p.name.startswith(prefix.name)}


def test_round_trip_rewards_and_counts(alpaca, mistral):
    src, prefix, manifest = alpaca
    records = [json.loads(line) for line in src.read_text().splitlines()]
    ds = ListwiseDataset(prefix)
    assert len(ds) == len(records) == manifest["counts"]["lists_read"] == manifest["counts"]["lists_written"]
    assert ds.pad_id == 0 and ds.eos_id == 2 and ds.vocab_size == 32000
    assert manifest["tokenizer"]["name"] == "mistral" and manifest["inputs"][0]["format"] == "listwise"
    assert manifest["stats"]["k_histogram"] == {"8": len(records)}
    for i, record in enumerate(records):
        item = ds[i]
        assert item["index"] == i and item["ref_logps"] is None and len(item["response_ids"]) == 8
        messages = [{"role": "user", "content": record["prompt"]}]
        for k, response in enumerate(record["responses"]):
            ids = np.concatenate([item["prompt_ids"], item["response_ids"][k]])
            assert mistral.decode(ids) == mistral.templated_text(messages, response["text"])
            assert item["response_ids"][k][-1] == ds.eos_id
            p = min(max(response["reward"], 1e-6), 1 - 1e-6)
            assert item["rewards"][k] == pytest.approx(math.log(p / (1 - p)), rel=1e-6, abs=1e-5)


def test_prompt_plus_response_is_the_whole_conversation(alpaca, mistral):
    src, prefix, _ = alpaca
    record = json.loads(src.read_text().splitlines()[0])
    item = ListwiseDataset(prefix)[0]
    messages = [{"role": "user", "content": record["prompt"]}]
    for k in (0, 6):
        full = mistral.encode_conversation(messages, record["responses"][k]["text"])
        assert np.concatenate([item["prompt_ids"], item["response_ids"][k]]).tolist() == full


def test_same_bytes_twice_and_for_two_workers(alpaca, tmp_path):
    src, prefix, _ = alpaca
    config = dict(inputs=[str(src)], reward_transform=RewardTransform("logodds", eps=1e-6))
    pack(PackConfig(output_prefix=str(tmp_path / "a" / "alpaca"), **config), log=lambda m: None)
    pack(PackConfig(output_prefix=str(tmp_path / "b" / "alpaca"), workers=2, **config), log=lambda m: None)
    reference = files_of(prefix)
    assert set(reference) == {"alpaca.manifest.json", "alpaca.rewards.bin", "alpaca.rewards.idx",
                              "alpaca.tokens.bin", "alpaca.tokens.idx"}
    assert files_of(tmp_path / "a" / "alpaca") == reference
    assert files_of(tmp_path / "b" / "alpaca") == reference


def test_reference_logps_sidecar(alpaca, tmp_path):
    src, _, _ = alpaca
    prefix = tmp_path / "alpaca"
    pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix)), log=lambda m: None)
    ds = ListwiseDataset(prefix)
    rows = [-np.arange(1, 9, dtype=np.float32) * (i + 1) for i in range(len(ds))]
    with pytest.raises(ValueError, match="row 3"):
        write_reference_logps(prefix, [*rows[:3], rows[3][:5], *rows[4:]], {"checkpoint": "x"})
    assert not ListwiseDataset(prefix).has_ref_logps
    assert sorted(p.name for p in tmp_path.iterdir() if "ref_logps" in p.name) == []
    write_reference_logps(prefix, rows, {"checkpoint": "ckpt/iter_0000010"})
    ds = ListwiseDataset(prefix)
    assert ds.has_ref_logps and ds.ref_meta["checkpoint"] == "ckpt/iter_0000010"
    np.testing.assert_array_equal(ds[5]["ref_logps"], rows[5])
    batch = ListwiseCollator(ds.pad_id)([ds[1], ds[2]])
    np.testing.assert_array_equal(batch["ref_logps"].numpy(), np.stack(rows[1:3]))
    # packing again over the prefix removes the now stale sidecar
    pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix)), log=lambda m: None)
    assert not ListwiseDataset(prefix).has_ref_logps


def test_incomplete_prefix_is_not_a_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest"):
        ListwiseDataset(tmp_path / "nothing")


def test_pairs_and_max_k_reuse_each_response_encoding(alpaca, mistral, tmp_path):
    """Each response is tokenised once per list; every pair / max-K list still holds its own texts' ids."""
    src, _, _ = alpaca
    records = [json.loads(line) for line in src.read_text().splitlines()]
    for name, options in (("all", dict(pairs="all")), ("k3", dict(max_k=3))):
        prefix = tmp_path / name
        pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix), seed=7, **options), log=lambda m: None)
        ds = ListwiseDataset(prefix)
        written = 0
        for ordinal, record in enumerate(records):
            example = read_listwise(record, str(ordinal))
            example.validate()
            if "pairs" in options:
                lists, _ = to_pairs(example, options["pairs"], list_rng(7, ordinal))
            else:
                lists = [limit_k(example, options["max_k"], list_rng(7, ordinal))]
            for ex in lists:
                prompt, responses = mistral.encode_list(ex.prompt, ex.responses)
                item = ds[written]
                assert item["prompt_ids"].tolist() == prompt
                assert [r.tolist() for r in item["response_ids"]] == responses
                np.testing.assert_array_equal(item["rewards"], np.asarray(ex.rewards, dtype=np.float32))
                written += 1
        assert written == len(ds)
        assert len(ds) > len(records) if name == "all" else len(ds) == len(records)


def test_progress_total_counts_input_records(tmp_path):
    lines = [json.dumps({"prompt": f"q{i}", "responses": [{"text": "a", "reward": 1}, {"text": "b", "reward": 0}]})
             for i in range(5)]
    plain = tmp_path / "x.jsonl"
    plain.write_text("\n".join(lines))  # no final newline
    packed = tmp_path / "x.jsonl.gz"
    packed.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    config = PackConfig(inputs=[str(plain), str(packed)], output_prefix=str(tmp_path / "out"))
    reader = _Reader(config, log=lambda m: None)
    assert reader.total() == 10
    assert sum(len(chunk) for chunk in reader.chunks()) == reader.read == 10
    assert reader.inputs[0]["sha256"] == hashlib.sha256(plain.read_bytes()).hexdigest()
    (tmp_path / "x.json").write_text("[" + ",".join(lines) + "]")
    assert _Reader(PackConfig(inputs=[str(plain), str(tmp_path / "x.json")], output_prefix="o"), print).total() is None
