"""torchrun worker: Megatron-Bridge's own set-up functions and ``train()`` run the LPO forward step on CPU (gloo).

Usage: bridge_loop.py WORK_DIR PREFIX SCENARIO [SCENARIO ...]
(scenarios: single, resume, trainer, lora, lora_resume, trainer_lora with 1 process; pp2, dp2, ep2 with 2)

The first launch writes WORK_DIR/init (nemo-lpo's dist checkpoint of freshly seeded weights) and the dataset copy
with its reference sidecar (``tests/dist/bridge_parity.prepare``); every scenario starts from that init through
Bridge's ``pretrained`` layout, so all layouts start from the same weights.

Where the run enters Megatron-Bridge: ``finetune()`` -> ``pretrain()`` -> ``setup()`` cannot run on CPU (its
``initialize_megatron`` asserts CUDA, and it all-reduces the start time in a CUDA tensor), so ``bridge_setup``
does the CPU part of ``initialize_megatron`` as nemo-lpo's trainer does (``init_parallel``: gloo, megatron's
groups, seeds) plus the two calls ``initialize_megatron`` makes for the loop (Megatron's micro-batch calculator,
Bridge's ``init_rerun_state``), then calls Bridge's own functions in ``setup()``'s order: ``runtime_config_update``,
``build_tokenizer``, the provider's ``provide_distributed_model`` (as ``_build_distributed_model`` calls it, plus
``use_cpu_initialization=True``),
``setup_optimizer``, ``create_checkpoint_manager`` + ``_should_load_checkpoint`` + the manager's ``load``
(``load_checkpoint``: the pretrained layout, or a Bridge checkpoint on resume), ``_update_model_config_funcs``,
``get_dataset_provider`` + ``_bind_dataset_provider_context`` + ``setup_data_iterators`` (LPODatasetProvider), and
then Bridge's ``train()`` itself (its ``train_step``, logging, and ``save_checkpoint`` at ``save_interval``).
With ``peft`` set (lora, lora_resume), setup()'s PEFT pre-wrap hook is registered before the model is built
(``_create_peft_pre_wrap_hook``: Bridge loads the base from the pretrained layout and applies nemo-lpo's LoRA), and
the checkpoint manager loads only on a resume, as in setup().

Rank 0 prints one ``RESULT {json}`` per scenario: the loss ``train_step`` reduced per step (from the forward step's
``[sum, count]`` pairs) and the optimizer's grad norm.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STEPS = 4
SAVE_STEP = 2
CONF = Path(__file__).resolve().parents[2] / "conf" / "tiny_cpu.yaml"
COMMON = ["reference.mode=precomputed", f"train.max_steps={STEPS}", "optim.warmup_steps=0", "optim.lr=1e-3",
          "optim.clip_grad=1.0", "data.global_batch_size=4", "data.micro_batch_size=1", "logging.tensorboard=false",
          "logging.log_interval=1", f"checkpoint.save_interval={SAVE_STEP}"]
LORA = ["peft.type=lora", "peft.dim=4", "peft.alpha=8"]
LAYOUTS = {"single": [], "resume": [], "trainer": [], "pp2": ["parallel.pp=2"], "dp2": [], "ep2": ["parallel.ep=2"],
           "lora": LORA, "lora_resume": LORA,
           # the online reference (the same numbers as the sidecar) builds a second model before the adapters are
           # drawn: the adapters must still be Bridge's (adapter_init seeds them)
           "trainer_lora": [*LORA, "reference.mode=online"]}


def overrides(work: Path, data: str, name: str) -> list[str]:
    """nemo-lpo settings of one scenario (its own run dir; the shared init and dataset copy)."""
    return [*COMMON, f"data.train_prefix={data}", f"model.init_checkpoint={work / 'init'}",
            f"logging.run_dir={work / name}", *LAYOUTS[name]]


def bridge_setup(cfg, container, load: Path | None = None, load_step: int | None = None):
    """Bridge's ``setup()`` below ``initialize_megatron``: (state, model, optimizer, scheduler, iterator, manager, pgs)."""
    from megatron.bridge.data.loaders import setup_data_iterators
    from megatron.bridge.data.utils import get_dataset_provider
    from megatron.bridge.training import checkpointing
    from megatron.bridge.training import setup as bridge
    from megatron.bridge.training.checkpointing import CheckpointLoadContext, create_checkpoint_manager
    from megatron.bridge.training.config import runtime_config_update
    from megatron.bridge.training.initialize import init_rerun_state
    from megatron.bridge.training.optim import setup_optimizer
    from megatron.bridge.training.state import GlobalState
    from megatron.bridge.training.tokenizers.tokenizer import build_tokenizer
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    from nemo_lpo.train.loop import init_parallel

    container.dist.distributed_backend = "gloo"
    if load is not None:  # resume: Bridge's loader reads this folder (ckpt_step picks the iteration)
        container.checkpoint.load, container.checkpoint.ckpt_step = str(load), load_step
    runtime_config_update(container)
    init_parallel(cfg)  # instead of initialize_megatron (asserts CUDA): gloo + megatron's groups + seeds
    t = container.train
    destroy_num_microbatches_calculator()
    init_num_microbatches_calculator(0, t.rampup_batch_size, t.global_batch_size, t.micro_batch_size,
                                     container.data_parallel_size, t.decrease_batch_size_if_needed)
    destroy_rerun_state_machine()  # process-globals, set by the previous scenario's set-up and checkpoint load
    checkpointing._CHECKPOINT_VERSION = None
    init_rerun_state(container.rerun_state_machine)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    state = GlobalState()
    state.cfg = container
    tokenizer = build_tokenizer(container.tokenizer)
    if container.peft is not None:  # setup(): Bridge's hook loads the base (pretrained layout), adds the adapters
        bridge._register_pre_wrap_hook(container.model, bridge._create_peft_pre_wrap_hook(container, state))
    # setup()'s _build_distributed_model makes this call without use_cpu_initialization, and Bridge's get_model
    # then sets the provider's flag to False and moves the model with .cuda(): the one argument added here
    model = container.model.provide_distributed_model(
        ddp_config=container.ddp, use_megatron_fsdp=container.dist.use_megatron_fsdp,
        use_torch_fsdp2=container.dist.use_torch_fsdp2,
        overlap_param_gather_with_optimizer_step=container.optimizer.overlap_param_gather_with_optimizer_step,
        data_parallel_random_init=container.rng.data_parallel_random_init, pg_collection=pgs,
        use_cpu_initialization=True)
    optimizer, scheduler = setup_optimizer(
        optimizer_config=container.optimizer, scheduler_config=container.scheduler, model=model,
        use_gloo_process_groups=container.dist.use_gloo_process_groups, pg_collection=None,
        optimizer_config_override_provider=container.optimizer_config_override_provider)
    manager = create_checkpoint_manager(container.checkpoint)
    if bridge._should_load_checkpoint(container, manager):  # PEFT: only a resume (the hook loaded the base)
        if container.peft is not None:  # as setup() does: the adapters' resume loads optimizer and RNG too
            container.checkpoint.finetune = False
        manager.load(CheckpointLoadContext(state=state, model=model, optimizer=optimizer,
                                           opt_param_scheduler=scheduler))
    else:
        assert container.peft is not None, "no checkpoint to load"
    bridge._update_model_config_funcs(model, container.model, container.ddp, optimizer,
                                      align_grad_reduce=container.dist.align_grad_reduce, pg_collection=pgs)
    provider = bridge._bind_dataset_provider_context(get_dataset_provider(container.dataset), tokenizer=tokenizer,
                                                     pg_collection=pgs)
    train_iter, _, _ = setup_data_iterators(cfg=container, train_state=state.train_state, model_length=len(model),
                                            train_valid_test_datasets_provider=provider, dp_group=pgs.dp,
                                            eval_dp_group=None)
    return state, model, optimizer, scheduler, train_iter, manager, pgs


def run_bridge(work: Path, data: str, name: str, load: Path | None = None, load_step: int | None = None) -> dict:
    """Bridge's set-up and ``train()`` for one scenario; the per-step loss and grad norm ``train_step`` returned."""
    import torch
    from megatron.bridge.training import train as bridge_train
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from nemo_lpo.bridge.recipes import recipe
    from nemo_lpo.config import load_config
    from nemo_lpo.train.adapters import base_checksum, parameter_counts

    destroy_moe_metrics_tracker()  # megatron's process-global MoE tracker, sized by the first model
    settings = overrides(work, data, name)
    cfg = load_config(CONF, settings)
    container, task = recipe("tiny-cpu", settings)
    container.dataset.num_workers = 0
    container.dataset.persistent_workers = False
    state, model, optimizer, scheduler, train_iter, manager, pgs = bridge_setup(cfg, container, load, load_step)
    start = state.train_state.step
    base_before = base_checksum(model)
    steps = []
    original_step = bridge_train.train_step

    def recording_step(*args, **kwargs):  # Bridge's own train_step; records what it returns
        out = original_step(*args, **kwargs)
        loss = out[0].get("loss")
        steps.append({"loss": None if loss is None else float(loss), "grad_norm": out[5]})
        return out

    bridge_train.train_step = recording_step
    try:
        bridge_train.train(task, model, optimizer, scheduler, train_iter, None, state, manager, pgs)
    finally:
        bridge_train.train_step = original_step
    # PP: only the last stage reduces the loss; gather it to rank 0 over the world
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, steps)
    losses = next((g for g in gathered if g and g[0]["loss"] is not None), steps)
    checkpoints = work / name / "checkpoints"
    return {"start": start, "end": state.train_state.step, "loss": [s["loss"] for s in losses],
            "grad_norm": [s["grad_norm"] for s in steps], "saved": sorted(p.name for p in checkpoints.glob("iter_*")),
            "base": [base_before, base_checksum(model)], **parameter_counts(model),
            "trainable_names": sorted({n.split(".adapter.")[-1]  # an adapter's own name; any other name whole
                                       for m in model for n, p in m.named_parameters() if p.requires_grad}),
            "saved_keys": saved_tensor_keys(checkpoints / f"iter_{SAVE_STEP:07d}")}


def saved_tensor_keys(folder: Path) -> list[str]:
    """The tensor keys of a torch_dist checkpoint folder (its metadata), [] when there is none."""
    from megatron.core.dist_checkpointing import load_tensors_metadata

    return sorted(load_tensors_metadata(str(folder))) if (folder / "metadata.json").exists() else []


def bridge_order(num_lists: int, global_batch: int, dp_size: int, data_sharding: bool) -> list[int]:
    """Epoch 0's lists, global batch after global batch, as Bridge's cyclic sampler hands them to ``dp_size`` ranks.

    Each rank's ``MegatronPretrainingRandomSampler`` (micro-batches of one list) is drawn; a global batch is every
    rank's next ``global_batch / dp_size`` lists (the per-list mean over it does not depend on their order).
    """
    from megatron.bridge.data.samplers import MegatronPretrainingRandomSampler

    per_rank = [[batch[0] for batch in MegatronPretrainingRandomSampler(
        None, total_samples=num_lists, consumed_samples=0, micro_batch_size=1, data_parallel_rank=rank,
        data_parallel_size=dp_size, data_sharding=data_sharding)] for rank in range(dp_size)]
    chunk = global_batch // dp_size
    return [index for start in range(0, len(per_rank[0]), chunk) for lists in per_rank
            for index in lists[start:start + chunk]]


def run_trainer(work: Path, data: str, name: str) -> dict:
    """nemo-lpo's own trainer on the same settings: its losses in its own list order and in Bridge's.

    The two samplers differ (nemo-lpo's: a ``numpy`` permutation seeded by ``(data.seed, epoch)``, the same for every
    data-parallel size; Bridge's: ``torch.randperm`` seeded by the epoch number alone, drawn per data-parallel rank
    from its own shard), so the ``bridge_dpN`` runs hand the trainer's sampler the order Bridge's sampler gives at
    N data-parallel ranks: the same lists in the same global batches.
    """
    import numpy as np

    from nemo_lpo.bridge.recipes import recipe
    from nemo_lpo.config import load_config
    from nemo_lpo.train.adapters import base_checksum
    from nemo_lpo.train.loop import Trainer, init_parallel
    from tests.dist.train_common import metrics_lines

    sharding = recipe("tiny-cpu", overrides(work, data, "trainer"))[0].dataset.data_sharding
    result = {}
    orders = (("own", None), ("bridge_dp1", 1), ("bridge_dp2", 2)) if name == "trainer" else (("bridge_dp1", 1),)
    for order, dp_size in orders:
        cfg = load_config(CONF, [*overrides(work, data, name), "checkpoint.save_at_end=false",
                                 f"logging.run_dir={work / name / order}"])
        init_parallel(cfg)
        trainer = Trainer(cfg)
        sampler = trainer.feeder.sampler
        if dp_size:
            bridge = np.asarray(bridge_order(sampler.num_lists, sampler.global_batch_size, dp_size, sharding))
            sampler.epoch_order = lambda epoch, bridge=bridge: bridge
        trainer.resume()
        trainer.run()
        lines = metrics_lines(Path(cfg.logging.run_dir) / "metrics.jsonl")
        result[order] = {"order": sampler.epoch_order(0).tolist(), "loss": [line["loss"] for line in lines],
                         "grad_norm": [line["grad_norm"] for line in lines], "base": base_checksum(trainer.lpo.modules),
                         "trainable": lines[0].get("params/trainable")}
    return result


def run(work: Path, prefix: str, name: str) -> None:
    import torch

    from nemo_lpo.config import load_config
    from tests.dist.bridge_parity import prepare

    data = prepare(work, prefix, lambda scenario, d: load_config(CONF, overrides(work, d, "single")))
    if name.startswith("trainer"):
        result = run_trainer(work, data, name)
    elif name.endswith("resume"):  # Bridge's loader resumes the uninterrupted run's step-2 checkpoint
        uninterrupted = name.removesuffix("resume").removesuffix("_") or "single"
        result = run_bridge(work, data, name, load=work / uninterrupted / "checkpoints", load_step=SAVE_STEP)
    else:
        result = run_bridge(work, data, name)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"scenario": name, **result}), flush=True)


def main() -> None:
    from tests.dist import bridge_te_shim

    bridge_te_shim.install()
    bridge_te_shim.bridge_peft_without_te()
    from nemo_lpo.bridge.cpu_compat import apply_bridge_cpu_compat
    from tests.dist.scenarios import run_scenarios

    apply_bridge_cpu_compat()
    run_scenarios(run)


if __name__ == "__main__":
    sys.exit(main())
