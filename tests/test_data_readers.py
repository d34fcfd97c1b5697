"""Every reader on the real data in ../shared/data and on the small fixtures, through pack and directly."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from nemo_lpo.data import ListwiseDataset
from nemo_lpo.data.examples import BAD_REWARD, InvalidRecord
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.data.readers import detect_format, get_reader, iter_records, sniff_format
from nemo_lpo.data.templates import MistralChatTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def mistral():
    return MistralChatTokenizer()


def read_all(path, fmt, **kwargs):
    reader = get_reader(fmt, **kwargs)
    examples = [reader(record, f"{path}:{n}") for n, record in iter_records(str(path))]
    for ex in examples:
        ex.validate()
    return examples


def pack_quiet(tmp_path, inputs, **kwargs):
    prefix = tmp_path / "out" / "ds"
    messages = []
    manifest = pack(PackConfig(inputs=[str(p) for p in inputs], output_prefix=str(prefix), **kwargs),
                    log=messages.append)
    return ListwiseDataset(prefix), manifest, messages


def assert_packed_matches(ds, examples, mistral):
    """Each packed list decodes to its example's templated conversation and keeps its rewards."""
    assert len(ds) == len(examples)
    for i, ex in enumerate(examples):
        item = ds[i]
        for k, text in enumerate(ex.responses):
            ids = np.concatenate([item["prompt_ids"], item["response_ids"][k]])
            assert mistral.decode(ids) == mistral.templated_text(ex.prompt, text)
        np.testing.assert_array_equal(item["rewards"], np.float32(ex.rewards))


def test_ultrafeedback_binarized_trl_lib_real(shared_data, tmp_path, mistral):
    src = tmp_path / "uf.jsonl"
    with open(shared_data / "ultrafeedback_binarized" / "train_clean.jsonl") as f:
        lines = [line for _, line in zip(range(50), f, strict=False)]
    src.write_text("".join(lines))
    ds, manifest, messages = pack_quiet(tmp_path, [src])
    assert manifest["inputs"][0]["format"] == "ultrafeedback_binarized"
    assert any("detected format ultrafeedback_binarized" in m for m in messages)
    records = [json.loads(line) for line in lines]
    examples = read_all(src, "ultrafeedback_binarized")
    assert manifest["counts"]["lists_read"] == 50 == manifest["counts"]["lists_written"] + manifest["counts"]["lists_skipped"]
    assert_packed_matches(ds, examples, mistral)
    for record, ex in zip(records, examples, strict=True):
        assert ex.prompt == [{"role": "user", "content": record["prompt"]}]
        assert ex.responses == [record["chosen"], record["rejected"]]
        assert ex.rewards == [record["metadata"]["score_chosen"], record["metadata"]["score_rejected"]]


def test_hh_rlhf_real_transcripts_split_at_last_assistant(shared_data, tmp_path, mistral):
    src = tmp_path / "hh.jsonl.gz"
    with gzip.open(shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz", "rb") as f:
        lines = [line for _, line in zip(range(50), f, strict=False)]
    with gzip.open(src, "wb") as f:
        f.write(b"".join(lines))
    assert sniff_format(str(src))[0] == "hh_rlhf"
    ds, manifest, _ = pack_quiet(tmp_path, [src], skip_invalid=True)
    counts = manifest["counts"]
    assert counts["lists_read"] == 50 == counts["lists_written"] + counts["lists_skipped"]
    examples = []
    for n, record in iter_records(str(src)):
        try:
            ex = get_reader("hh_rlhf")(record, str(n))
            ex.validate()
        except InvalidRecord:
            continue
        examples.append(ex)
        # the prompt turns + the reply rebuild the transcript (up to whitespace around turns)
        rebuilt = "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                          for m in ex.prompt) + f"\n\nAssistant: {ex.responses[0]}"
        assert rebuilt.split() == record["chosen"].split()
        assert ex.rewards == [1.0, 0.0] and ex.reward_kind == "order"
    assert len(examples) == counts["lists_written"] >= 45
    assert max(len(ex.prompt) for ex in examples) >= 3  # multi-turn prompts keep their turns
    assert_packed_matches(ds, examples, mistral)


def test_ultrafeedback_raw_scores():
    src = FIXTURES / "ultrafeedback_raw.jsonl"
    assert sniff_format(str(src))[0] == "ultrafeedback"
    overall = read_all(src, "ultrafeedback")
    assert [len(ex.responses) for ex in overall] == [4, 3, 2]
    assert overall[0].rewards == [8.5, 3.0, 7.0, 2.0] and overall[0].responses[1] == "Green."
    assert read_all(src, "ultrafeedback", ultrafeedback_score="fine_grained")[1].rewards == [5.0, 1.0, 4.25]
    assert read_all(src, "ultrafeedback", ultrafeedback_score="helpfulness")[0].rewards == [5.0, 1.0, 4.0, 1.0]
    with pytest.raises(InvalidRecord) as err:  # "N/A" rating
        read_all(src, "ultrafeedback", ultrafeedback_score="honesty")
    assert err.value.reason == BAD_REWARD


def test_ultrafeedback_raw_pack_with_skip_counts_na_rating(tmp_path):
    src = FIXTURES / "ultrafeedback_raw.jsonl"
    ds, manifest, _ = pack_quiet(tmp_path, [src], ultrafeedback_score="honesty", skip_invalid=True)
    # "N/A" honesty rating: that response is dropped, the list keeps its two others
    assert manifest["counts"]["responses_skipped"] == {"bad_reward": 1} and len(ds) == 3
    assert ds[1]["rewards"].tolist() == [5.0, 1.0]
    assert manifest["options"]["ultrafeedback_score"] == "honesty"


def test_h4_binarized_messages_multiturn(tmp_path, mistral):
    src = FIXTURES / "h4_binarized.jsonl"
    examples = read_all(src, "ultrafeedback_binarized")
    assert examples[1].prompt[0] == {"role": "system", "content": "You are a calculator."}
    assert len(examples[1].prompt) == 4 and examples[1].responses == ["12", "7, probably."]
    assert examples[1].rewards == [8.0, 8.0] and examples[0].id == "p-001"
    ds, _, _ = pack_quiet(tmp_path, [src])
    assert_packed_matches(ds, examples, mistral)


def test_ultrainteract_trajectory(tmp_path, mistral):
    src = FIXTURES / "ultrainteract.jsonl"
    assert sniff_format(str(src))[0] == "ultrainteract"
    examples = read_all(src, "ultrainteract")
    assert [m["role"] for m in examples[0].prompt] == ["user", "assistant", "user"]
    assert examples[0].rewards == [1.0, 0.0] and examples[0].id == "ui-1"
    ds, _, _ = pack_quiet(tmp_path, [src])
    assert_packed_matches(ds, examples, mistral)


def test_nemo_dpo_with_and_without_rewards(tmp_path, mistral):
    src = FIXTURES / "nemo_dpo.jsonl"
    assert sniff_format(str(src))[0] == "nemo_dpo"
    examples = read_all(src, "nemo_dpo")
    assert [ex.rewards for ex in examples] == [[1.5, -0.5], [1.0, 0.0], [2.0, 0.0]]
    assert [ex.reward_kind for ex in examples] == ["score", "order", "score"]
    ds, _, _ = pack_quiet(tmp_path, [src])
    assert_packed_matches(ds, examples, mistral)


def test_listwise_messages(tmp_path, mistral):
    src = FIXTURES / "listwise_messages.jsonl"
    examples = read_all(src, "listwise")
    assert examples[0].responses[2] == "It is Paris, on the Seine."
    assert [len(ex.responses) for ex in examples] == [3, 4, 2]
    ds, manifest, _ = pack_quiet(tmp_path, [src])
    assert manifest["stats"]["k_histogram"] == {"2": 1, "3": 1, "4": 1}
    assert_packed_matches(ds, examples, mistral)


def test_several_inputs_of_different_formats(tmp_path):
    inputs = [FIXTURES / "nemo_dpo.jsonl", FIXTURES / "listwise_messages.jsonl"]
    ds, manifest, messages = pack_quiet(tmp_path, inputs)
    assert [i["format"] for i in manifest["inputs"]] == ["nemo_dpo", "listwise"]
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"]) and len(ds) == 6
    assert sum("detected format" in m for m in messages) == 2


def test_detect_format_explains_and_refuses_unknown():
    assert detect_format({"chosen": "\n\nHuman: hi\n\nAssistant: yo", "rejected": "x"})[0] == "hh_rlhf"
    assert detect_format({"prompt": "p", "chosen": "a", "rejected": "b"})[0] == "ultrafeedback_binarized"
    assert "responses" in detect_format({"prompt": "p", "responses": []})[1]
    with pytest.raises(ValueError, match="cannot detect"):
        detect_format({"question": "q"})


def test_parquet_and_json_inputs_through_hf_datasets(tmp_path, mistral):
    import datasets

    records = [json.loads(line) for line in (FIXTURES / "nemo_dpo.jsonl").open()]
    for r in records:  # parquet needs one schema: give every row both rewards
        r.setdefault("chosen_reward", 1.0)
        r.setdefault("rejected_reward", 0.0)
    parquet = tmp_path / "dpo.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(parquet))
    ds, manifest, _ = pack_quiet(tmp_path, [parquet])
    assert manifest["inputs"][0]["format"] == "nemo_dpo" and len(ds) == 3
    assert ds[0]["rewards"].tolist() == [1.5, -0.5]
    assert mistral.decode(ds[2]["prompt_ids"]) == "<s>[INST] What colour is the sky on a clear day? [/INST]"


def test_missing_input_file_is_reported_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such input file"):
        pack(PackConfig(inputs=[str(tmp_path / "nope.jsonl")], output_prefix=str(tmp_path / "ds")))
    assert list(tmp_path.iterdir()) == []
