"""Megatron optimizer (Adam, optionally the DistributedOptimizer) and OptimizerParamScheduler from the config."""

from __future__ import annotations

import torch

from nemo_lpo.config import Config


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.max_steps`` or ``epochs`` passes over the data."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, cfg.train.epochs * steps_per_epoch)


def build_optimizer(cfg: Config, model, num_steps: int):
    """Return (megatron optimizer, OptimizerParamScheduler) for the DDP-wrapped ``model``.

    Adam(W) with fp32 main parameters; bf16 models keep fp32 master weights and gradients
    (megatron's mixed-precision optimizer). Gradient clipping by global norm happens in ``step()``.
    Warm-up is linear over steps 1..``optim.warmup_steps``, then ``optim.decay_style`` down to
    ``optim.min_lr`` at ``optim.decay_steps`` (default: the run's last step).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, p = cfg.optim, cfg.parallel
    bf16 = cfg.model.params_dtype == "bf16"
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=p.distributed_optimizer,
        overlap_param_gather=p.overlap_param_gather,
        log_num_zeros_in_grad=False,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    decay_steps = o.decay_steps or num_steps
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if o.warmup_steps else o.lr,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=max(decay_steps, o.warmup_steps + 1),
        lr_decay_style=o.decay_style,
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=max(decay_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )
    if o.warmup_steps:
        # megatron's warm-up starts at init_lr=0 for scheduler step 0; shift by one so that step 1 already
        # trains at lr/warmup_steps and step ``warmup_steps`` at the peak (a checkpoint restores the count).
        scheduler.step(increment=1)
    return optimizer, scheduler
