"""torchrun worker: Megatron-Bridge's own ``finetune`` trains the tiny-Mixtral LPO recipe on CPU (gloo).

Usage: bridge_finetune.py RUN_DIR PREFIX INIT_CHECKPOINT [nemo-lpo key=value ...]
Test-only help: ``bridge_te_shim`` (Megatron-Bridge's unguarded TE / nvrx imports) and nemo-lpo's CPU
compatibility layer; Megatron-Bridge's training loop itself runs unmodified. Megatron-Bridge initialises the
process group (gloo). Rank 0 prints ``RESULT {json}`` with the losses the forward step's loss function returned.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from tests.dist import bridge_te_shim

    bridge_te_shim.install()
    from nemo_lpo.model.cpu_compat import apply_cpu_compat

    apply_cpu_compat()
    import torch
    from megatron.bridge.training.finetune import finetune

    from nemo_lpo.bridge.recipes import recipe

    run_dir, prefix, init, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    overrides = ["reference.mode=precomputed", "train.max_steps=3", "optim.warmup_steps=0", "optim.lr=1e-3",
                 "data.global_batch_size=4", "data.micro_batch_size=1", "logging.tensorboard=false",
                 f"data.train_prefix={prefix}", f"model.init_checkpoint={init}", f"logging.run_dir={run_dir}", *extra]
    container, task = recipe("tiny-cpu", overrides)
    container.dist.distributed_backend = "gloo"
    container.checkpoint.save_interval = None  # only the final save
    losses = []

    def recording(batch_iterator, model):  # records what the loss function returns, then hands it on unchanged
        output, loss_func = task(batch_iterator, model)

        def record(out):
            result = loss_func(out)
            losses.append(result[2]["loss"].tolist())
            return result

        return output, record

    finetune(container, recording)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print("RESULT " + json.dumps({"losses": losses}), flush=True)


if __name__ == "__main__":
    main()
