"""``--chat-template`` for tokenizers without one: exact token sequences of every built-in, files, manifest, errors.

The tokenizer is built here, offline: a word-level vocabulary written by hand in which every word, space and
newline is one token and the markup strings are added tokens, so each expected sequence below is the
template's text written out token by token, by hand.
"""

import json

import pytest

from nemo_lpo.cli import main
from nemo_lpo.data import ListwiseDataset
from nemo_lpo.data.chat_templates import BUILTIN_TEMPLATES
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.data.templates import HFChatTokenizer, TemplateError, load_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
MARKUP = ["<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>", "[INST]", "[/INST]", "<<SYS>>",
          "<</SYS>>"]
WORDS = [" ", "\n", "be", "brief", "hi", "hello", "how", "are", "you", "fine", "system", "user", "assistant"]
VOCAB = {token: i for i, token in enumerate(SPECIALS + MARKUP + WORDS)}

# A two-turn conversation with a system message, and the reply to pack.
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how are you"}]
REPLY = "fine"
HOW = ["how", " ", "are", " ", "you"]

# (prompt tokens, reply tokens), written out from each format's definition (docs/data.md).
EXPECTED = {
    "plain": (["<s>", "be", " ", "brief", "\n", "\n", "hi", "\n", "\n", "hello", "\n", "\n", *HOW, "\n", "\n"],
              ["fine", "</s>"]),
    "chatml": (["<s>", "<|im_start|>", "system", "\n", "be", " ", "brief", "<|im_end|>", "\n",
                "<|im_start|>", "user", "\n", "hi", "<|im_end|>", "\n",
                "<|im_start|>", "assistant", "\n", "hello", "<|im_end|>", "\n",
                "<|im_start|>", "user", "\n", *HOW, "<|im_end|>", "\n",
                "<|im_start|>", "assistant", "\n"],
               ["fine", "<|im_end|>", "\n", "</s>"]),  # the turn's end, then EOS (the template has none)
    "zephyr": (["<s>", "<|system|>", "\n", "be", " ", "brief", "</s>", "\n", "<|user|>", "\n", "hi", "</s>", "\n",
                "<|assistant|>", "\n", "hello", "</s>", "\n", "<|user|>", "\n", *HOW, "</s>", "\n",
                "<|assistant|>", "\n"],
               ["fine", "</s>"]),  # the newline after EOS is not trained on
    "llama2": (["<s>", "[INST]", " ", "<<SYS>>", "\n", "be", " ", "brief", "\n", "<</SYS>>", "\n", "\n", "hi", " ",
                "[/INST]", " ", "hello", " ", "</s>", "<s>", "[INST]", " ", *HOW, " ", "[/INST]"],
               [" ", "fine", " ", "</s>"]),
    "mistral": (["<s>", "[INST]", " ", "be", " ", "brief", "\n", "\n", "hi", " ", "[/INST]", " ", "hello", "</s>",
                 "[INST]", " ", *HOW, " ", "[/INST]"],
                [" ", "fine", "</s>"]),
}


def build_base_tokenizer(directory):
    """A word-level tokenizer without a chat template (a base model's), saved as a PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|\s|[^\w\s]"), behavior="isolated")
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in SPECIALS])
    tok.add_tokens([AddedToken(t, normalized=False) for t in MARKUP])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert not wrapped.chat_template
    wrapped.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def base_tokenizer(tmp_path_factory):
    return build_base_tokenizer(tmp_path_factory.mktemp("tok") / "base")


def test_every_builtin_is_tested():
    assert set(EXPECTED) == set(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_token_sequences(base_tokenizer, name):
    tok = HFChatTokenizer(base_tokenizer, chat_template=name)
    prompt, (reply,) = tok.encode_list(MESSAGES, [REPLY])
    expected_prompt, expected_reply = EXPECTED[name]
    assert list(prompt) == [VOCAB[t] for t in expected_prompt]
    assert list(reply) == [VOCAB[t] for t in expected_reply]
    # the batched path (what pack runs) gives the same ids
    (batch_prompt, (batch_reply,)), = tok.encode_lists([(MESSAGES, [REPLY])])
    assert batch_prompt.tolist() == list(prompt) and batch_reply.tolist() == list(reply)


def test_template_file_equals_the_builtin_it_holds(base_tokenizer, tmp_path):
    path = tmp_path / "mine.jinja"
    path.write_text(BUILTIN_TEMPLATES["zephyr"])
    tok = HFChatTokenizer(base_tokenizer, chat_template=str(path))
    assert tok.encode_list(MESSAGES, [REPLY]) == HFChatTokenizer(base_tokenizer, "zephyr").encode_list(MESSAGES, [REPLY])
    assert tok.identity()["template_source"] == str(path)


def test_roles_that_do_not_alternate_are_a_tokenizer_error_not_a_crash(base_tokenizer):
    tok = HFChatTokenizer(base_tokenizer, chat_template="llama2")
    with pytest.raises(TemplateError, match="roles must alternate"):
        tok.encode_list([{"role": "user", "content": "hi"}, {"role": "user", "content": "hello"}], [REPLY])


def test_no_template_anywhere_names_the_flag(base_tokenizer, tmp_path, capsys):
    with pytest.raises(TemplateError, match="has no chat_template; choose one with --chat-template"):
        HFChatTokenizer(base_tokenizer)
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hi", "responses": [{"text": "fine", "reward": 1}, {"text": "hello",
                                                                                              "reward": 0}]}) + "\n")
    out = tmp_path / "out"
    assert main(["pack", "--input", str(src), "--tokenizer", base_tokenizer, "--output-prefix", str(out / "ds"),
                 "--no-progress"]) == 1
    assert "--chat-template NAME|FILE.jinja (built-ins: plain, chatml, zephyr, llama2, mistral)" in \
        capsys.readouterr().err
    assert not out.exists() or list(out.iterdir()) == []


def test_unknown_template_and_mistral_with_a_template_are_refused(base_tokenizer):
    with pytest.raises(TemplateError, match="'vicuna': not a built-in"):
        HFChatTokenizer(base_tokenizer, chat_template="vicuna")
    with pytest.raises(TemplateError, match="--tokenizer mistral uses mistral-common"):
        load_tokenizer("mistral", "chatml")


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_records_the_template_and_writes_its_ids(base_tokenizer, tmp_path, workers):
    src = tmp_path / "in.jsonl"
    record = {"messages": MESSAGES, "responses": [{"text": REPLY, "reward": 1}, {"text": "hello", "reward": 0}]}
    src.write_text("\n".join(json.dumps(record | {"id": str(i)}) for i in range(40)) + "\n")
    prefix = tmp_path / "ds"
    manifest = pack(PackConfig(inputs=[str(src)], output_prefix=str(prefix), tokenizer=base_tokenizer,
                               chat_template="llama2", workers=workers), log=lambda m: None)
    assert manifest["tokenizer"]["template_source"] == "builtin:llama2"
    assert manifest["tokenizer"]["template"] == BUILTIN_TEMPLATES["llama2"]
    ds = ListwiseDataset(prefix)
    prompt, reply = EXPECTED["llama2"]
    assert len(ds) == 40 and ds[39]["prompt_ids"].tolist() == [VOCAB[t] for t in prompt]
    assert ds[39]["response_ids"][0].tolist() == [VOCAB[t] for t in reply]
    assert ds[39]["response_ids"][1].tolist() == [VOCAB[t] for t in [" ", "hello", " ", "</s>"]]


def test_an_unknown_template_stops_pack_with_nothing_written(base_tokenizer, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hi", "responses": [{"text": "a", "reward": 1}, {"text": "b",
                                                                                         "reward": 0}]}) + "\n")
    with pytest.raises(TemplateError):
        pack(PackConfig(inputs=[str(src)], output_prefix=str(tmp_path / "o" / "ds"), tokenizer=base_tokenizer,
                        chat_template="nope"), log=lambda m: None)
    assert list((tmp_path / "o").iterdir()) == []
