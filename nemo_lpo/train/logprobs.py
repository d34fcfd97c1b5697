"""Per-token and per-response log-probs of a batch (docs/CONTRACTS.md "Batch") under a megatron GPTModel.

The token log-probs come from megatron's own loss path: ``GPTModel.forward(..., labels=labels)`` returns
``-log p(label)`` per token through the vocab-parallel cross-entropy, so they are exact under tensor
parallelism without gathering the logits. Padded batches ``[N, T]`` get a causal mask with the padding
keys masked; packed batches ``[1, S]`` get the block-diagonal causal mask of ``cu_seqlens`` and per-token
RoPE positions (``GPTModelWithPositions``), which makes them equal to the padded computation.

Inside a megatron pipeline schedule, the trainer's ``forward_step`` calls ``model(**model_inputs(batch))``
on every stage; on the last stage the output is ``-token_logps``, which its loss function turns into
``sequence_logps(-output, batch)``.
"""

from __future__ import annotations

import torch

from nemo_lpo.model.attention import packed_layout, takes_attention_layout
from nemo_lpo.model.gpt import causal_padding_mask, packed_causal_mask, padding_token_mask


def _find(model, attribute: str):
    """An attribute of a GPTModel, possibly wrapped (DDP, Float16Module, ...); None when absent."""
    while model is not None:
        value = getattr(model, attribute, None)
        if value is not None:
            return value
        model = getattr(model, "module", None)
    return None


def attention_mask(batch: dict) -> torch.Tensor:
    """The boolean attention mask of the batch, True = masked: [N, 1, T, T] padded, [1, 1, S, S] packed."""
    tokens = batch["tokens"]
    if "cu_seqlens" in batch:
        if tokens.shape[0] != 1:
            raise ValueError(f"a packed batch has tokens of shape [1, S], got {tuple(tokens.shape)}")
        return packed_causal_mask(batch["cu_seqlens"].to(tokens.device), tokens.shape[1])
    return causal_padding_mask(batch["seq_lengths"].to(tokens.device), tokens.shape[1])


def model_inputs(batch: dict, model=None, *, with_labels: bool = True) -> dict:
    """Keyword arguments of ``GPTModel.forward`` for ``batch`` (padded or packed).

    Args:
        batch: the batch dict (tensors already on the model's device).
        model: the (wrapped) model; when it is MoE, padding tokens are excluded from routing statistics
            through ``padding_mask``. With ``model=None`` no padding mask is passed.
        with_labels: pass ``labels`` so that the model returns ``-log p(label)`` per token ([N, T]);
            without them it returns the vocab-parallel logits.
    """
    config = _find(model, "config")
    packed = "cu_seqlens" in batch
    if packed and _find(model, "uses_transformer_engine"):
        raise ValueError("packed batches need megatron's local attention (explicit block-diagonal mask); the "
                         "model uses Transformer Engine's causal attention, which ignores it: collate padded "
                         "batches (packed=False) or build with use_te=False")
    tp = getattr(config, "tensor_model_parallel_size", 1)
    if getattr(config, "sequence_parallel", False) and batch["tokens"].shape[1] % tp:
        raise ValueError(f"sequence parallelism over tp={tp} needs a sequence length divisible by {tp}, got "
                         f"tokens of shape {tuple(batch['tokens'].shape)}: set the collator's "
                         f"pad_to_multiple_of to a multiple of {tp}")
    inputs = {
        "input_ids": batch["tokens"],
        "position_ids": batch["position_ids"],
        "attention_mask": (packed_layout(batch["cu_seqlens"], batch["tokens"].shape[1]) if packed
                           and takes_attention_layout(model) else attention_mask(batch)),
    }
    if with_labels:
        inputs["labels"] = batch["labels"]
    if getattr(config, "num_moe_experts", None):
        inputs["padding_mask"] = padding_token_mask(batch)
    return inputs


def token_logps(model, batch: dict) -> torch.Tensor:
    """Per-token ``log p(labels[:, t] | tokens[:, :t+1])``, [N, T] (padded) or [1, S] (packed), float32.

    Call it on a model whose stage holds the output layer (a single stage, or the last pipeline stage).
    Values at loss_mask 0 are defined but meaningless; ``sequence_logps`` masks them.
    """
    return -model(**model_inputs(batch, model)).float()


def sequence_ids(batch: dict) -> torch.Tensor:
    """Index of the sequence each token of the row belongs to: [N, T] padded, [1, S] packed.

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
    """Per-response log-probs ``[B, K]``: token log-probs summed over ``loss_mask``, 0 in invalid slots.

    Vectorised (no Python loop, no host sync), differentiable, and independent of the layout: a packed
    and a padded batch of the same lists give the same result.

    Args:
        token_logps: output of ``token_logps``, [N, T] or [1, S].
        batch: the batch the log-probs were computed on (uses loss_mask, list_index, slot_index,
            response_mask, and cu_seqlens when packed).
        length_average: divide each sum by its number of response tokens (SimPO / length-normalised
            variants); slots with no response tokens stay 0.

    Returns:
        float32 [B, K], B and K from ``batch["response_mask"]``.
    """
    loss_mask = batch["loss_mask"].to(device=token_logps.device, dtype=torch.float32)
    if token_logps.shape != loss_mask.shape:
        raise ValueError(f"token_logps {tuple(token_logps.shape)} does not match loss_mask {tuple(loss_mask.shape)}")
    list_index = batch["list_index"].to(token_logps.device)
    slot_index = batch["slot_index"].to(token_logps.device)
    response_mask = batch["response_mask"].to(token_logps.device)
    n = list_index.shape[0]
    num_lists, k = response_mask.shape

    # torch.where, not a product: a token outside the loss mask may hold any value (even inf/NaN).
    masked = torch.where(loss_mask > 0, token_logps.float() * loss_mask, torch.zeros_like(loss_mask))
    seq = sequence_ids(batch).to(token_logps.device).reshape(-1)
    sums = torch.zeros(n + 1, dtype=torch.float32, device=token_logps.device)
    sums = sums.index_add(0, seq, masked.reshape(-1))[:n]
    if length_average:
        counts = torch.zeros(n + 1, dtype=torch.float32, device=token_logps.device)
        counts = counts.index_add(0, seq, loss_mask.reshape(-1))[:n]
        sums = sums / counts.clamp_min(1.0)

    out = torch.zeros(num_lists * k, dtype=torch.float32, device=token_logps.device)
    out = out.index_add(0, list_index * k + slot_index, sums).view(num_lists, k)
    return torch.where(response_mask, out, torch.zeros_like(out))
