"""Core attention that gathers each part's keys instead of masking a dense ``S × S`` score matrix.

megatron's local ``DotProductAttention`` materialises ``[R, heads, S, S]`` scores and masks them. For a
shared-prompt row ``[prompt | y_1 | ... | y_K]`` (or a packed row of independent sequences) most of that
matrix is masked: on an H100 a K=8 list of ≤ 2048-token sequences (S up to ~16k) ran out of memory there
(docs/performance.md §5). ``GatheredDotProductAttention`` computes the same attention part by part:

- every prompt (or packed sequence) attends causally to itself: one batched SDPA call with ``is_causal``
  over the prompts gathered into ``[G, L, heads, dim]`` (right-padded; a real query never sees the padding);
- every response attends to its list's prompt and causally to itself: its keys are gathered as
  ``[prompt | response]`` (the prompt's K/V copied once per response, their gradients summed back by the
  gather's backward) and one batched SDPA call takes the ``[G, Lq, Lp + Lr]`` mask.

No ``S²`` tensor is built, SDPA picks a fused kernel (flash / memory-efficient on GPU, the flash kernel on CPU),
and the masked response-response blocks are never computed. The model receives the layout instead of a mask:
``attention_layout(segment_ids, part_ids)``, an int64 ``[R, 2, S]`` tensor passed as ``attention_mask``; a
boolean mask still takes megatron's dense path, so padded batches are unchanged, and so are checkpoints (the
module has no parameters).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention


def attention_layout(segment_ids: torch.Tensor, part_ids: torch.Tensor) -> torch.Tensor:
    """The ``attention_mask`` argument for the gathered path: ``[R, 2, S]`` int64 (segment ids, part ids).

    segment_ids: [R, S], the list (or packed sequence) of each token, -1 at padding; part_ids: [R, S], 0 for
    the prompt (or a whole packed sequence), k + 1 for response k. Each (segment, part) must be contiguous
    within its row, and a response must follow its segment's prompt (the collators' layouts).
    """
    return torch.stack((segment_ids, part_ids), dim=1).to(torch.int64)


def is_attention_layout(attention_mask) -> bool:
    """Whether an ``attention_mask`` argument is an ``attention_layout`` (else a boolean mask or None)."""
    return isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.int64 and attention_mask.dim() == 3


def packed_layout(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The ``attention_layout`` of one packed row ``[1, S]`` of independent sequences (tail padding: -1)."""
    positions = torch.arange(seq_len, device=cu_seqlens.device)
    boundaries = cu_seqlens.to(device=positions.device, dtype=positions.dtype)
    segment = torch.bucketize(positions, boundaries[1:], right=True)
    segment = torch.where(positions < boundaries[-1], segment, -1)[None]
    return attention_layout(segment, torch.zeros_like(segment))


def takes_attention_layout(model) -> bool:
    """Whether ``model`` (possibly wrapped) has core attentions that take a layout (``accepts_attention_layout``)."""
    if not isinstance(model, torch.nn.Module):
        return False
    found = getattr(model, "_nemo_lpo_gathered_attention", None)
    if found is None:
        # the local GatheredDotProductAttention or TE's TEGatheredDotProductAttention (nemo_lpo/model/te_attention.py)
        found = any(getattr(m, "accepts_attention_layout", False) for m in model.modules())
        model._nemo_lpo_gathered_attention = found
    return found


@dataclasses.dataclass
class PartBatch:
    """Parts of similar length attended in one SDPA call; flat token indices into ``R * S``.

    query_index / query_valid: [G, Lq] the parts' query positions (padding repeats a real position) and which
    are real. key_index: [G, Lk] their key positions, the same as the queries for a prompt or packed sequence
    (causal) and ``[prompt | response]`` for a response. mask: None (causal) or [G, 1, Lq, Lk], True = attend.
    """

    query_index: torch.Tensor
    query_valid: torch.Tensor
    key_index: torch.Tensor
    mask: torch.Tensor | None


def _length_buckets(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Indices of ``lengths`` grouped so that a group's longest is < 2x its shortest (padding at most 2x).

    One padded batch of a 2000-token part with seven 20-token ones would cost more than the dense row.
    """
    order = torch.argsort(lengths, descending=True, stable=True)
    buckets, current, longest = [], [], None
    for index, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        if current and 2 * length <= longest:
            buckets.append(current)
            current = []
        if not current:
            longest = length
        current.append(index)
    buckets.append(current)
    return [torch.tensor(bucket, device=lengths.device) for bucket in buckets]


def _runs(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G, max(lengths)]`` indices ``start + j`` (padding repeats ``start``) and the validity mask."""
    j = torch.arange(int(lengths.max()), device=starts.device)
    valid = j[None, :] < lengths[:, None]
    return torch.where(valid, starts[:, None] + j[None, :], starts[:, None]), valid


def _response_batch(start, length, prompt_start, prompt_length) -> PartBatch:
    query_index, query_valid = _runs(start, length)
    j = torch.arange(int((prompt_length + length).max()), device=start.device)[None, :]
    in_prompt = j < prompt_length[:, None]
    in_response = ~in_prompt & (j < (prompt_length + length)[:, None])
    key_index = torch.where(in_prompt, prompt_start[:, None] + j,
                            torch.where(in_response, start[:, None] + j - prompt_length[:, None], prompt_start[:, None]))
    i = torch.arange(query_index.shape[1], device=start.device)[None, :, None]
    own = (j[:, None, :] - prompt_length[:, None, None]) <= i  # the response's own keys up to the query
    mask = in_prompt[:, None, :] | (in_response[:, None, :] & own)
    return PartBatch(query_index, query_valid, key_index, mask[:, None])


@dataclasses.dataclass
class LayoutRuns:
    """The parts of an ``attention_layout``: contiguous (row, segment, part) runs, flat token indices into ``R * S``.

    starts / lengths: [P] each run's first token and length; is_prompt: [P] part 0 (a prompt or a whole packed
    sequence); prompt_of_run: [P] the index of the latest prompt run at or before each run (-1 before the first);
    real: [R * S] which tokens are not padding; segment: [R * S] the flat segment ids; row_length: S.
    """

    starts: torch.Tensor
    lengths: torch.Tensor
    is_prompt: torch.Tensor
    prompt_of_run: torch.Tensor
    real: torch.Tensor
    segment: torch.Tensor
    row_length: int


def layout_runs(layout: torch.Tensor) -> LayoutRuns:
    """The runs of an ``attention_layout`` (shared by the local gathered path and the TE varlen plan)."""
    segment, part = layout[:, 0].reshape(-1), layout[:, 1].reshape(-1)
    row_length = layout.shape[2]
    positions = torch.arange(segment.numel(), device=layout.device)
    real = segment >= 0
    starts_run = real & ((positions % row_length == 0) | (segment != torch.roll(segment, 1))
                         | (part != torch.roll(part, 1)))
    starts = positions[starts_run]
    run_of_token = torch.cumsum(starts_run.to(torch.int64), 0) - 1
    lengths = torch.bincount(run_of_token[real], minlength=starts.numel())
    is_prompt = part[starts] == 0
    run_ids = torch.arange(starts.numel(), device=layout.device)
    prompt_of_run = torch.cummax(torch.where(is_prompt, run_ids, -1), 0).values
    return LayoutRuns(starts, lengths, is_prompt, prompt_of_run, real, segment, row_length)


def plan_attention(layout: torch.Tensor) -> list[PartBatch]:
    """The SDPA batches of an ``attention_layout``: contiguous (row, segment, part) runs are the parts."""
    runs = layout_runs(layout)
    starts, lengths, is_prompt, prompt_of_run, segment = (runs.starts, runs.lengths, runs.is_prompt,
                                                          runs.prompt_of_run, runs.segment)
    batches = []
    prompt_start, prompt_length = starts[is_prompt], lengths[is_prompt]
    for bucket in _length_buckets(prompt_length):
        query_index, query_valid = _runs(prompt_start[bucket], prompt_length[bucket])
        batches.append(PartBatch(query_index, query_valid, query_index, None))
    responses = ~is_prompt
    if not bool(responses.any()):
        return batches
    own_prompt = prompt_of_run[responses]
    if bool((own_prompt < 0).any()) or bool((segment[starts[own_prompt]] != segment[starts[responses]]).any()):
        raise ValueError("attention layout: a response does not follow its list's prompt in the same row")
    start, length = starts[responses], lengths[responses]
    for bucket in _length_buckets(length):
        batches.append(_response_batch(start[bucket], length[bucket], starts[own_prompt][bucket],
                                       lengths[own_prompt][bucket]))
    return batches


def with_core_attention(block_spec, expected: type, replacement: type):
    """A copy of a decoder block spec whose layers' core attention ``expected`` becomes ``replacement``.

    Raises:
        TypeError: a layer holds another core attention (the spec is not the one the caller expects).
    """
    block_spec = copy.deepcopy(block_spec)  # layers may share one submodules object: set once, seen by all
    for layer in block_spec.layer_specs:
        attention = layer.submodules.self_attention.submodules
        if attention.core_attention not in (expected, replacement):
            raise TypeError(f"expected {expected.__name__} in the layer spec, got {attention.core_attention}")
        attention.core_attention = replacement
    return block_spec


class GatheredDotProductAttention(DotProductAttention):
    """megatron's local core attention, with the gathered path for an ``attention_layout`` "mask".

    Same constructor, same output ``[S, R, heads * dim / tp]``; a boolean mask goes to megatron's dense path.
    """

    accepts_attention_layout = True

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """``DotProductAttention.forward``; the gathered computation when ``attention_mask`` is a layout."""
        if not is_attention_layout(attention_mask):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None or self.softmax_offset is not None:
            raise ValueError("the gathered attention path takes no packed_seq_params, attention_bias or "
                             "softmax offset")
        cached = getattr(attention_mask, "_nemo_lpo_plan", None)
        if cached is None:  # once per forward: every layer gets the same layout tensor
            plan = plan_attention(attention_mask)
            cached = plan, torch.cat([batch.query_index[batch.query_valid] for batch in plan])
            attention_mask._nemo_lpo_plan = cached
        plan, index = cached
        seq, rows, heads, dim = query.shape
        flat = [x.transpose(0, 1).reshape(rows * seq, x.shape[2], dim) for x in (query, key, value)]
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        dropout = self.attention_dropout.p if self.training else 0.0
        if dropout and not self.config.sequence_parallel:  # the same RNG stream megatron's dense path uses
            with tensor_parallel.get_cuda_rng_tracker().fork():
                outputs = self._parts(flat, plan, scale, dropout)
        else:
            outputs = self._parts(flat, plan, scale, dropout)
        values = torch.cat([out[batch.query_valid] for batch, out in zip(plan, outputs, strict=True)])
        context = flat[0].new_zeros(rows * seq, heads, dim).index_copy(0, index, values)
        return context.view(rows, seq, heads * dim).transpose(0, 1).contiguous()

    @staticmethod
    def _parts(flat, plan: list[PartBatch], scale: float, dropout: float):
        """The output ``[G, Lq, heads, dim]`` of every batch of the plan."""
        query, key, value = flat
        groups = query.shape[1] // key.shape[1]
        outputs = []
        for batch in plan:
            q, k, v = (x[idx].transpose(1, 2) for x, idx in ((query, batch.query_index), (key, batch.key_index),
                                                              (value, batch.key_index)))
            if groups > 1:  # as megatron's dense path; SDPA's enable_gqa would rule out the masked fused kernel
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, dropout_p=dropout, scale=scale,
                                                 is_causal=batch.mask is None)
            outputs.append(out.transpose(1, 2))
        return outputs
