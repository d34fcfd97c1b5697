"""The direct Mistral v1 prompt encoding equals mistral-common's own, and the Mistral instruct text format."""

import gzip
import json

import numpy as np
import pytest

from nemo_lpo.data.readers import read_hh_rlhf
from nemo_lpo.data.templates import HFChatTokenizer, MistralChatTokenizer, TemplateError

CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "u"}],
    [{"role": "user", "content": "  leading and trailing spaces \n"}],
    [{"role": "user", "content": "Ünïcödé 中文 🙂\ttabs\r\nand CRLF"}],
    [{"role": "user", "content": "x"}, {"role": "user", "content": "consecutive users"}],  # library path
]


@pytest.fixture(scope="module")
def mistral():
    return MistralChatTokenizer()


@pytest.mark.parametrize("messages", CASES)
def test_direct_prompt_encoding_equals_library(mistral, messages):
    assert mistral.encode_prompt(messages) == mistral.encode_prompt_library(messages)
    prompt, (response,) = mistral.encode_list(messages, ["Sure."], verify=True)
    assert prompt + response == mistral.encode_conversation(messages, "Sure.")
    if messages is not CASES[-1]:  # mistral-common merges consecutive user turns; templated_text does not
        assert mistral.decode(prompt + response) == mistral.templated_text(messages, "Sure.")


def test_real_multiturn_prompts_equal_library(shared_data, mistral):
    with gzip.open(shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz", "rt") as f:
        records = [json.loads(line) for _, line in zip(range(60), f, strict=False)]
    prompts = [read_hh_rlhf(r, str(i)).prompt for i, r in enumerate(records)]
    assert max(map(len, prompts)) >= 5
    for prompt in prompts:
        if all(m["content"] for m in prompt):
            assert mistral.encode_prompt(prompt) == mistral.encode_prompt_library(prompt)


def test_invalid_prompts_are_refused(mistral):
    with pytest.raises(TemplateError):
        mistral.encode_prompt([{"role": "assistant", "content": "no user turn"}])
    with pytest.raises(TemplateError):
        mistral.encode_prompt([{"role": "user", "content": "q"}, {"role": "assistant", "content": "ends with me"}])


def test_batched_encoding_equals_one_list_at_a_time(mistral):
    """encode_lists (one sentencepiece call per chunk) gives encode_list's ids; a refused list gives its error."""
    refused = [{"role": "assistant", "content": "no user turn"}]
    lists = [(m, ["Sure.", "No, thanks.\nBye"]) for m in CASES]
    lists.insert(2, (refused, ["Sure."]))
    batch = mistral.encode_lists(lists, verify_first=True)
    assert isinstance(batch[2], TemplateError)
    for (messages, responses), result in zip(lists, batch, strict=True):
        if messages is refused:
            continue
        prompt, replies = result
        assert prompt.dtype == replies[0].dtype == np.int32
        expected_prompt, expected_replies = mistral.encode_list(messages, responses)
        assert prompt.tolist() == expected_prompt
        assert [r.tolist() for r in replies] == expected_replies


def test_batched_encoding_of_real_multiturn_prompts(shared_data, mistral):
    with gzip.open(shared_data / "hh_rlhf" / "harmless-base_test.jsonl.gz", "rt") as f:
        records = [json.loads(line) for _, line in zip(range(40), f, strict=False)]
    examples = [read_hh_rlhf(r, str(i)) for i, r in enumerate(records)]
    lists = [(ex.prompt, ex.responses) for ex in examples if all(isinstance(r, str) for r in ex.responses)]
    assert max(len(messages) for messages, _ in lists) >= 5
    for (messages, responses), (prompt, replies) in zip(lists, mistral.encode_lists(lists), strict=True):
        assert prompt.tolist() == mistral.encode_prompt_library(messages)
        assert [r.tolist() for r in replies] == mistral.encode_list(messages, responses)[1]


def test_batched_hf_encoding_equals_one_list_at_a_time(tmp_path):
    from tests.test_data_hf import build_tiny_tokenizer

    tok = HFChatTokenizer(str(build_tiny_tokenizer(tmp_path / "tiny")))
    lists = [(m, ["Sure.", "No, thanks.\nBye"]) for m in CASES[:-1]]
    lists.insert(1, ([{"role": "user", "content": "q"}], ["fine", ""]))
    batch = tok.encode_lists(lists)
    for (messages, responses), result in zip(lists, batch, strict=True):
        prompt, replies = result
        expected_prompt, expected_replies = tok.encode_list(messages, responses)
        assert prompt.tolist() == expected_prompt and [r.tolist() for r in replies] == expected_replies
