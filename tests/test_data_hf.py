"""The local Hugging Face tokenizer path: a tiny byte-level BPE tokenizer with a chat template, built here."""

import json
from pathlib import Path

import numpy as np
import pytest

from nemo_lpo.data import ListwiseDataset
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.data.templates import HFChatTokenizer, TemplateError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
# HF renders templates with trim_blocks, so newlines are written as expressions.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


def build_tiny_tokenizer(directory: Path, template: str | None = TEMPLATE) -> Path:
    """Train a byte-level BPE on a few sentences and save it as a PreTrainedTokenizerFast with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [json.dumps(json.loads(line)) for f in sorted(FIXTURES.glob("*.jsonl")) for line in f.open()]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if template:
        wrapped.chat_template = template
    wrapped.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny")


def test_tiny_tokenizer_splits_prompt_and_response(tiny_tokenizer):
    tok = HFChatTokenizer(str(tiny_tokenizer))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt, (a, b) = tok.encode_list(messages, ["Hello!", "Ünïcödé   spaces"])
    assert prompt[0] == tok.bos_id and a[-1] == b[-1] == tok.eos_id
    assert tok.decode(prompt) == "<s><|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\n"
    assert tok.decode(prompt + b) == tok.templated_text(messages, "Ünïcödé   spaces")
    assert tok.decode(b) == "Ünïcödé   spaces</s>"
    assert tok.pad_id == 0 and tok.eos_id == 2 and tok.identity()["template"] == TEMPLATE


def test_pack_with_hf_tokenizer(tiny_tokenizer, tmp_path):
    src = FIXTURES / "listwise_messages.jsonl"
    prefix = tmp_path / "lw"
    manifest = pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix), tokenizer=str(tiny_tokenizer)),
                    log=lambda m: None)
    tok = HFChatTokenizer(str(tiny_tokenizer))
    ds = ListwiseDataset(prefix)
    assert manifest["tokenizer"]["kind"] == "huggingface" and ds.pad_id == 0 and ds.vocab_size == len(tok._tok)
    records = [json.loads(line) for line in src.open()]
    assert len(ds) == len(records)
    for i, record in enumerate(records):
        messages = record.get("messages") or [{"role": "user", "content": record.get("prompt")}]
        item = ds[i]
        texts = [r.get("text") or r["messages"][-1]["content"] for r in record["responses"]]
        for k, text in enumerate(texts):
            assert tok.decode(np.concatenate([item["prompt_ids"], item["response_ids"][k]])) == \
                tok.templated_text(messages, text)
        np.testing.assert_array_equal(item["rewards"], np.float32([r["reward"] for r in record["responses"]]))


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    path = build_tiny_tokenizer(tmp_path / "plain", template=None)
    with pytest.raises(TemplateError, match="chat_template"):
        HFChatTokenizer(str(path))
