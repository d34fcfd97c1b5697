"""torchrun worker: load converted checkpoints at TP/EP > 1, compare logits with HF, re-save at that layout.

Usage: convert_parity.py --scenario NAME,HF_DIR,CKPT_DIR,TP,PP,EP,SAVE_DIR [--scenario ...]
Scenarios run in turn in one launch (megatron's groups are rebuilt for each layout). Rank 0 prints
``RESULT {"scenario": NAME, "maxdiff": ...}`` per scenario (``maxdiff`` is None at PP > 1: each stage
holds only its layers, so only loading and re-saving are checked there); each checkpoint is then saved
again with megatron's own ``dist_checkpointing.save`` at that layout into SAVE_DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def run_scenario(name: str, hf: str, ckpt: str, tp: int, pp: int, ep: int, save_to: str) -> None:
    """Load ``ckpt`` at tp/pp/ep, print the logit difference to HF, save it again at this layout."""
    from megatron.core import dist_checkpointing

    from nemo_lpo.convert.verify import hf_logits, load_megatron_model, megatron_logits
    from nemo_lpo.model.parallel import initialize_parallel

    initialize_parallel(tp=tp, pp=pp, ep=ep)
    rank = torch.distributed.get_rank()
    model, preset = load_megatron_model(ckpt)
    tokens = torch.randint(0, preset.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = megatron_logits(model, tokens) if pp == 1 else None
    if rank == 0:
        diff = None if ours is None else (ours - hf_logits(hf, tokens)).abs().max().item()
        print("RESULT " + json.dumps({"scenario": name, "maxdiff": diff, "tp": tp, "pp": pp, "ep": ep}), flush=True)
        Path(save_to).mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), save_to)
    torch.distributed.barrier()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenario", action="append", required=True)
    args = parser.parse_args()

    from nemo_lpo.model.parallel import destroy_parallel

    for spec in args.scenario:
        name, hf, ckpt, tp, pp, ep, save_to = spec.split(",")
        run_scenario(name, hf, ckpt, int(tp), int(pp), int(ep), save_to)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
