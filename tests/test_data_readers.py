"""Every reader on the real third-party samples (``shared_data`` fixture) and on the small fixtures, through pack and directly."""

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

from nemo_lpo.data import ListwiseDataset
from nemo_lpo.data.examples import BAD_REWARD, InvalidRecord, ListwiseExample, response_turns
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


def assert_packed_matches(ds, examples, mistral, indices=None):
    """Each packed list (all, or those at ``indices``) decodes to its example's conversation and keeps its rewards."""
    if indices is None:
        assert len(ds) == len(examples)
        indices = range(len(examples))
    for i, ex in zip(indices, examples, strict=True):
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


def test_hh_rlhf_pair_differing_earlier_is_split_at_shared_turns():
    src = FIXTURES / "hh_rlhf_multiturn.jsonl"
    assert sniff_format(str(src))[0] == "hh_rlhf"
    reader = get_reader("hh_rlhf")
    records = [record for _, record in iter_records(str(src))]
    early, after_reply, last, doubled, inline = (reader(r, f"hh:{n}") for n, r in enumerate(records[:5], start=1))
    # differs at the second reply: prompt = the turns up to the last shared Human turn, responses = the rest
    assert [m["role"] for m in early.prompt] == ["user", "assistant", "user"]
    assert early.prompt[2]["content"] == "Strategy, please."
    assert early.responses[0] == [
        {"role": "assistant", "content": "Try Catan: trading and building, about an hour a game."},
        {"role": "user", "content": "Is it hard to learn?"},
        {"role": "assistant", "content": "Not really; the first game takes a bit longer while everyone learns the rules."}]
    assert early.responses[1] == "Monopoly."
    # the same first reply, then different Human turns: the shared reply starts both responses
    assert after_reply.prompt == [{"role": "user", "content": "What is the capital of Australia?"}]
    assert [r[0]["content"] for r in after_reply.responses] == ["Canberra.", "Canberra."]
    assert [r[1]["content"] for r in after_reply.responses] == ["Why not Sydney?", "Thanks. And of Canada?"]
    assert last.responses == ["Bonjour !", "Hola."] and len(last.prompt) == 1
    assert doubled.responses[0] == ("Here is one:\n\nSoft rain on the roof / the gutters hum all night long / "
                                    "morning smells of earth")
    assert inline.responses[0] == "Botanically, yes.  Human: And in the kitchen?\n\nA vegetable, mostly."
    for ex in (early, after_reply, last, doubled, inline):
        assert ex.validate() == [] and ex.rewards == [1.0, 0.0] and ex.prompt[-1]["role"] == "user"
    with pytest.raises(InvalidRecord) as err:  # the first Human turns differ: nothing to share
        reader(records[5], "hh:6")
    assert err.value.reason == "mismatched_prompt"


def test_multiturn_response_validation():
    ok = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    ex = ListwiseExample([{"role": "user", "content": "q"}], [ok, ok[:2], ok[:1] + [{"role": "user", "content": " "}]
                                                              + ok[2:], "text"], [3, 2, 1, 0], "x")
    assert ex.validate(skip_invalid=True) == ["missing_field", "empty_response"]
    assert ex.responses == [ok, "text"]
    assert response_turns("text") == [{"role": "assistant", "content": "text"}] and response_turns(ok) == ok


def test_hh_rlhf_multiturn_responses_pack_as_whole_conversations(tmp_path):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    src = FIXTURES / "hh_rlhf_multiturn.jsonl"
    ds, manifest, _ = pack_quiet(tmp_path, [src], skip_invalid=True)
    assert manifest["counts"]["skipped"] == {"mismatched_prompt": 1} and len(ds) == 5
    library = MistralTokenizer.v1()
    library._chat_completion_request_validator._mode = ValidationMode.finetuning
    classes = {"user": UserMessage, "assistant": AssistantMessage}
    examples = read_all_valid(src, "hh_rlhf")
    for i, ex in enumerate(examples):
        for k, response in enumerate(ex.responses):
            messages = [classes[m["role"]](content=m["content"]) for m in ex.prompt + response_turns(response)]
            whole = library.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
            assert np.concatenate([ds[i]["prompt_ids"], ds[i]["response_ids"][k]]).tolist() == whole


def read_all_valid(path, fmt):
    """The examples of ``path`` that pass validation, in input order (what pack keeps with skip_invalid)."""
    out = []
    for n, record in iter_records(str(path)):
        try:
            ex = get_reader(fmt)(record, f"{path}:{n}")
            ex.validate()
        except InvalidRecord:
            continue
        out.append(ex)
    return out


def _naive_turns(transcript):
    """Turns split on every marker, consecutive same-speaker turns kept apart (the reader merges them)."""
    return re.split(r"\n\n(?:Human|Assistant):", transcript)[1:]


def test_hh_rlhf_real_file_counts(shared_data, tmp_path, mistral):
    src = shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz"
    records = dict(iter_records(str(src)))  # line -> record
    naive = {n: (_naive_turns(r["chosen"]), _naive_turns(r["rejected"])) for n, r in records.items()}
    # the only pairs that cannot share a prompt are those whose first Human turns differ: none in this file
    first_human_differs = sum(c[0].strip() != r[0].strip() for c, r in naive.values())
    empty_reply = sum(not c[-1].strip() or not r[-1].strip() for c, r in naive.values())
    # pairs that differ before their last turn when every marker starts a turn (they were 'mismatched_prompt')
    earlier = [n for n, (c, r) in naive.items() if c[:-1] != r[:-1]]
    ds, manifest, _ = pack_quiet(tmp_path, [src], skip_invalid=True)
    counts = manifest["counts"]
    assert counts["lists_read"] == len(records) == counts["lists_written"] + counts["lists_skipped"]
    assert counts["skipped"].get("mismatched_prompt", 0) == first_human_differs == 0
    assert counts["skipped"] == {"too_few_responses": empty_reply} and empty_reply > 0
    assert counts["responses_skipped"] == {"empty_response": empty_reply}
    examples = read_all_valid(src, "hh_rlhf")
    assert len(examples) == len(ds) and len(earlier) == 5
    position = {ex.id: i for i, ex in enumerate(examples)}
    for ex in examples:
        record = records[int(ex.id.rsplit(":", 1)[1])]
        for key, response in zip(("chosen", "rejected"), ex.responses, strict=True):
            turns = ex.prompt + response_turns(response)
            assert all(a["role"] != b["role"] for a, b in zip(turns, turns[1:], strict=False))
            # no text lost: the turns hold the transcript's words, markers aside
            words = re.sub(r"\n\n(?:Human|Assistant):", " ", record[key]).split()
            assert " ".join(m["content"] for m in turns).split() == words
    # the pairs that differed earlier are kept, as ordinary pairs (a doubled Assistant turn is one reply)
    kept = [position[f"{src}:{n}"] for n in earlier]
    assert all(isinstance(r, str) for i in kept for r in examples[i].responses)
    assert_packed_matches(ds, [examples[i] for i in kept], mistral, indices=kept)


def test_ultrainteract_pair_real_schema(tmp_path, mistral):
    """openbmb/UltraInteract_pair rows: task, dataset, trajectory [{from, value}], chosen, rejected, id, parent_id."""
    src = FIXTURES / "ultrainteract_pair.jsonl"
    records = [json.loads(line) for line in src.open()]
    assert {r["task"] for r in records} == {"Coding", "Math_CoT", "Math_PoT", "Logic"}
    assert sorted({len(r["trajectory"]) for r in records}) == [1, 3, 5]  # single- and multi-turn
    fmt, why = sniff_format(str(src))
    assert fmt == "ultrainteract" and "trajectory" in why
    examples = read_all(src, "ultrainteract")
    roles = {"user": "user", "assistant": "assistant"}
    for record, ex in zip(records, examples, strict=True):
        assert ex.prompt == [{"role": roles[m["from"]], "content": m["value"]} for m in record["trajectory"]]
        assert ex.responses == [record["chosen"], record["rejected"]]  # one pair per row: K = 2
        assert ex.rewards == [1.0, 0.0] and ex.reward_kind == "order" and ex.id == record["id"]
    # pairs of one parent (one instruction) stay separate lists: a later turn's prompt is the earlier turn's
    # prompt + its rejected action + the feedback, and two pairs of the same turn keep their own rejected
    by_parent = {}
    for record, ex in zip(records, examples, strict=True):
        by_parent.setdefault(record["parent_id"], []).append(ex)
    tree = max(by_parent.values(), key=len)
    for earlier, later in zip(tree, tree[1:], strict=False):
        assert later.prompt[:len(earlier.prompt)] == earlier.prompt
        assert later.prompt[len(earlier.prompt)] == {"role": "assistant", "content": earlier.responses[1]}
    same_turn = [exs for exs in by_parent.values() if len(exs) == 2 and exs[0].prompt == exs[1].prompt]
    assert len(same_turn) == 1 and same_turn[0][0].responses[1] != same_turn[0][1].responses[1]
    ds, manifest, _ = pack_quiet(tmp_path, [src])
    assert manifest["stats"]["k_histogram"] == {"2": len(records)} and len(ds) == len(records)
    assert_packed_matches(ds, examples, mistral)
