"""Megatron optimizer (Adam, optionally the DistributedOptimizer) and OptimizerParamScheduler from the config.

Also the optimizer half of a checkpoint load that survives a change of optimizer shape (``checkpoint.py``):
one optimizer vs a ChainedOptimizer (dense + expert parts under EP), plain vs DistributedOptimizer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from nemo_lpo.config import Config


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: ``train.max_steps`` or ``epochs`` passes over the data."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps
    return max(1, cfg.train.epochs * steps_per_epoch)


def build_optimizer(cfg: Config, model, num_steps: int):
    """Return (megatron optimizer, OptimizerParamScheduler) for the DDP-wrapped ``model`` (or its chunk list).

    Adam(W) with fp32 main parameters; bf16 models keep fp32 master weights and gradients
    (megatron's mixed-precision optimizer). Gradient clipping by global norm happens in ``step()``.
    Warm-up is linear over steps 1..``optim.warmup_steps``, then ``optim.decay_style`` down to
    ``optim.min_lr`` at ``optim.decay_steps`` (default: the run's last step).
    """
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
    optimizer = get_megatron_optimizer(opt_config, model if isinstance(model, list) else [model])
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


# The fp32 main params: `param` (DistributedOptimizer), `fp32_param` (plain optimizer of a bf16 model), none
# (plain optimizer of an fp32 model: the model weights are the main params).
MAIN_PARAM_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")


def sub_optimizers(optimizer) -> list:
    """The megatron optimizers inside ``optimizer`` (a ChainedOptimizer's parts, or itself)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(optimizer) -> bool:
    """Whether ``optimizer`` is (or chains) a DistributedOptimizer."""
    return any(isinstance(opt, DistributedOptimizer) for opt in sub_optimizers(optimizer))


def init_optimizer_state(optimizer) -> None:
    """Give a fresh DistributedOptimizer's torch Adam its (zero) state before a load.

    Its ``sharded_state_dict(is_loading=True)`` reads the Adam ``step`` of every parameter, which torch's
    Adam (used without TE / Apex, as on CPU) only creates at the first ``step()``; the loaded values
    overwrite these zeros.
    """
    for opt in sub_optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer) or getattr(opt, "is_stub_optimizer", False):
            continue
        inner = opt.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["exp_avg"] = torch.zeros_like(param.data)
                    state["exp_avg_sq"] = torch.zeros_like(param.data)
                    state["step"] = torch.tensor(0.0)


def load_optimizer_state(optimizer, state) -> None:
    """``optimizer.load_state_dict(state)``, working around megatron's DistributedOptimizer with torch's Adam.

    Its ``fully_reshardable`` load copies every tensor of a parameter's Adam state from the checkpoint, and
    torch's Adam (the one used without TE / Apex, as on CPU) keeps ``step`` as such a tensor, which the
    checkpoint stores once per optimizer, not per parameter (KeyError 'step'). The step is restored by the
    optimizer's own ``load_state_dict`` first; it is set aside while the parameter state is copied, and each
    parameter gets its own copy back: that ``load_state_dict`` hands ONE tensor to every parameter, which
    torch's Adam then increments in place once per parameter (a wrong bias correction from the next step on).
    """
    subs = sub_optimizers(optimizer)
    if len(subs) == 1:
        parts = [state]
    else:
        parts = [state[i] for i in sorted(state)] if isinstance(state, dict) else list(state)
        if len(parts) != len(subs):
            raise RuntimeError(f"optimizer state has {len(parts)} parts, the optimizer {len(subs)}")
    for opt, part in zip(subs, parts, strict=True):
        if not isinstance(opt, DistributedOptimizer) or part.get("param_state_sharding_type") != "fully_reshardable":
            opt.load_state_dict(part)
            continue
        param_state = part.pop("param_state")
        opt.load_state_dict(part)  # param groups, Adam's step, allocation of the state tensors
        inner = opt.optimizer.state
        steps = {param: inner[param].pop("step") for param in list(inner) if "step" in inner[param]}
        try:
            opt.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for param, step in steps.items():
                inner[param]["step"] = step.detach().clone()
    if len(subs) > 1:
        optimizer._synchronize_steps()


def main_params_from_checkpoint(opt_tensors: dict, path: Path) -> dict:
    """Point the requested fp32 main params at the name the checkpoint stores them under.

    The DistributedOptimizer calls them ``optimizer.state.param.X``, a bf16 model's plain optimizer
    ``optimizer.state.fp32_param.X``, and an fp32 model's plain optimizer keeps none (they are the weights
    ``X``): same global tensor, same shard, so switching the optimizer kind keeps the exact values. Requests
    of the weights themselves are moved out of ``opt_tensors`` and returned: they need a load of their own
    (one load cannot read a shard into two tensors).
    """
    wanted = {slot: sh for slot, sh in opt_tensors.items() if sh.key.startswith(MAIN_PARAM_PREFIXES)}
    if not wanted:
        return {}
    saved = dist_checkpointing.load_tensors_metadata(str(path))
    from_weights = {}
    for slot, sh in wanted.items():
        if sh.key in saved:
            continue
        name = sh.key.split(".", 3)[3]
        for key in [prefix + name for prefix in MAIN_PARAM_PREFIXES]:
            if key in saved:
                sh.key = key
                break
        else:  # the bare weights only stand in for fp32 main params when they are fp32 themselves
            if name in saved and saved[name].dtype == torch.float32:
                sh.key = name
                from_weights[slot] = opt_tensors.pop(slot)
    return from_weights


class _Slot:
    """Where a loaded sharded value goes back into the optimizer's state dict."""

    def __init__(self, index: str) -> None:
        self.index = index


def split_sharded(tree, leaves: dict):
    """``tree`` with each sharded leaf moved to ``leaves`` (flat, by a slot name) and a ``_Slot`` left in its place.

    A flat request keeps the loaded values addressable: megatron's loader compacts lists whose items are
    partly non-sharded, so paths into the original structure would shift.
    """
    if isinstance(tree, dict):
        return {k: split_sharded(v, leaves) for k, v in tree.items()}
    if isinstance(tree, list):
        return [split_sharded(v, leaves) for v in tree]
    if isinstance(tree, ShardedBase):
        slot = _Slot(str(len(leaves)))
        leaves[slot.index] = tree
        return slot
    if isinstance(tree, LocalNonpersistentObject):
        return tree.unwrap()  # this process's own value (parameter ids), never read from the checkpoint
    return copy.deepcopy(tree)


def fill_slots(skeleton, loaded: dict):
    """The skeleton with the loaded value in each slot."""
    if isinstance(skeleton, dict):
        return {k: fill_slots(v, loaded) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [fill_slots(v, loaded) for v in skeleton]
    return loaded[skeleton.index] if isinstance(skeleton, _Slot) else skeleton


def saved_adam_step(saved) -> float | None:
    """Adam's step count in a saved optimizer common state, whatever the saving optimizer's structure."""
    if isinstance(saved, dict):
        if "common_step" in saved:  # a plain optimizer's state
            return float(saved["common_step"])
        for group in saved.get("param_groups", []) if isinstance(saved.get("param_groups"), list) else []:
            if isinstance(group, dict) and group.get("step") is not None:  # a DistributedOptimizer's groups
                return float(group["step"])
        values = saved.values()
    elif isinstance(saved, list):
        values = saved
    else:
        return None
    for value in values:
        step = saved_adam_step(value)
        if step is not None:
            return step
    return None


def set_adam_step(state, step: float) -> None:
    """Put ``step`` where the loading optimizer's ``load_state_dict`` reads it."""
    if isinstance(state, list):
        for item in state:
            set_adam_step(item, step)
    elif isinstance(state, dict):
        if isinstance(state.get("param_groups"), list):
            if isinstance(state.get("state"), dict):  # torch optimizer layout (plain / fp16 megatron optimizer)
                state["state"]["common_step"] = torch.tensor(step)
            else:  # DistributedOptimizer: the step lives in its param groups
                for group in state["param_groups"]:
                    group["step"] = step
        for value in state.values():
            if isinstance(value, (dict, list)):
                set_adam_step(value, step)
