"""Small local models for the on-policy tests: a causal LM that ends ~15% of its steps with EOS, a reward model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from tests.test_data_hf import build_tiny_tokenizer

PROMPTS = [{"id": f"p{i}", "messages": [{"role": "user", "content": text}]}
           for i, text in enumerate(["What is 2 + 2?", "Say hello.", "Name a colour.", "Count to three.",
                                     "Spell cat.", "Give a number."])]


def _config(vocab: int, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra)


def build_policy(directory: Path, vocab: int, eos_id: int = 2) -> Path:
    """A tiny Llama whose next-token distribution puts ~15% on EOS (so both EOS-ended and truncated samples occur).

    The layers' outputs are zeroed and every embedding has a large first component, so the final hidden state's
    first component is nearly constant; EOS's output row reads it.
    """
    torch.manual_seed(0)
    model = LlamaForCausalLM(_config(vocab))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.normal_(0, 0.3)
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.normal_(0, 0.5)
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos_id] = 0.0
        model.lm_head.weight[eos_id, 0] = 1.65
    model.save_pretrained(directory)
    return directory


def build_reward_model(directory: Path, vocab: int) -> LlamaForSequenceClassification:
    """A tiny Llama sequence classifier with one label, saved to ``directory`` (its tokenizer beside it)."""
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(_config(vocab, num_labels=1))
    model.save_pretrained(directory)
    return model.eval()


def write_prompts(path: Path, prompts: list[dict] = PROMPTS) -> Path:
    """The prompts as a prompts JSONL."""
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


def tiny_tokenizer(directory: Path) -> Path:
    """The byte-level BPE tokenizer with a chat template of tests/test_data_hf.py."""
    return build_tiny_tokenizer(directory)
