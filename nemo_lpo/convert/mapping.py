"""Declarative HF <-> megatron-core name mapping, one table per architecture, with pure tensor transforms.

Names on the megatron side are megatron-core's own GPTModel parameter names (local layer spec, TP=PP=EP=1,
``local_experts.E`` = global expert E). The dist-checkpoint keys (``...linear_qkv.layer_norm_weight``,
stacked layers / experts) are derived from these by megatron's ``sharded_state_dict``, never by this table.
HF names are the on-disk safetensors names that ``save_pretrained`` writes (Mixtral's
``block_sparse_moe.experts.E.w1``), which vLLM, TGI and transformers all read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rule:
    """One megatron parameter and the HF tensors it is made of.

    Attributes:
        mcore: megatron name template (``{layer}``, ``{expert}`` placeholders).
        hf: HF name templates, in the order ``transform`` takes them.
        transform: key of :data:`TRANSFORMS` (``copy``, ``qkv``, ``gate_up``).
    """

    mcore: str
    hf: tuple[str, ...]
    transform: str = "copy"


_L = "model.layers.{layer}"
_M = "decoder.layers.{layer}"

_COMMON = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    Rule("output_layer.weight", ("lm_head.weight",)),
    Rule(f"{_M}.input_layernorm.weight", (f"{_L}.input_layernorm.weight",)),
    Rule(f"{_M}.self_attention.linear_qkv.weight",
         (f"{_L}.self_attn.q_proj.weight", f"{_L}.self_attn.k_proj.weight", f"{_L}.self_attn.v_proj.weight"), "qkv"),
    Rule(f"{_M}.self_attention.linear_proj.weight", (f"{_L}.self_attn.o_proj.weight",)),
    Rule(f"{_M}.pre_mlp_layernorm.weight", (f"{_L}.post_attention_layernorm.weight",)),
)
_DENSE_MLP = (
    Rule(f"{_M}.mlp.linear_fc1.weight", (f"{_L}.mlp.gate_proj.weight", f"{_L}.mlp.up_proj.weight"), "gate_up"),
    Rule(f"{_M}.mlp.linear_fc2.weight", (f"{_L}.mlp.down_proj.weight",)),
)
_E = f"{_L}.block_sparse_moe"
_MOE_MLP = (
    Rule(f"{_M}.mlp.router.weight", (f"{_E}.gate.weight",)),
    Rule(f"{_M}.mlp.experts.local_experts.{{expert}}.linear_fc1.weight",
         (f"{_E}.experts.{{expert}}.w1.weight", f"{_E}.experts.{{expert}}.w3.weight"), "gate_up"),
    Rule(f"{_M}.mlp.experts.local_experts.{{expert}}.linear_fc2.weight", (f"{_E}.experts.{{expert}}.w2.weight",)),
)

TABLES: dict[str, tuple[Rule, ...]] = {
    "MixtralForCausalLM": _COMMON + _MOE_MLP,
    "MistralForCausalLM": _COMMON + _DENSE_MLP,
    "LlamaForCausalLM": _COMMON + _DENSE_MLP,
}


# ---- pure tensor transforms: forward (HF tensors -> megatron tensor) and inverse ----

def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int) -> torch.Tensor:
    """Fuse q/k/v into megatron's ``linear_qkv``: per KV group, its query heads, then its key, then its value."""
    hidden = q.shape[-1]
    q = q.reshape(num_query_groups, -1, hidden)
    k = k.reshape(num_query_groups, -1, hidden)
    v = v.reshape(num_query_groups, -1, hidden)
    if k.shape != v.shape or q.shape[1] % k.shape[1]:
        raise ValueError(f"q/k/v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} do not form "
                         f"{num_query_groups} query groups")
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def qkv_to_hf(qkv: torch.Tensor, num_query_groups: int, num_attention_heads: int) -> list[torch.Tensor]:
    """Split megatron's interleaved ``linear_qkv`` back into HF's q_proj, k_proj, v_proj."""
    hidden = qkv.shape[-1]
    heads_per_group = num_attention_heads // num_query_groups
    head_dim = qkv.shape[0] // (num_query_groups * (heads_per_group + 2))
    grouped = qkv.reshape(num_query_groups, (heads_per_group + 2) * head_dim, hidden)
    q, k, v = torch.split(grouped, [heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, hidden).contiguous() for t in (q, k, v)]


def gate_up_to_mcore(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fuse SwiGLU's gate (w1) and up (w3) projections into megatron's ``linear_fc1`` = [gate; up]."""
    if gate.shape != up.shape:
        raise ValueError(f"gate/up shapes differ: {tuple(gate.shape)} vs {tuple(up.shape)}")
    return torch.cat([gate, up], dim=0)


def gate_up_to_hf(fc1: torch.Tensor) -> list[torch.Tensor]:
    """Split megatron's fused ``linear_fc1`` into (gate, up)."""
    gate, up = torch.chunk(fc1, 2, dim=0)
    return [gate.contiguous(), up.contiguous()]


@dataclass(frozen=True)
class Transform:
    """A forward (HF -> megatron) and inverse (megatron -> HF) pair; both take the preset for shapes."""

    to_mcore: Callable[..., torch.Tensor]
    to_hf: Callable[..., list[torch.Tensor]]


TRANSFORMS: dict[str, Transform] = {
    "copy": Transform(lambda preset, t: t, lambda preset, t: [t]),
    "qkv": Transform(lambda preset, q, k, v: qkv_to_mcore(q, k, v, preset.num_query_groups),
                     lambda preset, t: qkv_to_hf(t, preset.num_query_groups, preset.num_attention_heads)),
    "gate_up": Transform(lambda preset, gate, up: gate_up_to_mcore(gate, up),
                         lambda preset, t: gate_up_to_hf(t)),
}


# ---- expanding the tables for a concrete model ----

@dataclass(frozen=True)
class Mapping:
    """One concrete megatron parameter <-> HF tensors pair (placeholders filled in)."""

    mcore: str
    hf: tuple[str, ...]
    transform: str
    layer: int | None

    def to_mcore(self, preset, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
        """Apply the forward transform."""
        return TRANSFORMS[self.transform].to_mcore(preset, *hf_tensors)

    def to_hf(self, preset, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Apply the inverse transform; returns ``{hf_name: tensor}``."""
        return dict(zip(self.hf, TRANSFORMS[self.transform].to_hf(preset, tensor), strict=True))


def expand(architecture: str, preset) -> list[Mapping]:
    """Every parameter of ``preset``'s model under ``architecture``'s table, in model order."""
    if architecture not in TABLES:
        raise KeyError(f"no mapping table for {architecture!r}; known: {sorted(TABLES)}")
    out: list[Mapping] = []
    for rule in TABLES[architecture]:
        layers = range(preset.num_layers) if "{layer}" in rule.mcore else [None]
        experts = range(preset.num_experts or 0) if "{expert}" in rule.mcore else [None]
        for layer in layers:
            for expert in experts:
                out.append(Mapping(
                    mcore=rule.mcore.format(layer=layer, expert=expert),
                    hf=tuple(h.format(layer=layer, expert=expert) for h in rule.hf),
                    transform=rule.transform,
                    layer=layer,
                ))
    return out


def expected_hf_shapes(architecture: str, preset) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor the architecture's model of ``preset`` has."""
    hidden, ffn, head_dim = preset.hidden_size, preset.ffn_hidden_size, preset.head_dim
    kv = preset.num_query_groups * head_dim
    by_suffix: list[tuple[tuple[str, ...], tuple[int, ...]]] = [
        (("embed_tokens.weight", "lm_head.weight"), (preset.vocab_size, hidden)),
        (("layernorm.weight", "model.norm.weight"), (hidden,)),
        (("q_proj.weight", "o_proj.weight"), (hidden, hidden)),
        (("k_proj.weight", "v_proj.weight"), (kv, hidden)),
        (("gate_proj.weight", "up_proj.weight", ".w1.weight", ".w3.weight"), (ffn, hidden)),
        (("down_proj.weight", ".w2.weight"), (hidden, ffn)),
        (("block_sparse_moe.gate.weight",), (preset.num_experts or 0, hidden)),
    ]
    shapes = {}
    for mapping in expand(architecture, preset):
        for name in mapping.hf:
            shapes[name] = next(shape for suffixes, shape in by_suffix if name.endswith(suffixes))
    return shapes


def group_by_layer(mappings: list[Mapping]) -> Iterator[tuple[int | None, list[Mapping]]]:
    """Yield ``(layer, mappings)`` groups: non-layer parameters first, then each layer in order."""
    outer = [m for m in mappings if m.layer is None]
    if outer:
        yield None, outer
    layers = sorted({m.layer for m in mappings if m.layer is not None})
    for layer in layers:
        yield layer, [m for m in mappings if m.layer == layer]
