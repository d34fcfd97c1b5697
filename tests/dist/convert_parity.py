"""torchrun worker: load a converted checkpoint at TP/EP > 1, compare logits with HF, re-save at that layout.

Usage: convert_parity.py --hf DIR --ckpt DIR --tp N --ep N [--save-to DIR]
Rank 0 prints ``MAXDIFF <value>``; exits non-zero when the difference exceeds 1e-5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--save-to", default=None)
    args = parser.parse_args()

    from megatron.core import dist_checkpointing

    from nemo_lpo.convert.verify import hf_logits, load_megatron_model, megatron_logits
    from nemo_lpo.model.parallel import destroy_parallel, initialize_parallel

    initialize_parallel(tp=args.tp, ep=args.ep)
    rank = torch.distributed.get_rank()
    model, preset = load_megatron_model(args.ckpt)
    tokens = torch.randint(0, preset.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ours = megatron_logits(model, tokens)
    status = 0
    if rank == 0:
        diff = (ours - hf_logits(args.hf, tokens)).abs().max().item()
        print(f"MAXDIFF {diff:.3e} tp={args.tp} ep={args.ep}", flush=True)
        status = int(not diff < 1e-5)
    if args.save_to:
        if rank == 0:
            Path(args.save_to).mkdir(parents=True)
        torch.distributed.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), args.save_to)
    destroy_parallel()
    return status


if __name__ == "__main__":
    sys.exit(main())
