"""Whether a run folder that already holds a run can be resumed with this config (a start-up check).

The newest checkpoint stores the config it was saved with (``train.checkpoint.save_checkpoint``). A change that the
continuation cannot follow exactly (the data, the model, the loss, the optimizer, the seeds) refuses to resume
unless ``checkpoint.resume_despite_changes=true``; ``checkpoint.resume=false`` starts fresh instead. Changes the
trainer is built to absorb (the parallel layout: checkpoints reshard; logging, checkpointing, validation, the run's
length) are listed and the run resumes. The LR schedule is the checkpoint's (``SCHEDULE_FROM_CHECKPOINT``): a change to it
is marked as not applied, and a raised ``train.max_steps`` (or ``train.epochs``) past the saved decay's end is named
(refused at min_lr 0).
"""

from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing

from nemo_lpo.config import Config
from nemo_lpo.config.errors import PreflightError
from nemo_lpo.io import LATEST, latest_checkpoint

# Settings whose change makes the resumed run differ from an uninterrupted one (a key or a section prefix).
BREAKS_EXACT_RESUME = (
    "model.preset", "model.params_dtype", "model.fp8", "model.fp8_recipe", "model.moe_aux_loss_coeff",
    "model.init_checkpoint", "data.train_prefix", "data.global_batch_size", "data.shuffle", "data.seed",
    "loss.", "reference.mode", "reference.checkpoint", "optim.", "train.seed", "peft.",
)


# Restored from the checkpoint on resume, whatever the config says: megatron's OptimizerParamScheduler with
# use_checkpoint_opt_param_scheduler=True (train/optimizer.py) takes the saved value in load_state_dict
# (megatron/core/optimizer_param_scheduler.py, _check_and_set). A change to these is listed as not applied.
SCHEDULE_FROM_CHECKPOINT = ("optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.decay_steps",
                            "optim.decay_style", "optim.weight_decay")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, now: Config) -> tuple[list[str], list[str]]:
    """(breaking, allowed): ``key old -> new`` of every setting that differs between ``saved`` and ``now``.

    A key the saved config lacks (written before the setting existed) counts as its default.
    """
    before = {**_flat(Config().to_dict()), **_flat(saved)}
    after = _flat(now.to_dict())
    breaking, allowed = [], []
    for key in sorted(after.keys() | before.keys()):
        if key not in after or before.get(key) == after[key]:
            continue
        change = f"{key} {before.get(key)!r} -> {after[key]!r}"
        if key in SCHEDULE_FROM_CHECKPOINT:
            change += " (not applied: the LR schedule is the checkpoint's)"
        is_breaking = any(key == b or (b.endswith(".") and key.startswith(b)) for b in BREAKS_EXACT_RESUME)
        (breaking if is_breaking else allowed).append(change)
    return breaking, allowed


def latest_run_checkpoint(cfg: Config) -> Path | None:
    """The run's newest complete checkpoint when it resumes (``checkpoint.resume``), else None."""
    if not cfg.checkpoint.resume:
        return None
    try:
        return latest_checkpoint(cfg.checkpoint_dir())
    except FileNotFoundError as err:
        raise PreflightError("checkpoint.resume", True, f"cannot resume: {err}", f"fix {LATEST} to name a complete "
                             "step_* folder, or start fresh with checkpoint.resume=false") from None


def check_resume(cfg: Config) -> list[str]:
    """Refuse a resume the config change breaks; returns notes on the changes that resume anyway."""
    path = latest_run_checkpoint(cfg)
    if path is None:
        marker = cfg.checkpoint_dir() / LATEST
        fresh = not cfg.checkpoint.resume and marker.is_file()
        return [f"checkpoint.resume=false: starting fresh; the checkpoints in {marker.parent} get replaced"] if fresh \
            else []
    try:
        common = dist_checkpointing.load_common_state_dict(str(path))
    except Exception as err:  # an unreadable common state: the trainer's load would fail the same way
        raise PreflightError("checkpoint.resume", True, f"cannot read {path} ({type(err).__name__}: {err})",
                             "start fresh with checkpoint.resume=false or another logging.run_dir") from None
    saved = common.get("config")
    if not isinstance(saved, dict):
        return []
    breaking, allowed = config_changes(saved, cfg)
    past_schedule = _past_the_schedule(cfg, saved, common.get("scheduler"))
    if past_schedule and float(common["scheduler"].get("min_lr", 0.0)) == 0.0:
        breaking.append(past_schedule)  # every step after the schedule's end would train at lr 0
    elif past_schedule:
        allowed.append(past_schedule)
    if breaking and not cfg.checkpoint.resume_despite_changes:
        raise PreflightError("checkpoint.resume", True, f"{path} was saved with another config ({'; '.join(breaking)})"
                             ", so resuming would not continue that run", "restore those values, start fresh with "
                             "checkpoint.resume=false (replaces its checkpoints) or another logging.run_dir, or "
                             "resume anyway with checkpoint.resume_despite_changes=true")
    changes = breaking + allowed
    return [f"resuming {path} with changed settings: {'; '.join(changes)}"] if changes else []


def _past_the_schedule(cfg: Config, saved: dict, scheduler: dict | None) -> str | None:
    """A note when a longer run (``train.max_steps``, or ``train.epochs``) goes past the checkpoint's LR decay.

    The decay is restored on resume. Only a changed run length counts: a run configured to decay early
    (``optim.decay_steps`` < max_steps) resumes as it was. Raised ``train.epochs`` (max_steps null before and now)
    is measured against the saved decay only where that decay ended at the run's last step (``optim.decay_steps``
    null then): the new length is then the decay's end × new / old epochs; otherwise it is not checked.
    """
    if not isinstance(scheduler, dict) or scheduler.get("lr_decay_style") == "constant" \
            or scheduler.get("lr_decay_steps") is None:
        return None
    decay_end, was = scheduler["lr_decay_steps"], saved.get("train", {})
    if cfg.train.max_steps is not None:
        if was.get("max_steps") == cfg.train.max_steps:
            return None
        setting, steps = f"train.max_steps={cfg.train.max_steps}", cfg.train.max_steps
    elif was.get("max_steps") is None and saved.get("optim", {}).get("decay_steps") is None and was.get("epochs"):
        steps = decay_end // was["epochs"] * cfg.train.epochs
        setting = f"train.epochs={cfg.train.epochs} ({steps} steps; {was['epochs']} when saved)"
    else:
        return None
    if steps <= decay_end:
        return None
    return (f"{setting} runs past the checkpoint's LR schedule, which reaches "
            f"optim.min_lr={scheduler.get('min_lr')} at step {decay_end} and stays there (the schedule is restored "
            f"from the checkpoint; to extend a run with a new schedule, start one from it: model.init_checkpoint="
            f"{cfg.checkpoint_dir()} in another logging.run_dir)")
