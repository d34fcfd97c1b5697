"""Log-probs of a shared-prompt batch under a megatron GPTModel (``GPTModelWithPositions``).

The model runs WITHOUT labels, so its last stage returns the vocab-parallel logits ``[R, S, V/tp]`` (with
sequence parallelism the output layer has already gathered the sequence). The rows that predict
response tokens (``batch["gather_index"]``: the last prompt position for each response's first token)
are selected, and ``tensor_parallel.vocab_parallel_cross_entropy`` turns them into ``-log p(label)``:
exact under tensor parallelism without gathering the vocabulary. The per-response sums are scattered
into ``[B, K]`` (0 in invalid slots), the layout ``listwise_loss`` takes.

Inside a megatron pipeline schedule, call ``model(**shared_prompt_model_inputs(batch, model))`` on every
stage and ``shared_prompt_logps(output, batch)`` in the last stage's loss function.
"""

from __future__ import annotations

import torch

from nemo_lpo.model.attention import attention_layout, takes_attention_layout
from nemo_lpo.packing.collate import padding_token_mask, shared_prompt_mask

REQUIRED_KEYS = ("tokens", "position_ids", "segment_ids", "part_ids", "gather_index", "gather_labels",
                 "gather_seq", "list_index", "slot_index", "response_mask")


def _config(model):
    while model is not None:
        config = getattr(model, "config", None)
        if config is not None:
            return config
        model = getattr(model, "module", None)
    return None


def _check(batch: dict) -> None:
    missing = [key for key in REQUIRED_KEYS if key not in batch]
    if missing:
        raise KeyError(f"not a shared-prompt batch (collate_shared_prompt): missing {missing}")


def shared_prompt_model_inputs(batch: dict, model=None) -> dict:
    """Keyword arguments of ``GPTModel.forward`` for a shared-prompt batch (no labels: logits come back).

    Args:
        batch: the ``collate_shared_prompt`` batch, on the model's device.
        model: the (wrapped) model; when it is MoE, padding tokens are kept out of the routing statistics.
    """
    _check(batch)
    if takes_attention_layout(model):  # part by part, no [R, 1, S, S] mask or S² scores
        mask = attention_layout(batch["segment_ids"], batch["part_ids"])
    else:
        mask = shared_prompt_mask(batch)
    inputs = {"input_ids": batch["tokens"], "position_ids": batch["position_ids"], "attention_mask": mask}
    config = _config(model)
    if config is not None and getattr(config, "num_moe_experts", None):
        inputs["padding_mask"] = padding_token_mask(batch)
    return inputs


def shared_prompt_token_logps(logits: torch.Tensor, batch: dict, tp_group=None) -> torch.Tensor:
    """``log p(response token)`` for every gathered response token, ``[M]`` float32 (differentiable).

    Args:
        logits: the model output without labels, ``[R, S, V/tp]`` (vocab-parallel).
        batch: the batch the logits were computed on.
        tp_group: tensor-parallel group (default: megatron's).
    """
    from megatron.core import tensor_parallel

    _check(batch)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(batch["tokens"].shape):
        raise ValueError(f"logits {tuple(logits.shape)} do not match tokens {tuple(batch['tokens'].shape)} "
                         "(call the model without labels)")
    index = batch["gather_index"].to(logits.device)
    rows = logits.reshape(-1, logits.shape[-1]).index_select(0, index).float()  # a copy: CE may work in place
    labels = batch["gather_labels"].to(logits.device)
    return -tensor_parallel.vocab_parallel_cross_entropy(rows, labels, tp_group=tp_group)


def shared_prompt_logps(logits: torch.Tensor, batch: dict, length_average: bool = False,
                        tp_group=None) -> torch.Tensor:
    """Per-response sequence log-probs ``[B, K]`` from the logits of a shared-prompt batch, 0 where invalid.

    Args:
        logits: ``[R, S, V/tp]`` vocab-parallel logits (the model called without labels).
        batch: the ``collate_shared_prompt`` batch.
        length_average: divide each sum by the response's token count.
        tp_group: tensor-parallel group (default: megatron's).

    Returns:
        float32 ``[B, K]``, the layout of ``nemo_lpo.losses.listwise_loss``.
    """
    token = shared_prompt_token_logps(logits, batch, tp_group=tp_group)
    device = token.device
    seq = batch["gather_seq"].to(device)
    list_index, slot_index = batch["list_index"].to(device), batch["slot_index"].to(device)
    response_mask = batch["response_mask"].to(device)
    n = list_index.shape[0]
    num_lists, k = response_mask.shape
    sums = torch.zeros(n, dtype=torch.float32, device=device).index_add(0, seq, token)
    if length_average:
        counts = torch.zeros(n, dtype=torch.float32, device=device).index_add(0, seq, torch.ones_like(token))
        sums = sums / counts.clamp_min(1.0)
    out = torch.zeros(num_lists * k, dtype=torch.float32, device=device)
    out = out.index_add(0, list_index * k + slot_index, sums).view(num_lists, k)
    return torch.where(response_mask, out, torch.zeros_like(out))


def sequence_logps_shared_prompt(model, batch: dict, length_average: bool = False) -> torch.Tensor:
    """Run ``model`` (one stage holding embedding and output layer) on ``batch``: ``[B, K]`` log-probs."""
    logits = model(**shared_prompt_model_inputs(batch, model))
    return shared_prompt_logps(logits, batch, length_average)


def useful_token_counts(batch: dict) -> dict[str, int]:
    """Token accounting of a shared-prompt batch against the unpacked one (for benchmarks and metrics).

    Returns:
        ``computed`` (real tokens in the rows), ``slots`` (R * S, padding included), ``unpacked`` (the
        tokens the K separate sequences would hold), ``prompt_saved`` (unpacked - computed).
    """
    computed = int(batch["row_lengths"].sum())
    unpacked = int(batch["seq_lengths"].sum())
    return {"computed": computed, "slots": int(batch["tokens"].numel()), "unpacked": unpacked,
            "prompt_saved": unpacked - computed}
