"""torchrun worker (Megatron-Bridge test environment): LoRA / DoRA LPO runs of the tiny Mixtral in ONE launch.

Usage: peft_train.py WORK_DIR PREFIX SCENARIO [SCENARIO ...]
Installs the test-only TE import shim (Bridge's ``peft/lora_layers.py`` imports Transformer Engine at its top),
writes WORK_DIR/init (the seeded base weights, the runs' ``model.init_checkpoint``) when missing, and prints
one ``RESULT {json}`` line per scenario from rank 0. Scenarios: lora (reference.mode=base, 3 steps, checkpoint
at step 2 and 3; records whether the base weights stayed bitwise and the adapters moved), sidecar (the
base's reference pass into a copy of the dataset, then the same LoRA run on reference.mode=precomputed),
resume (lora's step-2 checkpoint resumed for step 3), dora (reference.mode=base, 3 steps), export (lora's
final checkpoint through ``convert mcore-to-hf``: merged weights and the HF PEFT adapters; logits of both
through transformers / peft against the adapter model's own), wrong_base (resume onto another base: refused),
eval (lora's adapter checkpoint scored by nemo-lpo eval, against its merged weights and the base; last in its
launch), adapters0 (saves the 1-process adapter init), p_single / p_tp2 (TP2 + SP, expert TP 2) / p_pp2 / p_ep2 (3 steps from
that init), dora_tp2 (expert DoRA at expert TP 2: refused at start-up).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from tests.dist import bridge_te_shim
from tests.dist.train_common import seed_resume

bridge_te_shim.install()
bridge_te_shim.bridge_peft_without_te()

STEPS = 3
COMMON = ["optim.lr=1e-2", "optim.warmup_steps=0", "optim.clip_grad=1.0", "data.global_batch_size=4",
          "data.micro_batch_size=2", "data.shuffle=true", "checkpoint.save_at_end=true", "checkpoint.save_interval=2",
          "checkpoint.resume=false", "logging.tensorboard=false", f"train.max_steps={STEPS}",
          "peft.type=lora", "peft.dim=4", "peft.alpha=8", "reference.mode=base"]
SCENARIOS = {
    "lora": [],
    "sidecar": ["reference.mode=precomputed"],
    "resume": ["checkpoint.resume=true"],
    "dora": ["peft.type=dora"],
    "wrong_base": ["checkpoint.resume=true"],
    # parallel parity from one adapter init (WORK_DIR/adapters0, written by ``adapters0`` in a 1-process launch)
    "p_single": ["checkpoint.save_at_end=false", "checkpoint.save_interval=0"],
    "p_tp2": ["checkpoint.save_at_end=false", "checkpoint.save_interval=0", "parallel.tp=2",
              "parallel.sequence_parallel=true"],
    "dora_tp2": ["checkpoint.save_at_end=false", "checkpoint.save_interval=0", "parallel.tp=2",
                   "parallel.sequence_parallel=true", "peft.type=dora"],
    "p_pp2": ["checkpoint.save_at_end=false", "checkpoint.save_interval=0", "parallel.pp=2"],
    "p_ep2": ["checkpoint.save_at_end=false", "checkpoint.save_interval=0", "parallel.ep=2",
              "model.moe_token_dispatcher=alltoall"],
    # adapters on attention only (transformers fuses Mixtral's experts, which peft cannot target): PEFT export
    "lora_attn": ["peft.target_modules=[linear_qkv,linear_proj]", "train.max_steps=2", "checkpoint.save_interval=0"],
}
REPO = Path(__file__).resolve().parents[2]


def _config(work: Path, prefix: str, name: str, extra: list[str] = ()):
    from nemo_lpo.config import load_config

    init = work / ("init_other" if name == "wrong_base" else "init")
    overrides = [*COMMON, f"data.train_prefix={prefix}", f"logging.run_dir={work / name}",
                 f"model.init_checkpoint={init}", *SCENARIOS.get(name, []), *extra]
    return load_config(REPO / "conf" / "tiny_cpu.yaml", overrides)


def _write_init(cfg, path: Path, seed: int) -> None:
    from nemo_lpo.train.checkpoint import save_model_weights
    from nemo_lpo.train.lpo_model import LPOModel

    if (path / "metadata.json").exists():
        return
    seeded = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=None),
                                 peft=dataclasses.replace(cfg.peft, type="none"), reference=cfg.reference.__class__(),
                                 train=dataclasses.replace(cfg.train, seed=seed))
    module = LPOModel(seeded, train=False).module
    if seed != cfg.train.seed:  # another base: the same architecture, the embedding scaled
        module.embedding.word_embeddings.weight.data.mul_(1.01)
    save_model_weights(module, path)


def _copy_dataset(prefix: str, dest: Path) -> str:
    import torch

    if torch.distributed.get_rank() == 0:
        dest.mkdir(parents=True, exist_ok=True)
        for f in Path(prefix).parent.glob(Path(prefix).name + "*"):
            shutil.copy(f, dest / f.name)
    torch.distributed.barrier()
    return str(dest / Path(prefix).name)


def _adapter_request(trainer) -> dict:
    from nemo_lpo.train.adapters import adapter_sharded_state
    from nemo_lpo.train.checkpoint import model_sharded_state_dict

    return adapter_sharded_state(trainer.lpo.peft, model_sharded_state_dict(trainer.lpo.module))


def _load_adapters(trainer, path: Path) -> None:
    from megatron.core import dist_checkpointing

    from nemo_lpo.train.adapters import load_adapter_state

    request = _adapter_request(trainer)
    loaded = dist_checkpointing.load(request, str(path))
    load_adapter_state(trainer.lpo.module, {k: v for k, v in loaded.items() if k in request})


def _save_adapters0(work: Path, prefix: str) -> dict:
    """The 1-process adapter init every parity layout starts from (the adapters of a fresh lora Trainer)."""
    from megatron.core import dist_checkpointing

    from nemo_lpo.train.loop import Trainer, init_parallel

    cfg = _config(work, prefix, "p_single")
    init_parallel(cfg)
    _write_init(cfg, work / "init", seed=cfg.train.seed)
    trainer = Trainer(cfg)
    (work / "adapters0").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_adapter_request(trainer), str(work / "adapters0"))
    return {"saved": True}


def _weights(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.lpo.modules[0].named_parameters()}


def _train(work: Path, prefix: str, name: str) -> dict:
    from nemo_lpo.train.loop import Trainer, init_parallel

    cfg = _config(work, prefix, name)
    init_parallel(cfg)
    if name == "sidecar":  # the base's reference pass writes its sidecar beside a copy of the dataset
        cfg = _config(work, _copy_dataset(prefix, work / name / "data"), name)
    _write_init(cfg, work / "init", seed=cfg.train.seed)
    if name == "wrong_base":
        _write_init(cfg, work / "init_other", seed=cfg.train.seed + 1)
    if name in ("resume", "wrong_base"):
        seed_resume(work, name, work / "lora" / "checkpoints" / "step_0000002")
    if name == "sidecar":
        from nemo_lpo.train.reference import write_reference

        write_reference(cfg)
    trainer = Trainer(cfg)
    if name.startswith("p_"):  # one adapter init for every layout, as the full-parameter parity's init checkpoint
        _load_adapters(trainer, work / "adapters0")
    try:
        trainer.resume()
    except ValueError as err:
        return {"refused": str(err)}
    before = _weights(trainer)
    trainer.run()
    after = _weights(trainer)
    trainable = {n for n, p in trainer.lpo.modules[0].named_parameters() if p.requires_grad}
    lines = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    return {"lines": lines, "trainable": sorted(trainable),
            "base_unchanged": all(bool((before[n] == after[n]).all()) for n in before if n not in trainable),
            "adapters_changed": sorted(n for n in trainable if not bool((before[n] == after[n]).all())),
            "optimizer_params": sum(len(g["params"]) for g in trainer.optimizer.param_groups),
            "saved": sorted(p.name for p in (work / name / "checkpoints").glob("step_*")),
            **_checkpoint_contents(work / name / "checkpoints" / "step_0000002")}


def _checkpoint_contents(path: Path) -> dict:
    """The tensor keys and the base pointer an adapter checkpoint holds."""
    from megatron.core import dist_checkpointing

    if not path.is_dir():
        return {}
    return {"checkpoint_keys": sorted(dist_checkpointing.load_tensors_metadata(str(path))),
            "checkpoint_peft": dist_checkpointing.load_common_state_dict(str(path)).get("peft")}


def run(work: Path, prefix: str, name: str) -> None:
    import torch
    from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker

    destroy_moe_metrics_tracker()
    if name == "adapters0":
        result = _save_adapters0(work, prefix)
    elif name == "export":
        from tests.dist.peft_export import export_and_compare

        def train_attention_only() -> Path:
            _train(work, prefix, "lora_attn")
            return work / "lora_attn"

        result = export_and_compare(work, _config(work, prefix, "lora"), train_attention_only)
    elif name == "eval":  # the lora run's adapter checkpoint through nemo-lpo eval (tests/dist/peft_eval.py)
        from tests.dist.peft_eval import eval_and_compare

        result = eval_and_compare(work, prefix)
    else:
        result = _train(work, prefix, name)
    if torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"scenario": name, **result}), flush=True)


if __name__ == "__main__":
    from tests.dist.scenarios import run_scenarios

    run_scenarios(run)
