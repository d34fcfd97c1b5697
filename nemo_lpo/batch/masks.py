"""The dense boolean attention masks of every batch layout (True = masked) and the MoE padding-token mask.

The dense masks are the reference semantics: megatron's local ``DotProductAttention`` takes them as they are,
and the gathered core attention (``nemo_lpo.model.attention``) must equal them. Padding always forms a causal
block of its own, so no query row is fully masked (no NaN); padded outputs are never read.
"""

from __future__ import annotations

import torch


def causal_padding_mask(seq_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Causal mask of a right-padded batch, ``[N, 1, T, T]``.

    Padded query rows keep their causal prefix, so no row is fully masked; the loss mask excludes them.
    """
    positions = torch.arange(seq_len, device=seq_lengths.device)
    future = positions[None, :] > positions[:, None]  # [T, T]: key after query
    padded_key = positions[None, :] >= seq_lengths[:, None]  # [N, T]
    mask = future[None] | (padded_key[:, None, :] & ~padded_key[:, :, None])
    return mask[:, None]


def packed_causal_mask(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Block-diagonal causal mask of a packed row, ``[1, 1, S, S]``.

    Token i may attend to token j iff both lie in the same sequence ``[cu_seqlens[k], cu_seqlens[k+1])``
    and j <= i. Tail padding past ``cu_seqlens[-1]`` forms its own causal block.
    """
    positions = torch.arange(seq_len, device=cu_seqlens.device)
    segment = torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)  # [S]
    same = segment[:, None] == segment[None, :]
    causal = positions[None, :] <= positions[:, None]
    return ~(same & causal)[None, None]


def shared_prompt_mask(batch: dict) -> torch.Tensor:
    """The mask of shared-prompt rows (``segment_ids``, ``part_ids`` of the batch), ``[R, 1, S, S]``.

    Query i may attend to key j iff j <= i, both belong to the same list, and j is a prompt token or a
    token of i's own response. Padding (segment -1) forms one causal block of its own.
    """
    segment_ids, part_ids = batch["segment_ids"], batch["part_ids"]
    s = segment_ids.shape[1]
    positions = torch.arange(s, device=segment_ids.device)
    causal = positions[None, :] <= positions[:, None]  # [S, S]: key at or before query
    same_list = segment_ids[:, :, None] == segment_ids[:, None, :]  # [R, S, S]
    key_part = part_ids[:, None, :]
    visible = (key_part == 0) | (key_part == part_ids[:, :, None])
    return ~(causal[None] & same_list & visible)[:, None]


def padding_token_mask(batch: dict) -> torch.Tensor:
    """``[rows, S]`` bool, True at padding tokens (kept out of MoE routing statistics), for any layout."""
    tokens = batch["tokens"]
    if "segment_ids" in batch:  # shared-prompt rows
        return batch["segment_ids"].to(tokens.device) < 0
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    if "cu_seqlens" in batch:
        return (positions >= batch["cu_seqlens"][-1].to(tokens.device))[None].expand_as(tokens)
    mask = positions[None, :] >= batch["seq_lengths"].to(tokens.device)[:, None]
    # a virtual-pipeline step's filler rows (PaddedLayout.fill_rows, the last rows) hold one pad token that
    # counts in their seq_lengths; it is padding too, or the MoE load-balancing loss would route it
    mask[mask.shape[0] - int(batch.get("empty_rows", 0)):] = True
    return mask
