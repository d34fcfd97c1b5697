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
boolean mask still takes megatron's dense path, so padded batches and TE-free checkpoints are unchanged
(the module has no parameters).
"""

from __future__ import annotations

import contextlib
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


_DENSE = {"forced": False}


@contextlib.contextmanager
def dense_attention():
    """Within it, batches get megatron's dense boolean masks even where the gathered path exists (benchmarks)."""
    before = _DENSE["forced"]
    _DENSE["forced"] = True
    try:
        yield
    finally:
        _DENSE["forced"] = before


def takes_attention_layout(model) -> bool:
    """Whether ``model`` (possibly wrapped) has ``GatheredDotProductAttention`` layers to hand a layout to."""
    if not isinstance(model, torch.nn.Module) or _DENSE["forced"]:
        return False
    found = getattr(model, "_nemo_lpo_gathered_attention", None)
    if found is None:
        found = any(isinstance(m, GatheredDotProductAttention) for m in model.modules())
        model._nemo_lpo_gathered_attention = found
    return found


@dataclasses.dataclass
class _Plan:
    """Flat token indices (into ``R * S``) gathered per part, with what SDPA needs for each batch."""

    prompt_index: torch.Tensor  # [Gp, Lp] query = key positions of each prompt, padded with its first token
    prompt_valid: torch.Tensor  # [Gp, Lp] bool
    response_index: torch.Tensor | None  # [Gr, Lr] query positions of each response
    response_valid: torch.Tensor | None  # [Gr, Lr] bool
    response_keys: torch.Tensor | None  # [Gr, Lkv] key positions: the prompt, then the response
    response_mask: torch.Tensor | None  # [Gr, 1, Lr, Lkv] bool, True = attend


def _runs(starts: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G, max(lengths)]`` indices ``start + j`` (padding repeats ``start``) and the validity mask."""
    j = torch.arange(int(lengths.max()), device=starts.device)
    valid = j[None, :] < lengths[:, None]
    return torch.where(valid, starts[:, None] + j[None, :], starts[:, None]), valid


def plan_attention(layout: torch.Tensor) -> _Plan:
    """The gather plan of an ``attention_layout``: contiguous (row, segment, part) runs become parts."""
    segment, part = layout[:, 0].reshape(-1), layout[:, 1].reshape(-1)
    row_length = layout.shape[2]
    positions = torch.arange(segment.numel(), device=layout.device)
    real = segment >= 0
    previous_segment = torch.roll(segment, 1)
    previous_part = torch.roll(part, 1)
    starts_run = real & ((positions % row_length == 0) | (segment != previous_segment) | (part != previous_part))
    starts = positions[starts_run]
    run_of_token = torch.cumsum(starts_run.to(torch.int64), 0) - 1
    lengths = torch.bincount(run_of_token[real], minlength=starts.numel())
    is_prompt = part[starts] == 0
    run_ids = torch.arange(starts.numel(), device=layout.device)
    prompt_of_run = torch.cummax(torch.where(is_prompt, run_ids, -1), 0).values
    prompt_index, prompt_valid = _runs(starts[is_prompt], lengths[is_prompt])
    if bool(is_prompt.all()):
        return _Plan(prompt_index, prompt_valid, None, None, None, None)
    responses = ~is_prompt
    own_prompt = prompt_of_run[responses]
    if bool((own_prompt < 0).any()) or bool((segment[starts[own_prompt]] != segment[starts[responses]]).any()):
        raise ValueError("attention layout: a response does not follow its list's prompt in the same row")
    response_index, response_valid = _runs(starts[responses], lengths[responses])
    prompt_start, prompt_length = starts[own_prompt], lengths[own_prompt]
    response_start, response_length = starts[responses], lengths[responses]
    j = torch.arange(int((prompt_length + response_length).max()), device=layout.device)[None, :]
    in_prompt = j < prompt_length[:, None]
    in_response = ~in_prompt & (j < (prompt_length + response_length)[:, None])
    response_keys = torch.where(in_prompt, prompt_start[:, None] + j,
                                torch.where(in_response, response_start[:, None] + j - prompt_length[:, None],
                                            prompt_start[:, None]))
    i = torch.arange(response_index.shape[1], device=layout.device)[None, :, None]
    own = (j[:, None, :] - prompt_length[:, None, None]) <= i  # the response's own keys up to the query
    mask = in_prompt[:, None, :] | (in_response[:, None, :] & own)
    return _Plan(prompt_index, prompt_valid, response_index, response_valid, response_keys, mask[:, None])


class GatheredDotProductAttention(DotProductAttention):
    """megatron's local core attention, with the gathered path for an ``attention_layout`` "mask".

    Same constructor, same output ``[S, R, heads * dim / tp]``; a boolean mask goes to megatron's dense path.
    """

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """``DotProductAttention.forward``; the gathered computation when ``attention_mask`` is a layout."""
        if not is_attention_layout(attention_mask):
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params)
        if packed_seq_params is not None or attention_bias is not None or self.softmax_offset is not None:
            raise ValueError("the gathered attention path takes no packed_seq_params, attention_bias or "
                             "softmax offset")
        plan = getattr(attention_mask, "_nemo_lpo_plan", None)
        if plan is None:  # once per forward: every layer gets the same layout tensor
            plan = plan_attention(attention_mask)
            attention_mask._nemo_lpo_plan = plan
        seq, rows, heads, dim = query.shape
        flat = [x.transpose(0, 1).reshape(rows * seq, x.shape[2], dim) for x in (query, key, value)]
        scale = self.softmax_scale * (self.scale_mask_softmax.scale or 1.0)
        dropout = self.attention_dropout.p if self.training else 0.0
        if dropout and not self.config.sequence_parallel:  # the same RNG stream megatron's dense path uses
            with tensor_parallel.get_cuda_rng_tracker().fork():
                outputs = self._parts(flat, plan, scale, dropout)
        else:
            outputs = self._parts(flat, plan, scale, dropout)
        index = torch.cat([idx[valid] for idx, valid, _ in outputs])
        values = torch.cat([out[valid] for _, valid, out in outputs])
        context = flat[0].new_zeros(rows * seq, heads, dim).index_copy(0, index, values)
        return context.view(rows, seq, heads * dim).transpose(0, 1).contiguous()

    @staticmethod
    def _parts(flat, plan: _Plan, scale: float, dropout: float):
        """[(query index, valid, output [G, L, heads, dim])] of the prompt batch and the response batch."""
        query, key, value = flat

        groups = query.shape[1] // key.shape[1]

        def sdpa(q_index, k_index, **kwargs):
            q, k, v = (x[idx].transpose(1, 2) for x, idx in ((query, q_index), (key, k_index), (value, k_index)))
            if groups > 1:  # as megatron's dense path; SDPA's enable_gqa would rule out the masked fused kernel
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, **kwargs)
            return out.transpose(1, 2)

        outputs = [(plan.prompt_index, plan.prompt_valid, sdpa(plan.prompt_index, plan.prompt_index, is_causal=True))]
        if plan.response_index is not None:
            outputs.append((plan.response_index, plan.response_valid,
                            sdpa(plan.response_index, plan.response_keys, attn_mask=plan.response_mask)))
        return outputs
