"""torchrun worker: train the tiny Mixtral for a few steps under several layouts in ONE launch.

Usage: train_parity.py WORK_DIR PREFIX SCENARIO [SCENARIO ...]
Each scenario re-initialises megatron's model-parallel groups (the process group stays), builds the model
from WORK_DIR/init (a dist checkpoint of the seed-initialised weights, written by the first scenario that
finds it missing), trains ``STEPS`` steps and prints one ``RESULT {json}`` line from rank 0 with every
step's metrics. Scenarios: base (online reference, 4 micro-batches x 1 list), base_noaux / mb4_noaux (4x1 vs
1x4 without the MoE aux loss, which megatron defines per micro-batch), precomputed (ref-logps pass, then the
sidecar), recompute (full activation recompute), shared_noaux (shared-prompt packing, vs
base_noaux), bf16 (bf16 params, fp32 main weights), tp2 (+SP), pp2,
ep2 (alltoall), dp2 (+ distributed optimizer), pp2_shared_noaux (shared-prompt rows through the 1F1B pipeline,
vs shared_noaux); base4 (a 4-layer tiny Mixtral, 6 steps, checkpoint at step 3; its own WORK_DIR/init4),
pp2_vpp2 (PP2 x virtual pipeline 2, vs base4's first 3 steps), pp2_vpp2_precomputed (its ref-logps pass and
training on the sidecar, vs base4), pp2_vpp2_resume (base4's step-3 checkpoint
resumed at PP2 x VPP2, vs base4's steps 4-6; it saves step 5), pp2_from_vpp2 (that step-5 checkpoint resumed at
PP2 without VPP, vs base4's step 6); 4 processes: tp2_pp2 (TP2+SP x PP2, vs base), tp2_pp2_vpp2 (TP2+SP x PP2 x VPP2) and dp2_pp2_vpp2 (DP2 +
distributed optimizer x PP2 x VPP2), vs base4's first 3 steps; base8 (an 8-layer variant, 1 process) and
pp4_vpp2 (PP4 x VPP2 on it, 4 processes); val / pp2_val (validation every 2 steps on the
first 6 lists, 1 process / PP2); ep2_pp2 and tp2_ep2 (TP2+SP x EP2) vs base, ep2_pp2_vpp2 vs base4,
ep2_pp2_resume (base4's step-3 checkpoint at EP2 x PP2, saves step 5) and base4_from_ep2_pp2 (that checkpoint
back at 1 process); dp2_overlap (2 processes: distributed optimizer, overlapped grad reduce and param gather;
saves step 2) and base_from_dp2_overlap (that checkpoint resumed by 1 process for step 3); tp2_resume, pp2_resume,
ep2_resume, dp2_resume (base4's step-3 checkpoint at 2 processes, steps 4-6; pp2 and dp2 save step 5) and
base4_from_pp2 / base4_from_dp2 (those back at 1 process for step 6); tp2_swapped_shards (a PLANTED fault: tp2's
step 1 with two TP shards of a gradient swapped, which the checksums must see); dp2_misplaced_slice (PLANTED:
dp2's step 1 with one distributed-optimizer gradient slice shifted within its parameter). A resume scenario
needs the process group: launch it after another scenario (``init`` will do).
``init`` only writes WORK_DIR/init (for other tests' runs). With the metrics lines, the RESULT holds each step's
per-parameter gradient checksums (``grad_checksums.py``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from tests.dist.train_common import seed_resume

STEPS = 3
TINY4 = "tiny-mixtral-4layers"
TINY8 = "tiny-mixtral-8layers"
COMMON = ["optim.lr=1e-3", "optim.warmup_steps=0", "optim.clip_grad=1.0", "data.global_batch_size=4",
          "data.micro_batch_size=1", "data.shuffle=true", "reference.mode=online", "checkpoint.save_at_end=false",
          "checkpoint.resume=false", "logging.tensorboard=false", f"train.max_steps={STEPS}"]
EP2 = ["parallel.ep=2", "model.moe_token_dispatcher=alltoall"]
SCENARIOS = {
    "base": [],
    "base_noaux": ["model.moe_aux_loss_coeff=0.0"],
    "mb4_noaux": ["model.moe_aux_loss_coeff=0.0", "data.micro_batch_size=4"],
    "precomputed": ["reference.mode=precomputed"],
    "recompute": ["model.recompute=full"],
    "shared_noaux": ["model.moe_aux_loss_coeff=0.0", "data.shared_prompt=true"],
    "bf16": ["model.params_dtype=bf16"],
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    # a PLANTED fault: tp2 for one step with the two ranks' shards of one column-parallel weight's gradient
    # swapped before the checksums (plant_swapped_tp_shards); its comparison with base must fail on <r, g>
    "tp2_swapped_shards": ["parallel.tp=2", "parallel.sequence_parallel=true", "train.max_steps=1",
                           f"optim.decay_steps={STEPS}"],
    # a PLANTED fault: dp2 (distributed optimizer) for one step with one owned gradient slice put back shifted
    # (plant_misplaced_optimizer_slice); its comparison with base must fail on <r, g>
    "dp2_misplaced_slice": ["parallel.distributed_optimizer=true", "train.max_steps=1", f"optim.decay_steps={STEPS}"],
    "pp2": ["parallel.pp=2"],
    "ep2": EP2,
    "dp2": ["parallel.distributed_optimizer=true"],
    "pp2_shared_noaux": ["parallel.pp=2", "model.moe_aux_loss_coeff=0.0", "data.shared_prompt=true"],
    "init": [],
    # validation during training (the training lists as validation set, the first 6, online reference), and
    # the same under PP2: only the last stage computes log-probs, every rank must log the same val/ numbers
    "val": ["train.eval_interval=2", "train.eval_lists=6"],
    "pp2_val": ["parallel.pp=2", "train.eval_interval=2", "train.eval_lists=6"],
    # virtual pipeline: a 4-layer variant of the tiny preset (PP2 x VPP2 = one layer per chunk), its own init
    # weights; the lr schedule is fixed at 6 steps so that the 3-step and the 6-step runs share it; unrounded
    # lengths, so that micro-batches differ in length (the VPP runs pad them to the step's longest)
    "base4": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", f"train.max_steps={2 * STEPS}", f"optim.decay_steps={2 * STEPS}",
              f"checkpoint.save_interval={STEPS}"],
    "pp2_vpp2": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", "parallel.pp=2", "parallel.vpp=2", f"optim.decay_steps={2 * STEPS}"],
    # the reference pass (ref-logps) through the interleaved schedule, then training on its sidecar
    "pp2_vpp2_precomputed": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", "parallel.pp=2", "parallel.vpp=2",
                             f"optim.decay_steps={2 * STEPS}", "reference.mode=precomputed"],
    # resume base4's step-3 checkpoint (1 process) at PP2 x VPP2 and train steps 4-6
    "pp2_vpp2_resume": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", "parallel.pp=2", "parallel.vpp=2", f"train.max_steps={2 * STEPS}",
                        f"optim.decay_steps={2 * STEPS}", "checkpoint.resume=true", "checkpoint.save_interval=5"],
    # pipeline depth 4 with virtual pipeline 2: an 8-layer variant (one layer per chunk), its own init weights
    "base8": [f"model.preset={TINY8}", "data.pad_to_multiple_of=1", f"optim.decay_steps={2 * STEPS}"],
    "pp4_vpp2": [f"model.preset={TINY8}", "data.pad_to_multiple_of=1", "parallel.pp=4", "parallel.vpp=2",
                 f"optim.decay_steps={2 * STEPS}"],
    # 4 processes: virtual pipeline with tensor (+ sequence) parallelism, and with data parallelism + the
    # distributed optimizer (2 micro-batches per data-parallel rank, a multiple of pp as interleaving needs)
    "tp2_pp2": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2"],
    "tp2_pp2_vpp2": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", "parallel.tp=2", "parallel.sequence_parallel=true",
                     "parallel.pp=2", "parallel.vpp=2", f"optim.decay_steps={2 * STEPS}"],
    "dp2_pp2_vpp2": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", "parallel.pp=2", "parallel.vpp=2",
                     "parallel.distributed_optimizer=true", f"optim.decay_steps={2 * STEPS}"],
    # and back: pp2_vpp2_resume's step-5 checkpoint (two chunks per rank) resumed at PP2 without VPP for step 6
    "pp2_from_vpp2": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", "parallel.pp=2",
                      f"train.max_steps={2 * STEPS}", f"optim.decay_steps={2 * STEPS}", "checkpoint.resume=true"],
    # 4 processes: the shipped Mixtral layout's kind (experts x pipeline), with and without interleaving, and
    # experts under tensor + sequence parallelism (dp = 2 in each: the experts split the data-parallel ranks)
    "ep2_pp2": [*EP2, "parallel.pp=2"],
    "ep2_pp2_vpp2": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", *EP2, "parallel.pp=2", "parallel.vpp=2",
                     f"optim.decay_steps={2 * STEPS}"],
    # experts not tensor-split (etp 1, as the shipped Mixtral layouts): with etp 2 the alltoall dispatcher
    # all-gathers uneven token counts over TP, which gloo refuses (CPU only; NCCL takes uneven sizes)
    "tp2_ep2": [*EP2, "parallel.tp=2", "parallel.sequence_parallel=true", "parallel.etp=1"],
    # 2 processes: the DP gradient reduce overlapped with backward, the parameter all-gather with the forward
    # (its step-2 checkpoint, saved while the parameter all-gather is deferred, resumed by 1 process: next)
    "dp2_overlap": ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
                    "parallel.overlap_param_gather=true", "checkpoint.save_interval=2"],
    "base_from_dp2_overlap": ["checkpoint.resume=true"],
    # full state across EP2 x PP2: base4's step-3 checkpoint resumed at EP2 x PP2 (4 processes, saves step 5),
    # and that step-5 checkpoint resumed by 1 process for step 6
    "ep2_pp2_resume": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", *EP2, "parallel.pp=2",
                       f"train.max_steps={2 * STEPS}", f"optim.decay_steps={2 * STEPS}", "checkpoint.resume=true",
                       "checkpoint.save_interval=5"],
    # base4's step-3 checkpoint (1 process, plain optimizer) resumed under each 2-process layout for steps 4-6:
    # model AND optimizer state resharded by megatron dist checkpointing (under dp2 the DistributedOptimizer takes
    # Adam's state as its slices); pp2 and dp2 save step 5, resumed by 1 process for step 6 (base4_from_*)
    **{f"{layout}_resume": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", *extra, f"train.max_steps={2 * STEPS}",
                            f"optim.decay_steps={2 * STEPS}", "checkpoint.resume=true", "checkpoint.save_interval=5"]
       for layout, extra in {"tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"], "pp2": ["parallel.pp=2"],
                             "ep2": ["parallel.ep=2"], "dp2": ["parallel.distributed_optimizer=true"]}.items()},
    **{f"base4_from_{layout}": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", f"train.max_steps={2 * STEPS}",
                                f"optim.decay_steps={2 * STEPS}", "checkpoint.resume=true"] for layout in ("pp2", "dp2")},
    "base4_from_ep2_pp2": [f"model.preset={TINY4}", "data.pad_to_multiple_of=1", f"train.max_steps={2 * STEPS}",
                           f"optim.decay_steps={2 * STEPS}", "checkpoint.resume=true"],
}
RESUMES = {"pp2_vpp2_resume": "base4/checkpoints/step_0000003", "pp2_from_vpp2": "pp2_vpp2_resume/checkpoints/step_0000005",
           "ep2_pp2_resume": "base4/checkpoints/step_0000003",
           "base4_from_ep2_pp2": "ep2_pp2_resume/checkpoints/step_0000005",
           "base_from_dp2_overlap": "dp2_overlap/checkpoints/step_0000002",
           **{f"{layout}_resume": "base4/checkpoints/step_0000003" for layout in ("tp2", "pp2", "ep2", "dp2")},
           **{f"base4_from_{layout}": f"{layout}_resume/checkpoints/step_0000005" for layout in ("pp2", "dp2")}}


def register_tiny4() -> None:
    """Add the 4- and 8-layer variants of tiny-mixtral to the presets (no shipped preset has that many layers)."""
    import dataclasses

    from nemo_lpo.model.presets import PRESETS

    PRESETS.setdefault(TINY4, dataclasses.replace(PRESETS["tiny-mixtral"], name=TINY4, num_layers=4))
    PRESETS.setdefault(TINY8, dataclasses.replace(PRESETS["tiny-mixtral"], name=TINY8, num_layers=8))


def plant_swapped_tp_shards(trainer) -> str:
    """Before each optimizer step, swap the TP ranks' gradient shards of the first column-parallel weight.

    Returns that parameter's checksum name. A fault of the kind a wrong sharding offset makes: every element's
    value is still there (Σg, Σg² and Σ|g| of the whole tensor unchanged), in the wrong place.
    """
    import torch
    from megatron.core import parallel_state

    from tests.dist.grad_checksums import checksum_names

    param = next(p for p in trainer.lpo.modules[0].parameters()
                 if getattr(p, "tensor_model_parallel", False) and p.partition_dim == 0)
    group = parallel_state.get_tensor_model_parallel_group()
    step = trainer.optimizer.step

    def swapped_step(*args, **kwargs):
        shards = [torch.empty_like(param.main_grad) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(shards, param.main_grad.contiguous(), group=group)
        param.main_grad.copy_(shards[::-1][torch.distributed.get_rank(group)])
        return step(*args, **kwargs)

    trainer.optimizer.step = swapped_step
    (key,) = checksum_names(trainer.lpo.modules, param)
    return key


def plant_misplaced_optimizer_slice(trainer) -> str | None:
    """Before each optimizer step, data-parallel rank 0 puts its owned slice of one gradient back shifted.

    With the DistributedOptimizer each rank owns a slice of every reduced gradient; the slice of the first
    non-expert weight this rank owns (at least 2 elements) is rolled by half its length: the fault a wrong offset
    in the optimizer's ranges makes, every value still there. Returns that parameter's checksum name on
    data-parallel rank 0 (None elsewhere).
    """
    import torch
    from megatron.core import parallel_state

    from tests.dist.grad_checksums import checksum_names, owned_slice, sub_optimizers

    if parallel_state.get_data_parallel_rank() != 0:
        return None
    optimizers = sub_optimizers(trainer.optimizer)
    param, (start, end) = next(
        (p, owned) for n, p in trainer.lpo.modules[0].named_parameters() if "experts" not in n
        for owned in [next(filter(None, (owned_slice(opt, p) for opt in optimizers)), None)]
        if owned is not None and owned[1] - owned[0] >= 2)
    step = trainer.optimizer.step

    def misplaced_step(*args, **kwargs):
        flat = param.main_grad.view(-1)
        flat[start:end] = torch.roll(flat[start:end].clone(), (end - start) // 2)
        return step(*args, **kwargs)

    trainer.optimizer.step = misplaced_step
    (key,) = checksum_names(trainer.lpo.modules, param)
    return key


def run(work: Path, prefix: str, name: str) -> None:
    import torch
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    from nemo_lpo.config import load_config
    from nemo_lpo.train.checkpoint import save_model_weights
    from nemo_lpo.train.loop import Trainer, init_parallel
    from tests.dist.grad_checksums import record_grad_checksums

    register_tiny4()
    destroy_moe_metrics_tracker()  # megatron's process-global MoE tracker is sized by the first model's depth
    preset = " ".join(SCENARIOS[name])
    init = work / ("init8" if TINY8 in preset else "init4" if TINY4 in preset else "init")
    overrides = [*COMMON, f"data.train_prefix={prefix}", f"logging.run_dir={work / name}",
                 f"model.init_checkpoint={init}", *SCENARIOS[name]]
    if name in ("val", "pp2_val"):
        overrides.append(f"data.valid_prefix={prefix}")
    if name.endswith("precomputed"):
        sidecar_prefix = work / name / "data" / Path(prefix).name
        if torch.distributed.get_rank() == 0:
            sidecar_prefix.parent.mkdir(parents=True, exist_ok=True)
            for f in Path(prefix).parent.glob(Path(prefix).name + "*"):
                shutil.copy(f, sidecar_prefix.parent / f.name)
        torch.distributed.barrier()
        overrides.append(f"data.train_prefix={sidecar_prefix}")
    if name in RESUMES:
        seed_resume(work, name, work / RESUMES[name])
    cfg = load_config(Path(__file__).resolve().parents[2] / "conf" / "tiny_cpu.yaml", overrides)
    init_parallel(cfg)
    if not (init / "metadata.json").exists():
        from nemo_lpo.train.lpo_model import LPOModel

        seeded = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=None))
        save_model_weights(LPOModel(seeded, train=False).module, init)
    if name == "init":
        return
    if name.endswith("precomputed"):
        from nemo_lpo.train.reference import write_reference

        write_reference(cfg)
    trainer = Trainer(cfg)
    trainer.resume()  # checkpoint.resume=false: starts at step 0 and clears an old metrics file
    grads = record_grad_checksums(trainer)
    # a planted fault runs first, then the checksums
    swapped = {"tp2_swapped_shards": plant_swapped_tp_shards,
               "dp2_misplaced_slice": plant_misplaced_optimizer_slice}.get(name, lambda trainer: None)(trainer)
    # forwards of the first layer's core attention (this rank's first chunk): one per micro-batch, two under
    # activation recompute (the checkpointed forward and its re-run in backward)
    attention_forwards = [0]
    gpt = trainer.lpo.modules[0]
    while not hasattr(gpt, "decoder"):  # bf16: inside megatron's Float16Module
        gpt = gpt.module
    gpt.decoder.layers[0].self_attention.core_attention.register_forward_hook(
        lambda module, args, output: attention_forwards.__setitem__(0, attention_forwards[0] + 1))
    trainer.run()
    if torch.distributed.get_rank() == 0:
        lines = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        print("RESULT " + json.dumps({"scenario": name, "lines": lines, "grads": grads,
                                      "attention_forwards": attention_forwards[0], "swapped": swapped,
                                      "microbatches": len(grads) * trainer.feeder.num_microbatches}), flush=True)


if __name__ == "__main__":
    from tests.dist.scenarios import run_scenarios

    run_scenarios(run)
