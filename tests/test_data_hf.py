"""The Hugging Face paths, offline: a local tokenizer and datasets given by name.

A tiny byte-level BPE tokenizer with a chat template is built here; so is a dataset directory in the Hub's layout,
read through the same ``datasets.load_dataset`` call as a hub name; hub names that cannot be reached must fail
with a clear error.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from nemo_lpo.data import ListwiseDataset
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.data.readers import DatasetLoadError, InputSpec, get_reader, iter_records, parse_input, sniff_format
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


HUB_README = """---
license: mit
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
- config_name: single_turn
  data_files:
  - split: train
    path: single_turn/train-*
---
# UltraInteract-like pairs, laid out as a Hub dataset repository
"""


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep the datasets cache of a test in its tmp dir (HF reads these constants at import, not from the env)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path / "hf_cache"


@pytest.fixture
def hub_repo(tmp_path):
    """A dataset repository as the Hub stores one: README with YAML ``configs:``, parquet shards per split."""
    import datasets

    records = [json.loads(line) for line in (FIXTURES / "ultrainteract_pair.jsonl").open()]
    repo = tmp_path / "ultrainteract_pair"
    shards = {"data/train": records[:5], "data/test": records[5:],
              "single_turn/train": [r for r in records if len(r["trajectory"]) == 1]}
    for shard, rows in shards.items():
        (repo / shard).parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_list(rows).to_parquet(str(repo / f"{shard}-00000-of-00001.parquet"))
    (repo / "README.md").write_text(HUB_README)
    return repo, records


def test_dataset_directory_in_hub_layout_with_config_and_split(hub_repo, hf_cache):
    repo, records = hub_repo

    def ids(*args, **kwargs):
        return [record["id"] for _, record in iter_records(*args, **kwargs)]

    assert ids(str(repo)) == [r["id"] for r in records[:5]]  # default config; several splits: train
    assert ids(f"{repo}:test") == [r["id"] for r in records[5:]]
    assert ids(f"{repo}:single_turn:train") == [r["id"] for r in records if len(r["trajectory"]) == 1]
    assert ids(str(repo), config="single_turn") == ids(f"{repo}:single_turn:train")  # one split: that one
    assert ids(str(repo), split="test") == ids(f"{repo}:test")
    fmt, why = sniff_format(f"{repo}:test")
    assert fmt == "ultrainteract" and why.startswith(f"{repo}:test:1 ")
    # rows come back with the real schema's nested trajectory, and read as the JSONL records do
    reader = get_reader("ultrainteract")
    for (_, row), record in zip(iter_records(f"{repo}:test"), records[5:], strict=True):
        assert row == record
        assert reader(row, "x") == reader(record, "x")
    with pytest.raises(DatasetLoadError, match=rf"{repo}:nope: local dataset directory: .*Unknown split"):
        list(iter_records(f"{repo}:nope"))
    with pytest.raises(DatasetLoadError, match=rf"{repo}:missing:train: .*'missing' not found"):
        list(iter_records(f"{repo}:missing:train"))


def test_dataset_directory_packs(hub_repo, hf_cache, tmp_path):
    repo, records = hub_repo
    prefix = tmp_path / "ui"
    manifest = pack(PackConfig(inputs=[str(repo)], output_prefix=str(prefix)), log=lambda m: None)
    assert manifest["inputs"][0]["format"] == "ultrainteract" and manifest["inputs"][0]["path"] == str(repo)
    assert len(ListwiseDataset(prefix)) == 5 == manifest["counts"]["lists_written"]


def test_parse_input():
    fixture = str(FIXTURES / "nemo_dpo.jsonl")
    assert parse_input(fixture) == InputSpec(fixture, "file")
    assert parse_input("openbmb/UltraInteract_pair") == InputSpec("openbmb/UltraInteract_pair", "hub")
    assert parse_input("HuggingFaceH4/ultrafeedback_binarized:train_prefs").split == "train_prefs"
    assert parse_input("org/name:cfg:test", split="train") == InputSpec("org/name", "hub", "cfg", "train")
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such input file"):
        parse_input("data/missing.jsonl")
    with pytest.raises(FileNotFoundError, match="no such input file"):
        parse_input("some/local/dir")  # two slashes: not a hub name
    with pytest.raises(ValueError, match="not a file"):
        parse_input(f"{fixture}:train")
    with pytest.raises(ValueError, match="NAME:CONFIG:SPLIT"):
        parse_input("org/name:a:b:c")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF offline mode as a user sets it (env), also patched where HF already read it at import."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty_cache"))


def test_unreachable_hub_name_is_a_clear_error(offline, tmp_path, capsys):
    name = "nemo-lpo-tests/no-such-dataset"
    with pytest.raises(DatasetLoadError, match=rf"^{name}:test: not a local file or directory; as a hub dataset: "
                                               r"cannot be loaded: .*(offline|reach)"):
        list(iter_records(f"{name}:test"))
    with pytest.raises(DatasetLoadError, match=f"^{name}: "):
        sniff_format(name)
    # through the CLI: one line naming the input, exit 1, nothing written (a name without '/' here: pack's own
    # early check treats every name with '/' that does not exist as a missing file)
    from nemo_lpo.cli import main

    assert main(["pack", "--input", "no_such_hub_dataset", "--output-prefix", str(tmp_path / "out" / "p"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "nemo-lpo pack: error: no_such_hub_dataset: not a local file or directory; as a hub dataset" in err
    assert "Traceback" not in err and not any((tmp_path / "out").iterdir())


def test_dataset_directory_selection_packs(hub_repo, hf_cache, tmp_path):
    repo, records = hub_repo
    manifest = pack(PackConfig(inputs=[f"{repo}:test"], output_prefix=str(tmp_path / "ui")), log=lambda m: None)
    assert manifest["counts"]["lists_written"] == len(records[5:])
