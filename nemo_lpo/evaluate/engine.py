"""Run a megatron GPTModel forward over a packed listwise dataset and collect per-response log-probs.

One process, no gradient: the whole dataset goes through a ``BatchLayout`` (padded by default; the same code
path the trainer uses) in micro-batches of lists. The results are numpy ``[num_lists, K_max]`` arrays
with a validity mask, ready for :func:`nemo_lpo.metrics.ranking_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from nemo_lpo.batch.layouts import BatchLayout, PaddedLayout
from nemo_lpo.metrics import heldout_metrics


@dataclass
class ListLogps:
    """Per-response values of a whole dataset, ``[num_lists, K_max]`` (0 / False in empty slots)."""

    policy_logps: np.ndarray
    """log π(y|x): summed response-token log-probs (float64)."""
    rewards: np.ndarray
    """Annotated rewards (float32)."""
    mask: np.ndarray
    """Valid slots (bool)."""
    lengths: np.ndarray
    """Response token counts, EOS included (int64)."""
    ref_logps: np.ndarray | None
    """The dataset's reference sidecar log μ(y|x), when it has one."""


def _pad(rows: list[np.ndarray], k_max: int, dtype) -> np.ndarray:
    out = np.zeros((len(rows), k_max), dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def dataset_logps(
    model,
    dataset,
    micro_batch_size: int = 8,
    pad_to_multiple_of: int = 8,
    progress: Callable[[int, int], None] | None = None,
    layout: BatchLayout | None = None,
) -> ListLogps:
    """Return the policy's log-probs of every response of ``dataset`` (a ``ListwiseDataset``).

    Args:
        model: a single-stage megatron GPTModel (tp = pp = 1 in this process), already on its device.
        dataset: the packed dataset.
        micro_batch_size: lists per forward pass.
        pad_to_multiple_of: passed to the collator.
        progress: called as ``progress(done_lists, total_lists)`` after every micro-batch.
        layout: the batch layout (default: padded, which every attention backend serves).

    Raises:
        UnsupportedLayoutError: ``layout`` cannot run on the model's attention backend.
    """
    layout = layout or PaddedLayout()  # every micro-batch's model_inputs checks the model's attention backend
    collator = layout.collator(dataset.pad_id, pad_to_multiple_of)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logps, rewards, lengths, refs = [], [], [], []
    n = len(dataset)
    try:
        with torch.no_grad():
            for start in range(0, n, micro_batch_size):
                items = [dataset[i] for i in range(start, min(n, start + micro_batch_size))]
                batch = collator(items)
                on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                seq = layout.logps(model, on_device).double().cpu().numpy()
                for b, item in enumerate(items):
                    k = len(item["response_ids"])
                    logps.append(seq[b, :k])
                    rewards.append(np.asarray(item["rewards"], dtype=np.float32))
                    lengths.append(np.array([len(r) for r in item["response_ids"]], dtype=np.int64))
                    refs.append(item.get("ref_logps"))
                if progress is not None:
                    progress(min(n, start + micro_batch_size), n)
    finally:
        model.train(was_training)
    k_max = max((len(r) for r in rewards), default=0)
    mask = _pad([np.ones(len(r), dtype=bool) for r in rewards], k_max, bool)
    has_ref = bool(refs) and all(r is not None for r in refs)
    return ListLogps(
        policy_logps=_pad(logps, k_max, np.float64),
        rewards=_pad(rewards, k_max, np.float32),
        mask=mask,
        lengths=_pad(lengths, k_max, np.int64),
        ref_logps=_pad([np.asarray(r, dtype=np.float64) for r in refs], k_max, np.float64) if has_ref else None,
    )


def summarize(policy: ListLogps, reference_logps: np.ndarray, beta: float, *, ndcg_k: int | None = None,
              loss_type: str | None = None, loss_options: dict | None = None) -> dict[str, float]:
    """Held-out metrics of ``policy`` against a reference (:func:`~nemo_lpo.metrics.heldout_metrics`).

    The trainer's validation uses the same function; the loss terms come only when ``loss_type`` is given.
    """
    if reference_logps.shape != policy.policy_logps.shape:
        raise ValueError(f"reference log-probs {reference_logps.shape} do not match the policy's "
                         f"{policy.policy_logps.shape}")
    return heldout_metrics(
        torch.from_numpy(policy.policy_logps),
        torch.from_numpy(np.asarray(reference_logps, dtype=np.float64)),
        torch.from_numpy(policy.rewards.astype(np.float64)),
        torch.from_numpy(policy.mask),
        beta=beta,
        response_lengths=torch.from_numpy(policy.lengths),
        ndcg_k=ndcg_k,
        loss_type=loss_type,
        loss_options=loss_options,
    )
