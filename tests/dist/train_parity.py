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
vs shared_noaux). ``init`` only writes WORK_DIR/init (for other tests' runs).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import traceback
from pathlib import Path

STEPS = 3
COMMON = ["optim.lr=1e-3", "optim.warmup_steps=0", "optim.clip_grad=1.0", "data.global_batch_size=4",
          "data.micro_batch_size=1", "data.shuffle=true", "reference.mode=online", "checkpoint.save_at_end=false",
          "checkpoint.resume=false", "logging.tensorboard=false", f"train.max_steps={STEPS}"]
SCENARIOS = {
    "base": [],
    "base_noaux": ["model.moe_aux_loss_coeff=0.0"],
    "mb4_noaux": ["model.moe_aux_loss_coeff=0.0", "data.micro_batch_size=4"],
    "precomputed": ["reference.mode=precomputed"],
    "recompute": ["model.recompute=full"],
    "shared_noaux": ["model.moe_aux_loss_coeff=0.0", "data.shared_prompt=true"],
    "bf16": ["model.params_dtype=bf16"],
    "tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2": ["parallel.pp=2"],
    "ep2": ["parallel.ep=2", "model.moe_token_dispatcher=alltoall"],
    "dp2": ["parallel.distributed_optimizer=true"],
    "pp2_shared_noaux": ["parallel.pp=2", "model.moe_aux_loss_coeff=0.0", "data.shared_prompt=true"],
    "init": [],
}


def run(work: Path, prefix: str, name: str) -> None:
    import torch

    from nemo_lpo.config import load_config
    from nemo_lpo.train.checkpoint import save_model_weights
    from nemo_lpo.train.loop import Trainer, init_parallel

    init = work / "init"
    overrides = [*COMMON, f"data.train_prefix={prefix}", f"logging.run_dir={work / name}",
                 f"model.init_checkpoint={init}", *SCENARIOS[name]]
    if name == "precomputed":
        sidecar_prefix = work / "precomputed" / "data" / Path(prefix).name
        if torch.distributed.get_rank() == 0:
            sidecar_prefix.parent.mkdir(parents=True, exist_ok=True)
            for f in Path(prefix).parent.glob(Path(prefix).name + "*"):
                shutil.copy(f, sidecar_prefix.parent / f.name)
        torch.distributed.barrier()
        overrides.append(f"data.train_prefix={sidecar_prefix}")
    cfg = load_config(Path(__file__).resolve().parents[2] / "conf" / "tiny_cpu.yaml", overrides)
    init_parallel(cfg)
    if not (init / "metadata.json").exists():
        from nemo_lpo.train.lpo_model import LPOModel

        seeded = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=None))
        save_model_weights(LPOModel(seeded, train=False).module, init)
    if name == "init":
        return
    if name == "precomputed":
        from nemo_lpo.train.reference import write_reference

        write_reference(cfg)
    trainer = Trainer(cfg)
    trainer.resume()  # checkpoint.resume=false: starts at step 0 and clears an old metrics file
    trainer.run()
    if torch.distributed.get_rank() == 0:
        lines = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        print("RESULT " + json.dumps({"scenario": name, "lines": lines}), flush=True)


def main() -> None:
    from nemo_lpo.model.parallel import destroy_parallel

    work, prefix, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    try:
        for name in names:
            try:
                run(work, prefix, name)
            except Exception:  # report and go on: the other scenarios still give their numbers
                import torch

                if torch.distributed.get_rank() == 0:
                    print("RESULT " + json.dumps({"scenario": name, "error": traceback.format_exc()}), flush=True)
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
