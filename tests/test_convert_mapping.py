"""Pure tests of the HF <-> megatron tensor transforms and the HF config translation (no megatron init)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, MixtralConfig, Qwen2Config

from nemo_lpo.convert.hf_config import (
    ConversionError,
    check_sequence_length,
    hf_config_from_preset,
    preset_from_hf_config,
)
from nemo_lpo.convert.mapping import (
    TABLES,
    expand,
    expected_hf_shapes,
    gate_up_to_hf,
    gate_up_to_mcore,
    qkv_to_hf,
    qkv_to_mcore,
)

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128)


def _config(cls, arch, **extra):
    config = cls(**{**TINY, **extra})
    config.architectures = [arch]
    return config


def test_qkv_layout_hand_worked():
    # 4 query heads, 2 KV groups, head_dim 1: rows are tagged by their origin.
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = qkv_to_mcore(q, k, v, num_query_groups=2)
    # per group: its two query heads, its key, its value
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    back = qkv_to_hf(fused, num_query_groups=2, num_attention_heads=4)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v), strict=True))


@pytest.mark.parametrize("heads,groups,head_dim", [(8, 8, 4), (8, 1, 4), (8, 2, 16), (6, 3, 2)])
def test_qkv_roundtrip_exact(heads, groups, head_dim):
    hidden = heads * head_dim
    gen = torch.Generator().manual_seed(heads * 100 + groups)
    q = torch.randn(heads * head_dim, hidden, generator=gen)
    k = torch.randn(groups * head_dim, hidden, generator=gen)
    v = torch.randn(groups * head_dim, hidden, generator=gen)
    fused = qkv_to_mcore(q, k, v, groups)
    assert fused.shape == ((heads + 2 * groups) * head_dim, hidden)
    # group g's block starts with query head g*heads/groups
    block = (heads // groups + 2) * head_dim
    assert torch.equal(fused[block:block + head_dim], q[(heads // groups) * head_dim:(heads // groups + 1) * head_dim])
    for a, b in zip(qkv_to_hf(fused, groups, heads), (q, k, v), strict=True):
        assert torch.equal(a, b)


def test_gate_up_gate_first_and_roundtrip():
    gate, up = torch.full((3, 2), 1.0), torch.full((3, 2), 2.0)
    fused = gate_up_to_mcore(gate, up)
    assert fused[:3].eq(1).all() and fused[3:].eq(2).all()
    g, u = gate_up_to_hf(fused)
    assert torch.equal(g, gate) and torch.equal(u, up)
    with pytest.raises(ValueError, match="gate/up shapes differ"):
        gate_up_to_mcore(gate, torch.zeros(2, 2))


@pytest.mark.parametrize("cls,arch,extra,experts", [
    (MixtralConfig, "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2), 4),
    (MistralConfig, "MistralForCausalLM", dict(sliding_window=64), None),
    (LlamaConfig, "LlamaForCausalLM", {}, None),
])
def test_preset_from_hf_config_and_back(cls, arch, extra, experts):
    config = _config(cls, arch, **extra)
    preset = preset_from_hf_config(config)
    assert (preset.num_layers, preset.hidden_size, preset.ffn_hidden_size) == (2, 64, 96)
    assert (preset.num_attention_heads, preset.num_query_groups, preset.vocab_size) == (4, 2, 256)
    assert preset.num_experts == experts
    assert preset.rotary_base == config.rope_parameters["rope_theta"]
    assert preset.sliding_window == (64 if arch == "MistralForCausalLM" else None)
    again = preset_from_hf_config(hf_config_from_preset(preset, arch, base=config), name=preset.name)
    assert again == preset
    names = [n for m in expand(arch, preset) for n in m.hf]
    assert len(names) == len(set(names)) == len(expected_hf_shapes(arch, preset))


def test_tables_list_each_architecture():
    assert set(TABLES) == {"MixtralForCausalLM", "MistralForCausalLM", "LlamaForCausalLM"}


@pytest.mark.parametrize("mutate,message", [
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type"),
])
def test_unsupported_settings_are_refused_with_the_field(mutate, message):
    config = _config(LlamaConfig, "LlamaForCausalLM", **mutate)
    with pytest.raises(ConversionError, match=message):
        preset_from_hf_config(config, source="/x/config.json")


def test_unsupported_architecture():
    config = _config(Qwen2Config, "Qwen2ForCausalLM")
    with pytest.raises(ConversionError, match="Qwen2ForCausalLM.*not supported"):
        preset_from_hf_config(config)


def test_sliding_window_shorter_than_sequence_is_refused():
    preset = preset_from_hf_config(_config(MistralConfig, "MistralForCausalLM", sliding_window=64))
    check_sequence_length(preset, 64)
    with pytest.raises(ConversionError, match="sliding_window' = 64 is shorter than the sequence length 65"):
        check_sequence_length(preset, 65)
    # a window that covers every position is plain causal attention
    wide = preset_from_hf_config(_config(MistralConfig, "MistralForCausalLM", sliding_window=4096))
    assert wide.sliding_window is None


def test_export_config_refuses_mismatched_architecture():
    moe = preset_from_hf_config(_config(MixtralConfig, "MixtralForCausalLM", num_local_experts=4))
    with pytest.raises(ConversionError, match="mixture of experts"):
        hf_config_from_preset(moe, "MistralForCausalLM")
