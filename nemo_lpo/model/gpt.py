"""megatron's GPTModel with per-token RoPE positions (the batch layouts' masks are in ``nemo_lpo.batch.masks``).

megatron-core 0.19.2 computes rotary angles from the sequence length only and ignores ``position_ids``
(docs/megatron-notes.md). Packed batches restart positions at 0 for every
sequence, so ``GPTModelWithPositions`` rebuilds the angles from the ids it is given. It adds no
parameters: its state dict and sharded state dict are GPTModel's, key for key.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel


def unwrapped_attribute(model, name: str):
    """``name`` of a GPTModel possibly wrapped (DDP, Float16Module: each holds the next as ``.module``); None if absent."""
    while model is not None:
        value = getattr(model, name, None)
        if value is not None:
            return value
        model = getattr(model, "module", None)
    return None


def rotary_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor, *, interleaved: bool = False,
                  interpolation_factor: float | None = None) -> torch.Tensor:
    """RoPE angles for explicit positions, laid out as megatron's ``RotaryEmbedding.get_emb``.

    Args:
        position_ids: [B, S] integer positions.
        inv_freq: [D/2] inverse frequencies (``RotaryEmbedding.inv_freq``).
        interleaved: megatron's ``rotary_interleaved`` layout.
        interpolation_factor: megatron's ``seq_len_interpolation_factor`` (positions are divided by it).

    Returns:
        [S, B, 1, D] angles; ``apply_rotary_pos_emb`` broadcasts them over heads.
    """
    positions = position_ids.to(device=inv_freq.device, dtype=inv_freq.dtype)
    if interpolation_factor is not None:
        positions = positions / interpolation_factor
    freqs = positions[..., None] * inv_freq  # [B, S, D/2]
    if interleaved:
        emb = torch.stack((freqs, freqs), dim=-1).flatten(-2)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.transpose(0, 1)[:, :, None, :].contiguous()


class GPTModelWithPositions(GPTModel):
    """GPTModel whose RoPE honours ``position_ids`` (per token, per sequence) when they are given.

    Args:
        *args: GPTModel's.
        sliding_window: the architecture's attention window, if any. The local attention path cannot
            combine a window with an explicit mask, so a forward whose positions reach the window
            raises instead of silently attending too far.
        uses_transformer_engine: built from TE's layer spec. TE's causal attention ignores an explicit
            mask: right-padded batches stay exact (causality already hides the padding from real tokens),
            packed and shared-prompt rows would not, so the batch layouts refuse them (``nemo_lpo.batch.layouts``).
        **kwargs: GPTModel's.
    """

    def __init__(self, *args, sliding_window: int | None = None, uses_transformer_engine: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.sliding_window = sliding_window
        self.uses_transformer_engine = uses_transformer_engine

    def _check_sliding_window(self, position_ids, packed_seq_params) -> None:
        """Refuse a sequence that reaches the sliding window: no attention path here applies one.

        The window is not passed to the attention (megatron's local path cannot combine it with an explicit mask), so
        a longer sequence would silently attend too far. Packed THD rows carry no positions: their longest sequence
        comes from ``cu_seqlens_q`` (``max_seqlen_q`` is rounded up to 64 for TE, ``varlen.te_max_seqlen``).
        """
        if self.sliding_window is None:
            return
        if position_ids is not None:
            reach = int(position_ids.max())
        elif packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q
            longest = packed_seq_params.max_seqlen_q if cu is None else int((cu[1:] - cu[:-1]).max())
            reach = int(longest) - 1
        else:
            return
        if reach >= self.sliding_window:
            raise ValueError(
                f"a sequence reaches position {reach} but the model's sliding window is {self.sliding_window}: the "
                f"attention here does not apply a sliding window; use sequences of at most {self.sliding_window} tokens"
            )

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        """GPTModel._preprocess, then the rotary angles replaced by ones built from ``position_ids``."""
        out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input,
                                  inference_context=inference_context, packed_seq_params=packed_seq_params,
                                  padding_mask=padding_mask)
        if (padding_mask is not None and not self.pre_process and decoder_input is None
                and self.config.sequence_parallel and self.config.tensor_model_parallel_size > 1):
            # megatron 0.19.2 splits the MoE padding mask over the sequence-parallel ranks on the first
            # pipeline stage only; later stages (and later virtual chunks) would route [S/tp] tokens against
            # an [S] mask and fail in the aux-loss statistics

            split = tensor_parallel.scatter_to_sequence_parallel_region(out[5].transpose(0, 1).contiguous())
            out = (*out[:5], split.transpose(0, 1).contiguous(), *out[6:])
        self._check_sliding_window(position_ids, packed_seq_params)
        if position_ids is None or self.position_embedding_type != "rope" or out[1] is None:
            return out
        rope = self.rotary_pos_emb
        angles = rotary_angles(position_ids, rope.inv_freq, interleaved=rope.rotary_interleaved,
                               interpolation_factor=rope.seq_len_interpolation_factor)
        return (out[0], angles, *out[2:])
