"""torchrun worker: nemo-lpo's trainer vs the Megatron-Bridge forward step (``nemo_lpo.bridge.task.LPOTask``).

Usage: bridge_parity.py WORK_DIR PREFIX SCENARIO [SCENARIO ...]   (scenarios: single, dp2, pp2, ep2)
For each scenario, on the same packed lists with a precomputed reference and the same starting weights
(WORK_DIR/init, a dist checkpoint written by the first launch that finds it missing, with the reference
sidecar beside a copy of the dataset under WORK_DIR/data):

- trainer: ``nemo_lpo.train.loop.Trainer`` for ``STEPS`` steps (its per-list scaling, megatron's averaging);
- bridge: the same model / optimizer / data feeder, but megatron-core's ``get_forward_backward_func`` runs
  ``LPOTask`` with ``calculate_per_token_loss=True``, DDP summing instead of averaging, and megatron's own
  ``finalize_model_grads`` dividing by the all-reduced valid-list count (what Megatron-Bridge's train step does);
  the loss is reduced from the ``[sum, count]`` pairs as Megatron-Bridge reduces them.

Each path's gradients are captured just before each optimizer step (param.main_grad, this rank's shard).
Rank 0 prints one ``RESULT {json}`` line per scenario: both paths' losses and grad norms per step, and the
largest |gradient difference| and |gradient| over all parameters of all ranks.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

STEPS = 3
COMMON = ["optim.lr=1e-3", "optim.warmup_steps=0", "optim.clip_grad=1.0", "data.global_batch_size=4",
          "data.micro_batch_size=1", "data.shuffle=true", "reference.mode=precomputed",
          "checkpoint.save_at_end=false", "checkpoint.resume=false", "logging.tensorboard=false",
          f"train.max_steps={STEPS}"]
SCENARIOS = {"single": [], "dp2": [], "pp2": ["parallel.pp=2"], "ep2": ["parallel.ep=2"]}


def grads_of(ddps) -> dict:
    """This rank's gradient of every parameter (the DDP grad buffer megatron's optimizer steps from)."""
    return {f"{i}.{name}": param.main_grad.detach().float().clone()
            for i, ddp in enumerate(ddps) for name, param in ddp.module.named_parameters()}


def prepare(work: Path, prefix: str, cfg_for) -> str:
    """The init weights and the dataset copy with its reference sidecar (written once, by the first launch)."""
    import torch

    from nemo_lpo.train.checkpoint import save_model_weights
    from nemo_lpo.train.loop import init_parallel
    from nemo_lpo.train.lpo_model import LPOModel
    from nemo_lpo.train.reference import write_reference

    data = work / "data" / Path(prefix).name
    if (work / "init" / "metadata.json").exists():
        return str(data)
    cfg = cfg_for("single", str(data))
    init_parallel(cfg)
    seeded = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=None))
    save_model_weights(LPOModel(seeded, train=False).module, work / "init")
    if torch.distributed.get_rank() == 0:
        data.parent.mkdir(parents=True, exist_ok=True)
        for f in Path(prefix).parent.glob(Path(prefix).name + "*"):
            shutil.copy(f, data.parent / f.name)
    torch.distributed.barrier()
    write_reference(cfg)
    return str(data)


def run_trainer(cfg) -> tuple[list[dict], list[dict]]:
    """(metrics lines, gradients before each step) of nemo-lpo's own trainer."""
    from nemo_lpo.train.loop import Trainer

    trainer = Trainer(cfg)
    trainer.resume()
    grads, step = [], trainer.optimizer.step

    def capture_then_step():
        grads.append(grads_of(trainer.lpo.models))
        return step()

    trainer.optimizer.step = capture_then_step
    trainer.run()
    lines = [json.loads(line) for line in (Path(cfg.logging.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return lines, grads


def run_bridge_task(cfg) -> tuple[list[dict], list[dict]]:
    """(per-step loss and grad norm, gradients before each step) of LPOTask under megatron's per-count path."""
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_lpo.bridge.task import LPOTask
    from nemo_lpo.train.feeder import BatchFeeder
    from nemo_lpo.train.lpo_model import LPOModel
    from nemo_lpo.train.optimizer import build_optimizer

    lpo = LPOModel(cfg, train=False)  # this stage's module with the init weights; no DDP, no reference
    config = lpo.config
    config.calculate_per_token_loss = True  # read by DDP at construction and by the schedule
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, check_for_nan_in_grad=False)
    ddps = [DistributedDataParallel(config, ddp_config, module) for module in lpo.modules]
    config.no_sync_func = ddps[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    optimizer, scheduler = build_optimizer(cfg, ddps[0], STEPS)
    feeder = BatchFeeder(cfg, lpo.layout, dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
                         device=torch.device("cpu"))
    task = LPOTask(loss_type=cfg.loss.type, beta=cfg.loss.beta, length_average=cfg.loss.length_average,
                   options=cfg.loss.options, layout=lpo.layout)
    lines, grads = [], []
    for step in range(1, STEPS + 1):
        microbatches = feeder.next_global_batch()
        for ddp in ddps:
            ddp.zero_grad_buffer()
        optimizer.zero_grad()
        first = microbatches[0]["tokens"]
        outputs = get_forward_backward_func()(
            forward_step_func=task, data_iterator=iter(microbatches), model=ddps,
            num_microbatches=len(microbatches), seq_length=first.shape[1], micro_batch_size=first.shape[0],
            forward_only=False)
        grads.append(grads_of(ddps))
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        # Megatron-Bridge's reduction: per key, sum the [sum, count] pairs over micro-batches and data-parallel
        # ranks, then divide; only last-stage ranks hold them, so a world all-reduce counts each replica once
        pair = torch.zeros(2, dtype=torch.float64)
        for out in outputs or []:
            pair += out["loss"].double()
        torch.distributed.all_reduce(pair)
        lines.append({"step": step, "loss": (pair[0] / pair[1]).item(), "grad_norm": float(grad_norm)})
    return lines, grads


def grad_difference(a: list[dict], b: list[dict]) -> tuple[list[float], list[float]]:
    """Per step: largest |a - b| and largest |a| over every parameter of every rank."""
    import torch

    diffs, scales = [], []
    for step_a, step_b in zip(a, b, strict=True):
        assert step_a.keys() == step_b.keys(), sorted(step_a.keys() ^ step_b.keys())
        stats = torch.tensor([max((step_a[k] - step_b[k]).abs().max().item() for k in step_a),
                              max(step_a[k].abs().max().item() for k in step_a)])
        torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
        diffs.append(stats[0].item())
        scales.append(stats[1].item())
    return diffs, scales


def run(work: Path, prefix: str, name: str) -> None:
    import torch
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from nemo_lpo.config import load_config
    from nemo_lpo.train.loop import init_parallel

    conf = Path(__file__).resolve().parents[2] / "conf" / "tiny_cpu.yaml"

    def cfg_for(scenario: str, data: str, run_dir: Path | None = None):
        return load_config(conf, [*COMMON, f"data.train_prefix={data}", f"model.init_checkpoint={work / 'init'}",
                                  f"logging.run_dir={run_dir or work / scenario}", *SCENARIOS[scenario]])

    data = prepare(work, prefix, cfg_for)
    results = {}
    for path in ("trainer", "bridge"):
        destroy_moe_metrics_tracker()  # megatron's process-global MoE tracker, sized by the first model
        cfg = cfg_for(name, data, work / f"{name}_{path}")
        init_parallel(cfg)
        results[path] = (run_trainer if path == "trainer" else run_bridge_task)(cfg)
    diffs, scales = grad_difference(results["bridge"][1], results["trainer"][1])
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"scenario": name, "trainer": results["trainer"][0],
                                      "bridge": results["bridge"][0], "grad_diff": diffs, "grad_max": scales}),
              flush=True)


if __name__ == "__main__":
    from tests.dist.scenarios import run_scenarios

    run_scenarios(run)
