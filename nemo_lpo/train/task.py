"""The LPO training task on megatron's schedules: forward step, loss scaling, metric sums, the forward-only pass.

What a NeMo model's ``training_step`` / ``MegatronLossReduction`` are to NeMo. ``forward_step`` is megatron's
``forward_step_func``: it runs this stage on the next micro-batch through the run's ``BatchLayout`` and returns
the loss callback; the layout turns the last stage's output into ``[B, K]`` response log-probs, and the listwise
loss (built once per run) turns those into per-list losses.

Loss reduction: the loss is the sum of per-list losses over the GLOBAL batch divided by the global number of
valid lists. Megatron's schedule divides each micro-batch loss by ``num_microbatches`` and DDP averages gradients
over data-parallel ranks, so each micro-batch returns ``sum(per_list_loss) * num_microbatches * dp_size /
global_valid`` and the gradient is exactly that of the global mean, for every layout and micro-batch split.
"""

from __future__ import annotations

from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_lpo.batch.layouts import BatchLayout
from nemo_lpo.config import Config
from nemo_lpo.losses import listwise_loss


def chunk_iterators(microbatches: list[dict], chunks: int):
    """The data iterator(s) for megatron's schedule: one per virtual-pipeline chunk (each reads every micro-batch)."""
    return [iter(microbatches) for _ in range(chunks)] if chunks > 1 else iter(microbatches)


def count_valid_lists(batch: dict) -> torch.Tensor:
    """Lists with at least two valid responses (the loss module's notion of a valid list), as a 0-dim tensor."""
    return (batch["response_mask"].sum(dim=1) >= 2).sum()


class LPOTask:
    """The listwise loss of one run on one batch layout.

    Args:
        cfg: the validated run configuration (``loss``).
        layout: the run's batch layout.
        dp_size: data-parallel world size (the loss scaling undoes DDP's gradient average).
    """

    def __init__(self, cfg: Config, layout: BatchLayout, dp_size: int) -> None:
        self.layout = layout
        self.dp_size = dp_size
        self.length_average = cfg.loss.length_average
        self.loss_type = cfg.loss.type
        # the loss, its beta and options fixed once per run; per-batch inputs only at each call
        self.loss = partial(listwise_loss, cfg.loss.type, beta=cfg.loss.beta, **cfg.loss.options)
        self.metric_names = self._metric_names()

    def _call_loss(self, policy: torch.Tensor, reference: torch.Tensor, batch: dict):
        # the token counts are read by the per-token NLL terms (the sft_weight term, the sft loss) only
        return self.loss(policy, reference, batch["rewards"].to(policy), batch["response_mask"],
                         response_lengths=batch["response_lengths"])

    def _metric_names(self) -> list[str]:
        """Names the loss reports (same on every rank, whether or not it computes the loss); checks the options."""
        zeros = torch.zeros(1, 2)
        probe = {"rewards": torch.tensor([[1.0, 0.0]]), "response_mask": torch.ones(1, 2, dtype=torch.bool),
                 "response_lengths": torch.ones(1, 2, dtype=torch.long)}
        _, metrics = self._call_loss(zeros, zeros, probe)
        return ["loss", *sorted(metrics)]

    # ------------------------------------------------------------------ schedule callbacks
    def forward_step(self, global_valid: torch.Tensor, num_microbatches: int, data_iterator, model):
        """Megatron ``forward_step_func``: run this stage on the next micro-batch, return the loss callback."""
        batch = next(data_iterator)
        output = model(**self.layout.model_inputs(batch, model))
        return output, partial(self.loss_func, batch, global_valid, num_microbatches)

    def loss_func(self, batch: dict, global_valid: torch.Tensor, num_microbatches: int, output: torch.Tensor):
        """Return (scaled micro-batch loss, metric SUMS) on the last stage; see the module docstring."""
        policy = self.layout.response_logps(output, batch, self.length_average)
        per_list, metrics = self._call_loss(policy, batch["ref_logps"].to(policy), batch)
        loss_sum = per_list.sum()
        scale = num_microbatches * self.dp_size / global_valid.clamp(min=1).to(loss_sum)
        valid = metrics["lists/valid"]
        sums = {name: (value * valid).detach() for name, value in metrics.items() if name != "lists/valid"}
        sums["lists/valid"] = valid.detach()
        sums["loss"] = loss_sum.detach()
        sums["tokens"] = self.layout.computed_tokens(batch).to(loss_sum)
        sums["attended_pairs"] = self.layout.attended_pairs(batch).to(loss_sum)
        return loss_sum * scale, sums

    def logps_forward_step(self, length_average: bool, data_iterator, model):
        """``forward_step_func`` of a forward-only pass (reference, evaluation): the callback reports [B, K] log-probs."""
        batch = next(data_iterator)
        output = model(**self.layout.model_inputs(batch, model))

        def loss_func(out):
            logps = self.layout.response_logps(out, batch, length_average).detach()
            return torch.zeros((), device=out.device), {"ref_logps": logps}

        return output, loss_func

    def run_forward_only(self, module, microbatches: list[dict], length_average: bool) -> list:
        """[B, K] log-probs of ``microbatches`` through ``module`` (a model or its chunk list), on the last stage.

        Megatron's forward-only schedule under the run's layout. Under the interleaved schedule the micro-batches
        must share one shape (callers pad them) and their count must be a multiple of pp: the last one is repeated
        to fill up and its extra results dropped. Other pipeline stages get an empty list.
        """
        chunks = module if isinstance(module, list) else [module]
        count = len(microbatches)
        if len(chunks) > 1:
            pp = parallel_state.get_pipeline_model_parallel_world_size()
            microbatches = microbatches + [microbatches[-1]] * (-count % pp)
        first = microbatches[0]["tokens"]
        with torch.no_grad():
            out = get_forward_backward_func()(
                forward_step_func=partial(self.logps_forward_step, length_average),
                data_iterator=chunk_iterators(microbatches, len(chunks)), model=chunks,
                num_microbatches=len(microbatches), seq_length=first.shape[1], micro_batch_size=first.shape[0],
                forward_only=True,
            )
        return [item["ref_logps"] for item in out][:count] if out else []
