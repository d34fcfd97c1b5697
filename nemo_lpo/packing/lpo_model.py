"""The trainer's ``LPOModel`` on shared-prompt batches, and switching a ``Trainer`` to them.

Only the schedule callbacks change: the model is called without labels (its last stage returns the
vocab-parallel logits) and the loss function gathers the response log-probs at their source positions
(``shared_prompt_logps``). Loss scaling, metric sums and the reference handling are the trainer's
(nemo_lpo/train/lpo_model.py), so results match an unpacked run up to float rounding.
"""

from __future__ import annotations

from functools import partial

import torch

from nemo_lpo.train.lpo_model import LPOModel


class SharedPromptLPOModel(LPOModel):
    """``LPOModel`` whose micro-batches come from ``collate_shared_prompt`` (one row per list)."""

    def forward_step(self, global_valid: torch.Tensor, num_microbatches: int, data_iterator, model):
        """Megatron ``forward_step_func`` on a shared-prompt micro-batch."""
        from nemo_lpo.packing.logprobs import shared_prompt_model_inputs

        batch = next(data_iterator)
        output = model(**shared_prompt_model_inputs(batch, model))
        return output, partial(self.loss_func, batch, global_valid, num_microbatches)

    def loss_func(self, batch: dict, global_valid: torch.Tensor, num_microbatches: int, output: torch.Tensor):
        """As ``LPOModel.loss_func``; ``tokens`` counts the tokens actually computed (each prompt once)."""
        from nemo_lpo.losses import listwise_loss
        from nemo_lpo.packing.logprobs import shared_prompt_logps

        policy = shared_prompt_logps(output, batch, self.cfg.loss.length_average)
        reference = batch["ref_logps"].to(policy)
        per_list, metrics = listwise_loss(self.cfg.loss.type, policy, reference, batch["rewards"].to(policy),
                                          batch["response_mask"], self.cfg.loss.beta, **self._loss_options(batch))
        loss_sum = per_list.sum()
        scale = num_microbatches * self.dp_size / global_valid.clamp(min=1).to(loss_sum)
        valid = metrics["lists/valid"]
        sums = {name: (value * valid).detach() for name, value in metrics.items() if name != "lists/valid"}
        sums["lists/valid"] = valid.detach()
        sums["loss"] = loss_sum.detach()
        sums["tokens"] = batch["row_lengths"].sum().to(loss_sum)
        return loss_sum * scale, sums

    def reference_forward_step(self, length_average: bool, data_iterator, model):
        """Forward-only reference pass on a shared-prompt micro-batch: the callback reports [B, K] log-probs."""
        from nemo_lpo.packing.logprobs import shared_prompt_logps, shared_prompt_model_inputs

        batch = next(data_iterator)
        output = model(**shared_prompt_model_inputs(batch, model))

        def loss_func(out):
            logps = shared_prompt_logps(out, batch, length_average).detach()
            return torch.zeros((), device=out.device), {"ref_logps": logps}

        return output, loss_func


def use_shared_prompt(trainer) -> None:
    """Switch a built ``nemo_lpo.train.loop.Trainer`` to shared-prompt batches, in place.

    The trainer's ``BatchFeeder`` (sampler, dataset, device moves, reference handling) is kept and its
    collator swapped for ``SharedPromptCollator``; its ``LPOModel`` is replaced by a
    ``SharedPromptLPOModel`` holding the same weights, with a fresh optimizer and scheduler. (The
    trainer builds its model inside ``__init__``, so the model is built twice; a ``Trainer`` hook for the
    model class and collator would avoid that, see docs/performance.md.)
    """
    from nemo_lpo.packing.collate import SharedPromptCollator
    from nemo_lpo.train.optimizer import build_optimizer
    from nemo_lpo.train.step import BatchFeeder

    cfg = trainer.cfg
    lpo = SharedPromptLPOModel(cfg)
    lpo.module.load_state_dict(trainer.lpo.module.state_dict())
    if lpo.reference is not None and trainer.lpo.reference is not None:
        lpo.reference.load_state_dict(trainer.lpo.reference.state_dict())
    trainer.lpo = lpo
    trainer.optimizer, trainer.scheduler = build_optimizer(cfg, lpo.model, trainer.total_steps)
    trainer.feeder.collator = SharedPromptCollator(trainer.feeder.dataset.pad_id,
                                                   pad_to_multiple_of=BatchFeeder.pad_multiple(cfg))
