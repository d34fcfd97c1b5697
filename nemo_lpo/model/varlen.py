"""Varlen (THD) plans for Transformer Engine: packed batches as ``PackedSeqParams``, shared-prompt rows as K/V gathers.

Pure index math on the collators' outputs, executed and tested on CPU; ``nemo_lpo/model/te_attention.py`` feeds
the same plans to TE's ``DotProductAttention`` on a GPU.

Packed batches (``ListwiseCollator(packed=True)``: one row ``[1, S]`` of independent sequences, ``cu_seqlens``,
tail padding up to ``pad_to_multiple_of``) go through megatron's own padding-free path:
``GPTModel.forward(..., packed_seq_params=PackedSeqParams(qkv_format="thd", ...))``. What megatron-core 0.19.2
does with it (read from its source):

- ``transformer/attention.py`` ``Attention.forward`` squeezes the batch dimension of q/k/v (tokens must be
  ``[1, S]``), applies RoPE with ``cu_seqlens_q/kv`` (the ``_padded`` variants when given), calls the core
  attention with ``packed_seq_params`` and reshapes its ``[t, heads * dim]`` output back to ``[t, 1, h]``;
- ``models/common/embeddings/rotary_pos_embedding.py`` ``get_rotary_seq_len`` returns
  ``max(max_seqlen_q, max_seqlen_kv)``, and ``rope_utils._apply_rotary_pos_emb_thd`` (TE's fused THD RoPE
  alike) restarts the angles at 0 at every ``cu_seqlens`` boundary: per-sequence RoPE, exactly the packed
  collator's ``position_ids`` (0..len-1 per sequence; the tail padding 0..pad-1). The model is therefore
  called WITHOUT ``position_ids`` (``GPTModelWithPositions`` would otherwise replace the angles by per-token
  ones that a fused THD RoPE would index from 0 again);
- ``extensions/transformer_engine.py`` ``TEDotProductAttention.forward`` turns ``causal`` into
  ``padding_causal`` for THD and passes the ``PackedSeqParams`` fields to TE.

The tail padding becomes a sequence of its own (as ``packed_causal_mask`` treats it on the local path), so
``cu_seqlens[-1] == S`` and no ``*_padded`` variant is needed: megatron's own ``get_padding`` /
``get_packed_seq_params`` (``models/multimodal/context_parallel.py``) pad the total length to ``tp`` for
sequence parallelism (and to 16/32 tokens for FP8 without SP and CP only; TE's own rule, which this module
applies, is ``fp8_length_multiple``) and set the padded variants only for context
parallelism, which needs every sequence padded to ``2 * cp`` between sequences; the packed collator lays
sequences back to back, so ``cp > 1`` is refused. Keeping the padded variants unset also keeps TE's
FlashAttention eligible (``attention/dot_product_attention/utils.py`` ``get_attention_backend`` disables
FlashAttention 2 and the unfused backend when ``pad_between_seqs``) and leaves no uninitialised output rows.

Shared-prompt rows (``attention_layout(segment_ids, part_ids)``) become ONE varlen call with separate query
and key layouts (docs/performance.md §3): each prompt (or packed sequence) is a segment whose keys are itself;
each response is a segment whose keys are ``[its prompt | itself]``; with a bottom-right-aligned causal mask
a response token sees the whole prompt and its own response up to itself, and a prompt attends causally to
itself once. ``varlen_plan`` gives the gather indices and ``cu_seqlens``; ``gathered_varlen_attention`` runs
a kernel on them; ``reference_varlen_kernel`` is that kernel in plain PyTorch (SDPA per segment).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

from nemo_lpo.model.attention import layout_runs
from nemo_lpo.model.gpt import unwrapped_attribute

# TE's FP8 GEMM inputs: each rank's LOCAL token count (the product of the leading dims of a Linear's input) must be
# a multiple of 8 (transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec, called on the local input in
# module/linear.py, layernorm_linear.py, layernorm_mlp.py); MXFP8 quantisation needs 32 (MXFP8_BLOCK_SIZE,
# pytorch/csrc/quantizer.cpp MXFP8Quantizer; constants.py MXFP8_BLOCK_SCALING_SIZE)
FP8_LOCAL_TOKEN_MULTIPLE = {"mxfp8": 32}
FP8_DEFAULT_LOCAL_TOKEN_MULTIPLE = 8


# TE rounds max_seqlen_q/kv it derives itself up to a multiple of 64 (attention/dot_product_attention/
# dot_product_attention.py, DotProductAttention.forward, THD: ``(max + 63) // 64 * 64``); its cuDNN graph cache is
# keyed on them (common/fused_attn/fused_attn_f16_arbitrary_seqlen.cu), so exact maxima would rebuild the forward
# and backward graphs for nearly every listwise batch.
MAX_SEQLEN_MULTIPLE = 64


def te_max_seqlen(longest: int) -> int:
    """``longest`` rounded up to a multiple of 64, as TE rounds the ``max_seqlen`` it computes itself."""
    return -(-int(longest) // MAX_SEQLEN_MULTIPLE) * MAX_SEQLEN_MULTIPLE


def fp8_length_multiple(fp8_recipe: str | None, *, tp: int = 1, sequence_parallel: bool = False) -> int:
    """The multiple a row length S must have for TE's FP8 GEMMs (1 without FP8): TE's rule, read from its source.

    TE checks each rank's local tokens: 8 (32 for ``mxfp8``). Without sequence parallelism every TP rank holds all
    S tokens; with it each holds S / tp, so S must be a multiple of tp * 8 (tp * 32). A ``[B, S]`` batch has B * S
    local tokens, so a multiple of S suffices for every layout.

    Args:
        fp8_recipe: the FP8 recipe when FP8 runs (``model.fp8_recipe``; megatron's default is ``delayed``);
            None: no FP8.
        tp: tensor-parallel size.
        sequence_parallel: sequence parallelism over ``tp``.
    """
    if fp8_recipe is None:
        return 1
    local = FP8_LOCAL_TOKEN_MULTIPLE.get(fp8_recipe, FP8_DEFAULT_LOCAL_TOKEN_MULTIPLE)
    return local * tp if sequence_parallel else local


def _checked_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    cu = torch.as_tensor(cu_seqlens).reshape(-1).to(torch.int64)
    if cu.numel() < 2 or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0 and hold at least one sequence, got {cu.tolist()}")
    if bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty sequence), got {cu.tolist()}")
    if int(cu[-1]) > seq_len:
        raise ValueError(f"cu_seqlens ends at {int(cu[-1])}, past the row length S={seq_len}")
    return cu


def packed_seq_params(cu_seqlens: torch.Tensor, seq_len: int, *, tp: int = 1, sequence_parallel: bool = False,
                      cp: int = 1, fp8_recipe: str | None = None) -> PackedSeqParams:
    """The ``PackedSeqParams`` (megatron's THD format) for a packed row ``[1, seq_len]`` with boundaries ``cu_seqlens``.

    Args:
        cu_seqlens: ``[n + 1]`` sequence boundaries (the packed collator's ``cu_seqlens``).
        seq_len: the row length S (tail padding included).
        tp: tensor-parallel size.
        sequence_parallel: sequence parallelism over ``tp`` (S must then be a multiple of ``tp``).
        cp: context-parallel size; only 1 is served (see the module docstring).
        fp8_recipe: the FP8 recipe when FP8 runs (S must then satisfy ``fp8_length_multiple``), else None.

    Returns:
        ``PackedSeqParams(qkv_format="thd")`` with int32 ``cu_seqlens_q == cu_seqlens_kv`` ending at S (tail
        padding as a last sequence of its own), no padded variants, and Python-int ``max_seqlen_q/kv`` (the longest
        sequence rounded up to 64: ``te_max_seqlen``; 64 more where that would equal S, see the code).

    Raises:
        ValueError: malformed ``cu_seqlens``, an S that the parallel layout or FP8 cannot split, or cp > 1.
    """
    cu = _checked_cu_seqlens(cu_seqlens, seq_len)
    if cp > 1:
        raise ValueError(f"context parallelism (cp={cp}) with packed THD batches needs every sequence padded to a "
                         f"multiple of 2*cp={2 * cp} and cu_seqlens_q/kv_padded; the packed collator lays sequences "
                         "back to back: use cp=1, or padded batches")
    if sequence_parallel and seq_len % tp:
        raise ValueError(f"sequence parallelism over tp={tp} needs S divisible by {tp}, got S={seq_len}: set the "
                         f"packed collator's pad_to_multiple_of to a multiple of {tp}")
    fp8_multiple = fp8_length_multiple(fp8_recipe, tp=tp, sequence_parallel=sequence_parallel)
    if seq_len % fp8_multiple:
        local = f"S/tp = {seq_len}/{tp} local tokens" if sequence_parallel and tp > 1 else f"S = {seq_len} tokens"
        raise ValueError(f"FP8 ({fp8_recipe}) GEMMs need each rank's local token count divisible by "
                         f"{fp8_multiple // (tp if sequence_parallel else 1)}, got {local}: pad the packed row to a "
                         f"multiple of {fp8_multiple} (the trainer's run_pad_multiple does)")
    if int(cu[-1]) < seq_len:
        cu = torch.cat([cu, cu.new_tensor([seq_len])])
    cu = cu.to(torch.int32)
    longest = te_max_seqlen(int((cu[1:] - cu[:-1]).max()))
    if longest == seq_len and cu.numel() > 2:
        # megatron's THD RoPE (rope_utils._apply_rotary_pos_emb_thd) takes a table of exactly cu_seqlens[-1] rows
        # (its length is max(max_seqlen_q, max_seqlen_kv)) as whole-row positions instead of restarting them at
        # each sequence: keep the rounded maximum off S
        longest += MAX_SEQLEN_MULTIPLE
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def thd_attention_inputs(batch: dict, model=None, *, fp8_recipe: str | None = None) -> dict:
    """The attention arguments of ``GPTModel.forward`` for a packed batch on TE's layer spec (THD, no mask).

    ``PackedLayout.model_inputs`` adds tokens, labels and the MoE padding mask around them.

    Args:
        batch: the packed collator's batch (``tokens`` ``[1, S]``, ``cu_seqlens``), on the model's device.
        model: the (wrapped) model: its config gives tp / sequence parallelism; None: one process.
        fp8_recipe: the FP8 recipe when FP8 runs (default: read from the model's config when ``fp8`` is set).

    ``position_ids`` is left out on purpose: megatron's THD RoPE restarts the angles at every sequence
    boundary (module docstring), which are the collator's positions.
    """
    tokens = batch["tokens"]
    if "cu_seqlens" not in batch or tokens.dim() != 2 or tokens.shape[0] != 1:
        raise ValueError(f"a packed batch has tokens [1, S] and cu_seqlens, got tokens {tuple(tokens.shape)} and "
                         f"keys {sorted(batch)}")
    config = unwrapped_attribute(model, "config")
    if fp8_recipe is None and getattr(config, "fp8", None):
        fp8_recipe = getattr(config, "fp8_recipe", "delayed")
        fp8_recipe = getattr(fp8_recipe, "value", fp8_recipe)
    params = packed_seq_params(batch["cu_seqlens"].to(tokens.device), tokens.shape[1],
                               tp=getattr(config, "tensor_model_parallel_size", 1),
                               sequence_parallel=getattr(config, "sequence_parallel", False),
                               cp=getattr(config, "context_parallel_size", 1), fp8_recipe=fp8_recipe)
    return {"position_ids": None, "attention_mask": None, "packed_seq_params": params}


# megatron-core 0.19.2 TransformerConfig fields that megatron's TEDotProductAttention.forward serves and the direct TE
# call of TEGatheredDotProductAttention (te_attention.py) cannot: with qk_clip / log_max_attention_logit megatron
# asks TE for return_max_logit, so TE returns (output, max_logit) and the gathered path's reshape would crash;
# batch_invariant_mode sets num_splits=1, which the gathered call would ignore (no batch invariance).
# nemo-lpo's config has no such fields (the loader refuses model.qk_clip & co as unknown keys), so they reach a
# TransformerConfig only through presets.transformer_config(**overrides) in Python: model build (layer_spec) is the
# earliest point that sees them, and the class's constructor refuses them again.
TE_GATHERED_UNSUPPORTED = {
    "qk_clip": "TE returns (output, max_logit) and megatron's per-layer max-logit statistics are not kept",
    "log_max_attention_logit": "TE returns (output, max_logit) and megatron's per-layer max-logit statistics are "
                               "not kept",
    "batch_invariant_mode": "its num_splits=1 would be ignored, so the attention would not be batch-invariant",
}


def check_te_gathered_config(config) -> None:
    """Refuse, by name, the TransformerConfig fields that TE's gathered varlen attention cannot honour.

    Raises:
        ValueError: ``qk_clip``, ``log_max_attention_logit`` or ``batch_invariant_mode`` is set.
    """
    found = [name for name in TE_GATHERED_UNSUPPORTED if getattr(config, name, False)]
    if found:
        reasons = "; ".join(f"{name}: {TE_GATHERED_UNSUPPORTED[name]}" for name in found)
        raise ValueError(f"TransformerConfig {', '.join(found)} cannot be served by Transformer Engine's gathered "
                         f"varlen attention (model.te_varlen_attention, shared-prompt rows): {reasons}. Unset them, "
                         "or use padded / packed batches")


@dataclasses.dataclass
class VarlenPlan:
    """One varlen attention call over an ``attention_layout``; indices are flat token positions in ``R * S``.

    query_index: [Tq] the real tokens in row order; every (row, segment, part) run is one query segment.
    key_index: [Tk] each segment's keys: itself for a prompt / packed sequence, ``[prompt | itself]`` for a
    response. cu_seqlens_q / cu_seqlens_kv: [n + 1] int32 segment boundaries in the gathered tensors.
    max_seqlen_q / max_seqlen_kv: the longest segment rounded up to 64 (``te_max_seqlen``; Python ints: TE takes
    them without a device sync).
    """

    query_index: torch.Tensor
    key_index: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_kv: torch.Tensor
    max_seqlen_q: int
    max_seqlen_kv: int


def _cumulative(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)]).to(torch.int32)


def varlen_plan(layout: torch.Tensor) -> VarlenPlan:
    """The varlen plan of an ``attention_layout`` ``[R, 2, S]`` (segment ids, part ids; -1 = padding).

    Raises:
        ValueError: a response run that does not follow its list's prompt in the same row.
    """
    runs = layout_runs(layout)
    starts, lengths, is_prompt, prompt_of_run = runs.starts, runs.lengths, runs.is_prompt, runs.prompt_of_run
    segment, row_length, real = runs.segment, runs.row_length, runs.real
    positions = torch.arange(segment.numel(), device=layout.device)
    run_ids = torch.arange(starts.numel(), device=layout.device)
    responses = ~is_prompt
    own = prompt_of_run.clamp_min(0)
    same_row = starts[own] // row_length == starts // row_length
    if bool((responses & ((prompt_of_run < 0) | (segment[starts[own]] != segment[starts]) | ~same_row)).any()):
        raise ValueError("attention layout: a response does not follow its list's prompt in the same row")
    prefix = torch.where(responses, lengths[own], 0)  # the prompt keys gathered in front of a response
    kv_lengths = lengths + prefix
    cu_q, cu_kv = _cumulative(lengths), _cumulative(kv_lengths)
    run_of_key = torch.repeat_interleave(run_ids, kv_lengths)
    j = torch.arange(int(cu_kv[-1]), device=layout.device) - cu_kv[:-1].to(torch.int64)[run_of_key]
    in_prompt = j < prefix[run_of_key]
    key_index = torch.where(in_prompt, starts[own][run_of_key] + j, starts[run_of_key] + j - prefix[run_of_key])
    return VarlenPlan(query_index=positions[real], key_index=key_index, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_kv,
                      max_seqlen_q=te_max_seqlen(int(lengths.max())), max_seqlen_kv=te_max_seqlen(int(kv_lengths.max())))


# Recent plans by the layout's memory and version: selective recompute re-runs core attention in backward on
# DETACHED inputs (megatron's CheckpointWithoutOutput / tensor_parallel.checkpoint), new tensor objects that lose
# the attribute cache but share the storage and version counter. An entry holds its layout tensor, so no other
# tensor can take that address while the entry lives; an in-place change bumps the version.
_PLAN_CACHE: OrderedDict[tuple, tuple[torch.Tensor, VarlenPlan]] = OrderedDict()
PLAN_CACHE_SIZE = 16  # micro-batches in flight (pipeline schedules, recompute in backward) before the oldest is dropped


def _plan_key(layout: torch.Tensor) -> tuple:
    return layout.data_ptr(), str(layout.device), tuple(layout.shape), layout.stride(), layout._version


def cached_varlen_plan(layout: torch.Tensor) -> VarlenPlan:
    """``varlen_plan(layout)``, computed once per micro-batch: every layer, and its recompute in backward, gets it.

    The forward's layers receive the same layout tensor (an attribute cache); recompute receives a detached
    alias of it (found by storage address, shape, stride and version in a small cache). Both are keyed on the
    tensor's version, so a buffer refilled in place (``copy_``) for the next micro-batch gets its own plan;
    writes that bypass autograd's version counter (``.data``, a shared numpy array) are not seen.
    """
    version, plan = getattr(layout, "_nemo_lpo_varlen_plan", (None, None))
    if plan is not None and version == layout._version:
        return plan
    key = _plan_key(layout)
    if key in _PLAN_CACHE:
        _PLAN_CACHE.move_to_end(key)
        plan = _PLAN_CACHE[key][1]
    else:
        plan = varlen_plan(layout)
        _PLAN_CACHE[key] = (layout, plan)
        while len(_PLAN_CACHE) > PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    layout._nemo_lpo_varlen_plan = (layout._version, plan)
    return plan


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, VarlenPlan], torch.Tensor]


def gathered_varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: VarlenPlan,
                              kernel: Kernel) -> torch.Tensor:
    """Core attention of ``[S, R, heads, dim]`` q/k/v through a THD varlen ``kernel`` on ``plan``.

    The gathers copy each prompt's K/V once per response (their gradients are summed back by the gathers'
    backward); ``kernel(q [Tq, h, d], k [Tk, g, d], v [Tk, g, d], plan)`` returns ``[Tq, h * d]`` (or
    ``[Tq, h, d]``). Padding tokens get zero outputs. Returns ``[S, R, heads * dim]``, megatron's layout.
    """
    seq, rows = query.shape[:2]
    flat = [x.transpose(0, 1).reshape(rows * seq, *x.shape[2:]) for x in (query, key, value)]
    q = flat[0].index_select(0, plan.query_index)
    k, v = (x.index_select(0, plan.key_index) for x in flat[1:])
    out = kernel(q, k, v, plan).reshape(q.shape[0], -1)
    context = out.new_zeros(rows * seq, out.shape[1]).index_copy(0, plan.query_index, out)
    return context.view(rows, seq, -1).transpose(0, 1).contiguous()


def bottom_right_causal_mask(lq: int, lk: int, device=None) -> torch.Tensor:
    """``[lq, lk]`` True where query i sees key j: ``j <= i + lk - lq`` (TE's ``padding_causal_bottom_right``)."""
    return torch.arange(lk, device=device)[None, :] <= torch.arange(lq, device=device)[:, None] + lk - lq


def reference_varlen_kernel(scale: float | None = None, mask: Callable = bottom_right_causal_mask) -> Kernel:
    """TE's THD ``padding_causal_bottom_right`` attention in plain PyTorch: one SDPA call per segment.

    Query i of a segment with ``Lq`` queries and ``Lk`` keys attends to keys ``j <= i + Lk - Lq`` (the causal
    diagonal aligned to the bottom-right corner, TE's definition in ``attention/dot_product_attention/
    utils.py`` ``get_full_mask``). GQA groups are repeated as megatron's local path does. For tests and CPU
    checks; a GPU runs TE's fused kernels on the same plan. ``mask(lq, lk, device)`` replaces the mask (the
    self-check's planted errors).
    """

    def kernel(q, k, v, plan: VarlenPlan) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        outputs = []
        bounds_q, bounds_kv = plan.cu_seqlens_q.tolist(), plan.cu_seqlens_kv.tolist()
        for i in range(len(bounds_q) - 1):
            (q0, q1), (k0, k1) = bounds_q[i:i + 2], bounds_kv[i:i + 2]
            qs, ks, vs = (x.transpose(0, 1) for x in (q[q0:q1], k[k0:k1], v[k0:k1]))  # [heads, L, d]
            if groups > 1:
                ks, vs = ks.repeat_interleave(groups, dim=0), vs.repeat_interleave(groups, dim=0)
            allowed = mask(q1 - q0, k1 - k0, q.device)
            outputs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed, scale=scale).transpose(0, 1))
        return torch.cat(outputs)

    return kernel
