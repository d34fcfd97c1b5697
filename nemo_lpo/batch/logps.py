"""Per-response log-probs ``[B, K]`` from a model's last-stage output, for every batch layout.

Padded and packed batches run the model WITH labels: megatron's own loss path returns ``-log p(label)`` per
token through the vocab-parallel cross-entropy (exact under tensor parallelism without gathering the logits);
``sequence_logps`` sums them per response over ``loss_mask``. Shared-prompt rows run it WITHOUT labels: the
first token of a response is predicted at its prompt's last position, not at the token before it in the row,
so ``gathered_token_logps`` picks the predicting rows of the vocab-parallel logits and applies the same
cross-entropy. Both end in ``scatter_to_lists``, which lays per-response values out as ``[B, K]`` (0 in invalid
slots), the layout ``nemo_lpo.losses.listwise_loss`` takes. Everything is vectorised (no host sync) and
differentiable.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel


def scatter_to_lists(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-response ``values`` ``[N]`` laid out as float32 ``[B, K]`` by ``list_index`` / ``slot_index``.

    Invalid slots (``response_mask`` False, and the empty sequences of ``keep_empty_slots`` batches) are 0.
    """
    device = values.device
    response_mask = batch["response_mask"].to(device)
    num_lists, k = response_mask.shape
    flat = batch["list_index"].to(device) * k + batch["slot_index"].to(device)
    out = torch.zeros(num_lists * k, dtype=torch.float32, device=device)
    out = out.index_add(0, flat, values.float()).view(num_lists, k)
    return torch.where(response_mask, out, torch.zeros_like(out))


def sequence_ids(batch: dict) -> torch.Tensor:
    """Index of the sequence each token of the row belongs to: ``[N, T]`` padded, ``[1, S]`` packed.

    Packed tail padding (after ``cu_seqlens[-1]``) gets index N, one past the last sequence.
    """
    tokens = batch["tokens"]
    if "cu_seqlens" in batch:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        cu_seqlens = batch["cu_seqlens"].to(device=tokens.device, dtype=positions.dtype)
        return torch.bucketize(positions, cu_seqlens[1:], right=True)[None]
    n = tokens.shape[0]
    return torch.arange(n, device=tokens.device)[:, None].expand_as(tokens)


def sequence_logps(token_logps: torch.Tensor, batch: dict, length_average: bool = False) -> torch.Tensor:
    """Per-response log-probs ``[B, K]`` of a padded or packed batch: token log-probs summed over ``loss_mask``.

    A packed and a padded batch of the same lists give the same result.

    Args:
        token_logps: ``log p(labels[:, t] | tokens[:, :t+1])``, ``[N, T]`` or ``[1, S]`` (the negated output of
            a model called with labels).
        batch: the batch the log-probs were computed on (loss_mask, list_index, slot_index, response_mask,
            and cu_seqlens when packed).
        length_average: divide each sum by its number of response tokens (SimPO / length-normalised variants).

    Returns:
        float32 ``[B, K]``, B and K from ``batch["response_mask"]``.
    """
    loss_mask = batch["loss_mask"].to(device=token_logps.device, dtype=torch.float32)
    if token_logps.shape != loss_mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} does not match loss_mask {tuple(loss_mask.shape)}")
    n = batch["list_index"].shape[0]
    # torch.where, not a product: a token outside the loss mask may hold any value (even inf/NaN).
    masked = torch.where(loss_mask > 0, token_logps.float() * loss_mask, torch.zeros_like(loss_mask))
    seq = sequence_ids(batch).to(token_logps.device).reshape(-1)
    sums = torch.zeros(n + 1, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, seq, masked.reshape(-1))[:n]
    if length_average:
        counts = torch.zeros(n + 1, dtype=torch.float32, device=token_logps.device)
        counts = counts.index_add(0, seq, loss_mask.reshape(-1))[:n]
        sums = sums / counts.clamp_min(1.0)
    return scatter_to_lists(sums, batch)


def gathered_token_logps(logits: torch.Tensor, batch: dict, tp_group=None) -> torch.Tensor:
    """``log p(response token)`` for every gathered response token of shared-prompt rows, ``[M]`` float32.

    Args:
        logits: the model output without labels, ``[R, S, V/tp]`` (vocab-parallel).
        batch: the shared-prompt batch (``gather_index``: the flat row position predicting each response token;
            ``gather_labels``: that token).
        tp_group: tensor-parallel group (default: megatron's).
    """
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(batch["tokens"].shape):
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(batch['tokens'].shape)} "
                         "(call the model without labels)")
    index = batch["gather_index"].to(logits.device)
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index).float()  # a copy: CE may work in place
    labels = batch["gather_labels"].to(logits.device)
    return -tensor_parallel.vocab_parallel_cross_entropy(rows, labels, tp_group=tp_group)


def gathered_logps(logits: torch.Tensor, batch: dict, length_average: bool = False, tp_group=None) -> torch.Tensor:
    """Per-response log-probs ``[B, K]`` from the logits of shared-prompt rows (see ``gathered_token_logps``)."""
    token = gathered_token_logps(logits, batch, tp_group=tp_group)
    seq = batch["gather_seq"].to(token.device)
    n = batch["list_index"].shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=token.device).index_add(0, seq, token)
    if length_average:
        counts = torch.zeros(n, dtype=torch.float32, device=token.device).index_add(0, seq, torch.ones_like(token))
        sums = sums / counts.clamp_min(1.0)
    return scatter_to_lists(sums, batch)
