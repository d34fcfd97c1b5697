"""Megatron-Bridge recipes for LPO: nemo-lpo's run configurations as ``ConfigContainer``s.

``lpo_mixtral_8x7b()`` and ``lpo_mistral_7b()`` load the same layered YAML as the Slurm recipes
(recipes/conf/*.yaml: Mixtral TP1 PP4 EP8 FP8 bf16; Mistral TP2+SP DP4 bf16) and ``config_container(cfg)``
translates a validated nemo-lpo ``Config`` into Megatron-Bridge's sections: the model provider, the listwise
dataset provider, Adam + the cosine/linear schedule, DDP (summing, for the per-count loss), the checkpoint
(``pretrained_checkpoint`` = ``model.init_checkpoint``), logging and seed. ``lpo_task(cfg)`` is the matching
forward step. Import only where Megatron-Bridge is installed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.bridge.training.config import (
    CheckpointConfig,
    ConfigContainer,
    DistributedDataParallelConfig,
    LoggerConfig,
    OptimizerConfig,
    RNGConfig,
    SchedulerConfig,
    TrainingConfig,
)
from megatron.bridge.training.tokenizers.config import TokenizerConfig

from nemo_lpo.bridge.layout import pretrained_layout
from nemo_lpo.bridge.provider import LPODatasetProvider, lpo_model_provider
from nemo_lpo.bridge.task import LPOTask
from nemo_lpo.config import Config, ConfigError, DataConfig, load_config
from nemo_lpo.data import ListwiseDataset
from nemo_lpo.model.build import resolve_use_te
from nemo_lpo.model.resolve import resolve_preset
from nemo_lpo.train.adapters import build_peft
from nemo_lpo.train.feeder import run_pad_multiple
from nemo_lpo.train.lpo_model import checked_layout, layout_of

REPO = Path(__file__).resolve().parents[2]
RECIPE_CONFS = {"mixtral-8x7b": REPO / "recipes" / "conf" / "mixtral_8x7b_h100.yaml",
                "mistral-7b": REPO / "recipes" / "conf" / "mistral_7b_h100.yaml",
                "tiny-cpu": REPO / "conf" / "tiny_cpu.yaml"}


def train_iters(cfg: Config) -> int:
    """Optimizer steps: ``train.max_steps`` or ``train.epochs`` passes over the dataset."""
    if cfg.train.max_steps is not None:
        return cfg.train.max_steps

    return max(1, cfg.train.epochs * (len(ListwiseDataset(cfg.data.train_prefix)) // cfg.data.global_batch_size))


def _refuse_trainer_only_settings(cfg: Config) -> None:
    """What only ``nemo-lpo train`` does stops here with the field's name, instead of being silently ignored."""
    refused = {
        "reference.mode": (cfg.reference.mode != "precomputed", "the Megatron-Bridge recipe holds one model, so the "
                           "reference must be precomputed (`nemo-lpo ref-logps`); set reference.mode=precomputed"),
        "data.shared_prompt": (cfg.data.shared_prompt, "shared-prompt rows run in nemo-lpo train only"),
        "data.train_prefix": (not cfg.data.train_prefix or not isinstance(cfg.data.train_prefix, str),
                              "one packed dataset prefix (blends and validation run in nemo-lpo train only)"),
        "data.valid_prefix": (bool(cfg.data.valid_prefix), "validation during training runs in nemo-lpo train only"),
        "train.eval_interval": (cfg.train.eval_interval is not None, "validation runs in nemo-lpo train only"),
        "checkpoint.keep_best": (cfg.checkpoint.keep_best is not None, "keep_best runs in nemo-lpo train only"),
        # megatron's interleaved schedule needs the p2p settings and one shape per step that nemo-lpo's trainer sets
        # (model.resolve.VIRTUAL_PIPELINE_P2P, feeder.collate_uniform): without them pp=2 crosses messages silently
        "parallel.vpp": (cfg.parallel.vpp > 1, "the virtual pipeline runs in nemo-lpo train only"),
        # Megatron-Bridge's cyclic sampler always shuffles, seeded by the epoch number (not by a setting), and its
        # order depends on the data-parallel size: nemo-lpo's sampler settings would be ignored
        "data.shuffle": (not cfg.data.shuffle, "Megatron-Bridge's sampler always shuffles (seeded by the epoch); "
                         "run unshuffled data with nemo-lpo train"),
        "data.seed": (cfg.data.seed != DataConfig.seed, "Megatron-Bridge's sampler seeds its shuffle by the epoch "
                      "number, not by data.seed; leave it at its default"),
        "checkpoint.resume": (not cfg.checkpoint.resume, "Megatron-Bridge always resumes from the checkpoint folder "
                              "when it holds a checkpoint; use a new logging.run_dir or checkpoint.dir instead"),
        "checkpoint.save_at_end": (not cfg.checkpoint.save_at_end, "Megatron-Bridge always saves after the last "
                                   "step"),
    }
    for field_name, (bad, why) in refused.items():
        if bad:
            raise ConfigError(f"{field_name}: not supported by the Megatron-Bridge recipe: {why}")


def config_container(cfg: Config, *, num_workers: int = 2) -> ConfigContainer:
    """Megatron-Bridge's ``ConfigContainer`` for a validated nemo-lpo ``Config`` (precomputed reference only)."""
    if cfg.reference.mode != "precomputed":
        raise ConfigError("reference.mode: the Megatron-Bridge recipe holds one model, so the reference must be "
                          "precomputed (`nemo-lpo ref-logps`); set reference.mode=precomputed")
    _refuse_trainer_only_settings(cfg)
    p, m, o, d = cfg.parallel, cfg.model, cfg.optim, cfg.data
    bf16 = m.params_dtype == "bf16"
    use_te = resolve_use_te(m.transformer_impl)
    checked_layout(cfg, use_te)  # packed rows on TE's attention stop here, as in nemo-lpo train
    precision = {"fp8_recipe": m.fp8_recipe} if m.fp8_recipe else {}

    provider = lpo_model_provider(
        m.preset, checkpoint=m.init_checkpoint, micro_batch_size=d.micro_batch_size,
        moe_aux_loss_coeff=1e-2 if m.moe_aux_loss_coeff is None else m.moe_aux_loss_coeff,
        tp=p.tp, pp=p.pp, ep=p.ep, etp=p.etp, sequence_parallel=p.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16, fp8=m.fp8,
        recompute=None if m.recompute == "none" else m.recompute, moe_token_dispatcher_type=m.moe_token_dispatcher,
        moe_grouped_gemm=m.moe_grouped_gemm if m.moe_grouped_gemm is not None else use_te and resolve_preset(cfg).is_moe,
        use_te=use_te, **precision)
    iters = train_iters(cfg)
    run_dir = Path(cfg.logging.run_dir)
    checkpoints = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    multiple = run_pad_multiple(cfg)
    return ConfigContainer(
        model=provider,
        train=TrainingConfig(train_iters=iters, global_batch_size=d.global_batch_size,
                             micro_batch_size=d.micro_batch_size),
        optimizer=OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                  adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                                  clip_grad=o.clip_grad, bf16=bf16, use_distributed_optimizer=p.distributed_optimizer,
                                  params_dtype=torch.bfloat16 if bf16 else torch.float32),
        scheduler=SchedulerConfig(lr_decay_style=o.decay_style, lr_warmup_iters=o.warmup_steps,
                                  lr_warmup_init=0.0, lr_decay_iters=o.decay_steps or iters,
                                  start_weight_decay=o.weight_decay, end_weight_decay=o.weight_decay,
                                  weight_decay_incr_style="constant"),
        # calculate_per_token_loss: DDP sums gradients (megatron asserts average_in_collective is off)
        ddp=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
                                          overlap_param_gather=p.overlap_param_gather, average_in_collective=False,
                                          use_distributed_optimizer=p.distributed_optimizer),
        dataset=LPODatasetProvider(train_prefix=d.train_prefix, pad_to_multiple_of=multiple, packed=d.packed,
                                   seq_length=provider.seq_length,
                                   dataloader_type="cyclic", num_workers=num_workers,
                                   pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0),
        logger=LoggerConfig(log_interval=cfg.logging.log_interval,
                            tensorboard_dir=str(run_dir / "tb") if cfg.logging.tensorboard else None,
                            wandb_project=cfg.logging.wandb_project, wandb_exp_name=cfg.logging.wandb_name,
                            wandb_save_dir=str(run_dir / "wandb") if cfg.logging.wandb_project else None),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=provider.vocab_size),
        checkpoint=CheckpointConfig(
            save=str(checkpoints), load=str(checkpoints), ckpt_format="torch_dist",
            most_recent_k=cfg.checkpoint.keep_last or -1,  # nemo-lpo's 0 and Megatron-Bridge's -1 keep all
            save_interval=cfg.checkpoint.save_interval or iters,
            pretrained_checkpoint=(pretrained_layout(m.init_checkpoint, run_dir, p.tp, p.pp)
                                   if m.init_checkpoint else None)),
        rng=RNGConfig(seed=cfg.train.seed),
        # Bridge's LoRA / DoRA from nemo-lpo's peft section, seeded as nemo-lpo train seeds it
        peft=build_peft(cfg.peft, cfg.train.seed) if cfg.peft.enabled else None,
        mixed_precision=None,  # precision is the provider's (nemo-lpo's transformer_config: bf16 / fp8)
    )


def lpo_task(cfg: Config) -> LPOTask:
    """The forward step matching ``cfg.loss``."""
    return LPOTask(loss_type=cfg.loss.type, beta=cfg.loss.beta, length_average=cfg.loss.length_average,
                   options=cfg.loss.options, layout=layout_of(cfg))


def recipe(name: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[ConfigContainer, LPOTask]:
    """(ConfigContainer, forward step) of a named recipe (``RECIPE_CONFS``) with nemo-lpo ``key=value`` overrides."""
    if name not in RECIPE_CONFS:
        raise ConfigError(f"recipe: unknown {name!r}; choose one of {sorted(RECIPE_CONFS)}")
    if not RECIPE_CONFS[name].is_file():
        raise FileNotFoundError(f"recipe {name}: {RECIPE_CONFS[name]} is missing (install nemo-lpo from its source "
                                "tree: pip install -e .)")
    cfg = load_config(RECIPE_CONFS[name], list(overrides))
    return config_container(cfg), lpo_task(cfg)


def lpo_mixtral_8x7b(*overrides: str) -> ConfigContainer:
    """Mixtral-8x7B LPO on 8×8 H100: TP1 PP4 EP8, FP8 (hybrid) through TE, bf16, global batch 32."""
    return recipe("mixtral-8x7b", overrides)[0]


def lpo_mistral_7b(*overrides: str) -> ConfigContainer:
    """Mistral-7B LPO on 8 H100: TP2 + sequence parallel, DP4, bf16, distributed optimizer, global batch 32."""
    return recipe("mistral-7b", overrides)[0]
