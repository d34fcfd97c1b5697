"""The direct Mistral v1 prompt encoding equals mistral-common's own, and the Mistral instruct text format."""

import gzip
import json

import pytest

from nemo_lpo.data.readers import read_hh_rlhf
from nemo_lpo.data.templates import MistralChatTokenizer, TemplateError

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
