"""The FLOP model of a training step (Megatron / PaLM accounting), used by the trainer's MFU and the benchmarks.

2 FLOPs per multiply-add over the ACTIVE parameters a token passes through (attention projections, the top-k
experts and the router for MoE, the output layer once), plus causal attention as 4·h FLOPs per attended
(query, key) pair per layer (QK^T and AV); backward = 2 x forward.
"""

from __future__ import annotations


def _layer_matmul_weights(preset, experts: int) -> int:
    """Weights of one layer's matmuls with ``experts`` expert MLPs (attention projections, SwiGLU MLPs, router)."""
    h, ffn = preset.hidden_size, preset.ffn_hidden_size
    kv = preset.num_query_groups * preset.head_dim
    router = h * preset.num_experts if preset.is_moe else 0
    return h * (h + 2 * kv) + h * h + 3 * h * ffn * experts + router


def active_linear_flops_per_token(preset) -> float:
    """Forward FLOPs of the matmuls one token passes through (attention projections, top-k experts, output layer)."""
    per_layer = _layer_matmul_weights(preset, preset.moe_router_topk if preset.is_moe else 1)
    return 2.0 * (preset.num_layers * per_layer + preset.hidden_size * preset.vocab_size)


def parameter_count(preset) -> int:
    """Every parameter of the model: all experts, untied input and output embeddings, the RMSNorm weights."""
    h = preset.hidden_size
    per_layer = _layer_matmul_weights(preset, preset.num_experts or 1) + 2 * h
    return preset.num_layers * per_layer + 2 * h * preset.vocab_size + h


def attention_flops(preset, attended_pairs: float) -> float:
    """Forward FLOPs of the core attention over ``attended_pairs`` (query, key) pairs, all layers."""
    return 4.0 * preset.hidden_size * preset.num_layers * attended_pairs


def forward_flops(preset, tokens: float, attended_pairs: float) -> float:
    """One forward over ``tokens`` tokens whose attention covers ``attended_pairs`` pairs."""
    return tokens * active_linear_flops_per_token(preset) + attention_flops(preset, attended_pairs)


def step_flops(preset, tokens: int, attended_pairs: float, *, reference_forward: bool, recompute: bool) -> float:
    """Model FLOPs of one step over ``tokens`` tokens: forward + backward (3 forwards).

    ``attended_pairs``: the (query, key) pairs the batch layout's attention needs (``BatchLayout.attended_pairs``:
    each sequence's causal triangle; a shared-prompt row's prompt once plus each response's prompt block and
    triangle). The online reference adds one forward; full recompute adds one more policy forward.
    """
    forward = forward_flops(preset, tokens, attended_pairs)
    passes = 3 + (1 if recompute else 0) + (1 if reference_forward else 0)
    return forward * passes
