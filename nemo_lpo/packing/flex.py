"""The shared-prompt mask as a FlexAttention ``mask_mod`` / ``BlockMask`` (the GPU path without a dense mask).

megatron's local attention materialises ``[R, 1, S, S]`` scores and masks them, so a long shared row pays
for the response-response blocks it then discards. The model's core attention avoids that by gathering each
part's keys (``nemo_lpo.model.attention.GatheredDotProductAttention``). FlexAttention
(``torch.nn.attention.flex_attention``) is the block-sparse alternative: it evaluates the same predicate per
(query, key) and, through a ``BlockMask``, skips tiles that are fully masked. This module gives that mask and
its sparsity, checked against ``shared_prompt_mask`` (a compiled flex core attention is not wired in).
"""

from __future__ import annotations

import torch


def shared_prompt_mask_mod(batch: dict):
    """``mask_mod(b, h, q, kv) -> bool`` (True = attend), the complement of ``shared_prompt_mask(batch)``."""
    segment_ids, part_ids = batch["segment_ids"], batch["part_ids"]

    def mask_mod(b, h, q, kv):
        seg_q, seg_kv = segment_ids[b, q], segment_ids[b, kv]
        part_q, part_kv = part_ids[b, q], part_ids[b, kv]
        return (kv <= q) & (seg_q == seg_kv) & ((part_kv == 0) | (part_kv == part_q))

    return mask_mod


def shared_prompt_block_mask(batch: dict, block_size: int = 128):
    """The ``BlockMask`` of a shared-prompt batch (rows = FlexAttention's batch dimension)."""
    from torch.nn.attention.flex_attention import create_block_mask

    r, s = batch["segment_ids"].shape
    return create_block_mask(shared_prompt_mask_mod(batch), B=r, H=None, Q_LEN=s, KV_LEN=s,
                             device=str(batch["segment_ids"].device), BLOCK_SIZE=block_size)


def block_density(batch: dict, block_size: int = 128) -> dict[str, float]:
    """Fraction of (query-tile, key-tile) pairs a block-sparse kernel computes, vs a dense causal row.

    Returns:
        ``computed``: tiles with any visible pair / all tiles; ``causal``: the same for a plain causal
        mask of the same rows (what a dense causal kernel would compute).
    """
    r, s = batch["segment_ids"].shape
    nb = -(-s // block_size)
    allowed = ~_dense(batch)
    pad = nb * block_size - s
    allowed = torch.nn.functional.pad(allowed, (0, pad, 0, pad))
    tiles = allowed.view(r, nb, block_size, nb, block_size).any(dim=(2, 4))
    causal_tiles = torch.ones(nb, nb, dtype=torch.bool).tril()
    return {"computed": tiles.float().mean().item(), "causal": causal_tiles.float().mean().item()}


def _dense(batch: dict) -> torch.Tensor:
    from nemo_lpo.packing.collate import shared_prompt_mask

    return shared_prompt_mask(batch)[:, 0]
