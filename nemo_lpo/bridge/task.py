"""The LPO task in Megatron-Bridge's terms: a forward-step callable and its per-micro-batch loss function.

Megatron-Bridge's ``pretrain`` / ``finetune`` take a ``forward_step_func(data_iterator, model)`` that returns
megatron's output tensor and a loss callback; megatron-core's schedules call the callback on the last pipeline
stage. A callback returning three values ``(loss, count, {name: [sum, count]})`` opts into per-count
normalisation: with ``calculate_per_token_loss=True`` the schedule neither divides the loss by the number of
micro-batches nor does DDP average over data-parallel ranks; ``finalize_model_grads`` instead all-reduces the
summed count over the data-parallel group (after a broadcast from the last pipeline stage) and divides every
gradient by it (megatron-core 0.19 ``pipeline_parallel/schedules.py`` ``forward_step_calc_loss`` and
``distributed/finalize_model_grads.py``).

Here the loss is the SUM of nemo-lpo's per-list losses of the micro-batch and the count is its number of valid
lists, so the gradient is that of the sum over the global batch divided by the global number of valid lists:
exactly nemo-lpo's global per-list mean (``nemo_lpo.train.task``), computed without knowing the global count
before the step. Metrics are ``[mean × valid, valid]`` pairs, which Megatron-Bridge sums over micro-batches and
data-parallel ranks and divides: the global per-list mean under the names nemo-lpo logs.

MoE routers' load-balancing loss follows megatron's per-count convention too: its gradient is divided by the
global valid count instead of by (micro-batches × data-parallel size); ``recipes.lpo_model_provider`` scales
``moe_aux_loss_coeff`` by the lists per micro-batch so that both agree whenever every list is valid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from nemo_lpo.batch.layouts import BatchLayout, select_layout
from nemo_lpo.losses import LOSSES, listwise_loss


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class LPOTask:
    """Megatron-Bridge forward step for listwise preference optimisation on a precomputed reference.

    Call it as ``forward_step_func(data_iterator, model)``; each item of the iterator is a collated listwise
    micro-batch (``nemo_lpo.batch.collate.ListwiseCollator``) with ``ref_logps``.
    """

    loss_type: str = "lpo"
    """A ``nemo_lpo.losses.LOSSES`` name."""
    beta: float = 0.1
    """Inverse temperature of the implicit reward β·(log π − log μ)."""
    length_average: bool = False
    """Average each response's token log-probs instead of summing them (length-normalised variants)."""
    options: dict = field(default_factory=dict)
    """Further keyword options of the loss (``preference``, ``alpha``, ``sft_weight``, ...)."""
    layout: BatchLayout = field(default_factory=select_layout)
    """How a micro-batch becomes model inputs and [B, K] log-probs (``nemo_lpo.batch``; default: padded rows)."""

    def __post_init__(self) -> None:
        if self.loss_type not in LOSSES:
            raise ValueError(f"LPOTask.loss_type: unknown loss {self.loss_type!r}; choose one of {sorted(LOSSES)}")
        self.options = dict(self.options)
        zeros = torch.zeros(1, 2)
        _, metrics = self._loss(zeros, zeros, {"rewards": torch.tensor([[1.0, 0.0]]),
                                               "response_mask": torch.ones(1, 2, dtype=torch.bool),
                                               "response_lengths": torch.ones(1, 2, dtype=torch.long)})
        self.metric_names = ["loss", *sorted(name for name in metrics if name != "lists/valid")]
        """Names of the reported metrics (``loss`` and the loss module's means; ``lists/valid`` is the count)."""

    def _loss(self, policy: torch.Tensor, reference: torch.Tensor, batch: dict):
        # the token counts are read by the per-token NLL terms (the sft_weight term, the sft loss) only
        return listwise_loss(self.loss_type, policy, reference, batch["rewards"].to(policy), batch["response_mask"],
                             self.beta, response_lengths=batch["response_lengths"], **self.options)

    def __call__(self, data_iterator, model):
        """Run this pipeline stage on the next micro-batch; return (output, loss callback)."""
        batch = next(data_iterator)
        device = _device()
        batch = {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                 for key, value in batch.items()}
        if "ref_logps" not in batch:
            raise ValueError("the micro-batch has no ref_logps: the Megatron-Bridge LPO recipe trains on a "
                             "precomputed reference only (run `nemo-lpo ref-logps` on the dataset first)")
        output = model(**self.layout.model_inputs(batch, model))
        return output, partial(self.loss_func, batch)

    def loss_func(self, batch: dict, output: torch.Tensor):
        """``(sum of per-list losses, valid lists, {name: [mean × valid, valid]})`` of one micro-batch."""
        policy = self.layout.response_logps(output, batch, self.length_average)
        per_list, metrics = self._loss(policy, batch["ref_logps"].to(policy), batch)
        loss = per_list.sum()
        valid = metrics["lists/valid"].detach().float()
        reported = {"loss": torch.stack([loss.detach().float(), valid])}
        for name, value in metrics.items():
            if name != "lists/valid":
                reported[name] = torch.stack([(value.detach().float() * valid), valid])
        # megatron sums the counts in an int tensor; the loss module's count is a float of an integer
        return loss, valid.round().to(device=loss.device, dtype=torch.int), reported
