"""The exported tokenizer of a training checkpoint carries the chat template its data was packed with."""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing
from transformers import AutoTokenizer

from nemo_lpo.config import load_config
from nemo_lpo.convert.mcore_to_hf import convert_mcore_to_hf
from nemo_lpo.data.chat_templates import BUILTIN_TEMPLATES
from nemo_lpo.data.pack import PackConfig, pack
from nemo_lpo.train.checkpoint import model_sharded_state_dict
from nemo_lpo.train.lpo_model import LPOModel
from tests.dist.train_common import TINY_CONF
from tests.test_data_hf import FIXTURES, TEMPLATE, build_tiny_tokenizer


def _training_checkpoint(path: Path, prefix: Path) -> None:
    """A tiny Mixtral's weights with a run config naming ``prefix`` as its training data (as the trainer saves)."""
    cfg = load_config(TINY_CONF, [f"data.train_prefix={prefix}"])
    module = LPOModel(cfg, train=False).module
    dist_checkpointing.save({**model_sharded_state_dict(module), "config": cfg.to_dict()}, str(path))


def test_exported_tokenizer_has_the_packed_chat_template(tmp_path, megatron_single):
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")  # its own template: TEMPLATE
    prefix = tmp_path / "data" / "lw"
    pack(PackConfig(inputs=[str(FIXTURES / "listwise_messages.jsonl")], output_prefix=str(prefix),
                    tokenizer=str(tokenizer), chat_template="chatml"), log=lambda m: None)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _training_checkpoint(ckpt, prefix)
    summary = convert_mcore_to_hf(ckpt, tmp_path / "hf", tokenizer=tokenizer)
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert summary["chat_template"]
    assert exported.chat_template == BUILTIN_TEMPLATES["chatml"] != TEMPLATE  # the packed one, not the tokenizer's
