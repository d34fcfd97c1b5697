"""The trainer's ``LPOModel`` on shared-prompt batches, and switching a ``Trainer`` to them.

Only the schedule callbacks change: the model is called without labels (its last stage returns the
vocab-parallel logits) and the loss function gathers the response log-probs at their source positions
(``shared_prompt_logps``). Loss scaling, metric sums and the reference handling are the trainer's
(nemo_lpo/train/lpo_model.py), so results match an unpacked run up to float rounding.
"""

from __future__ import annotations

import torch

from nemo_lpo.train.lpo_model import LPOModel


class SharedPromptLPOModel(LPOModel):
    """``LPOModel`` whose micro-batches come from ``collate_shared_prompt`` (one row per list)."""

    def model_inputs(self, batch: dict, model) -> dict:
        """Forward arguments without labels: the last stage returns the vocab-parallel logits."""
        from nemo_lpo.packing.logprobs import shared_prompt_model_inputs

        return shared_prompt_model_inputs(batch, model)

    def response_logps(self, output: torch.Tensor, batch: dict, length_average: bool) -> torch.Tensor:
        """[B, K] log-probs gathered from the logits at each response token's source position."""
        from nemo_lpo.packing.logprobs import shared_prompt_logps

        return shared_prompt_logps(output, batch, length_average)

    def computed_tokens(self, batch: dict) -> torch.Tensor:
        """Tokens actually computed: each prompt once per list."""
        return batch["row_lengths"].sum()


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
