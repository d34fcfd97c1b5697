"""Precomputed vs online reference: optimizer-step time and memory, with unpacked and shared-prompt batches.

The trainer's own step (``nemo_lpo.train.step.train_step``: megatron schedule, DDP, Adam) on the tiny
Mixtral of conf/tiny_cpu.yaml, four variants measured interleaved in one run (medians, ratios):

  online       reference.mode=online: a frozen copy of the policy runs forward on every micro-batch
  precomputed  reference.mode=precomputed: the batch carries ref_logps (computed once, as `nemo-lpo ref-logps` does)
  (each with the unpacked padded batches and with shared-prompt rows, ``SharedPromptLayout``)

Memory: the resident model state (parameters, gradient buffers, optimizer state and the reference copy,
counted from the tensors) and the step's extra peak over what was resident (CUDA peak allocated on GPU,
the process's peak RSS on CPU).

    .venv/bin/python bench/bench_reference.py [--reps 3] [--k 4] [--prompt-len 128] [--response-len 48]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAD = 0


def tensor_bytes(tensors) -> int:
    """Bytes held by distinct tensors (storage sizes, shared storages counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def resident_bytes(lpo, optimizer) -> dict[str, int]:
    """Policy parameters + DDP grad buffers, optimizer state, and the reference copy."""
    model = [p for p in lpo.model.parameters()]
    grads = [getattr(p, "main_grad", None) for p in model]
    opt = []
    for opt_ in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt_, "optimizer", opt_)
        for state in inner.state.values():
            opt.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    ref = list(lpo.reference.parameters()) if lpo.reference is not None else []
    return {"policy": tensor_bytes(model) + tensor_bytes(grads), "optimizer": tensor_bytes(opt),
            "reference": tensor_bytes(ref)}


def main() -> int:
    """Build the four variants, time them interleaved, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--response-len", type=int, default=48)
    parser.add_argument("--lists", type=int, default=2, help="lists per micro-batch")
    parser.add_argument("--microbatches", type=int, default=2)
    args = parser.parse_args()

    from bench_utils import (
        interleaved_medians,
        peak_memory_bytes,
        print_table,
        synthetic_items,
        to_device,
    )

    from nemo_lpo.batch.collate import ListwiseCollator
    from nemo_lpo.batch.layouts import PaddedLayout, SharedPromptLayout
    from nemo_lpo.batch.shared_prompt import collate_shared_prompt
    from nemo_lpo.config import load_config
    from nemo_lpo.model.parallel import initialize_parallel
    from nemo_lpo.train.lpo_model import LPOModel
    from nemo_lpo.train.optimizer import build_optimizer
    from nemo_lpo.train.step import train_step

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(1)
    initialize_parallel(seed=1234)
    device = torch.device("cuda") if cuda else torch.device("cpu")
    common = ["optim.lr=1e-5", "optim.warmup_steps=0", "logging.tensorboard=false"]
    cfgs = {mode: load_config(REPO / "conf" / "tiny_cpu.yaml", [*common, f"reference.mode={mode}"])
            for mode in ("online", "precomputed")}
    chunks = [synthetic_items(args.lists, args.k, args.prompt_len, args.response_len, seed=s)
              for s in range(args.microbatches)]
    layouts = {"unpacked": lambda c: ListwiseCollator(PAD)(c), "shared": lambda c: collate_shared_prompt(c, PAD)}

    variants, residents, first = {}, {}, None
    for layout, collate in layouts.items():
        for mode, cfg in cfgs.items():
            lpo = LPOModel(cfg, layout=SharedPromptLayout() if layout == "shared" else PaddedLayout())
            if first is None:
                first = lpo
            else:
                lpo.module.load_state_dict(first.module.state_dict())
                if lpo.reference is not None:
                    lpo.reference.load_state_dict(first.module.state_dict())
            optimizer, scheduler = build_optimizer(cfg, lpo.model, 1000)
            batches = [to_device(collate(c), device) for c in chunks]
            if mode == "precomputed":  # the reference pass, once (what `nemo-lpo ref-logps` stores)
                ref = LPOModel(cfgs["online"], layout=SharedPromptLayout() if layout == "shared" else PaddedLayout())
                ref.reference.load_state_dict(first.module.state_dict())
                ref.attach_online_reference(batches)
                del ref

            def step(lpo=lpo, optimizer=optimizer, scheduler=scheduler, batches=batches, mode=mode):
                if mode == "online":
                    for b in batches:
                        b.pop("ref_logps", None)
                return train_step(lpo, optimizer, scheduler, batches)

            name = f"{layout}/{mode}"
            variants[name] = step
            residents[name] = (lpo, optimizer)

    med = interleaved_medians(variants, reps=args.reps, warmup=1)
    # after the warm-up and timed steps: optimizer state exists, allocations are in steady state
    residents = {name: resident_bytes(*objs) for name, objs in residents.items()}
    peaks = {name: peak_memory_bytes(fn) for name, fn in variants.items()}
    base = med["unpacked/online"]
    rows = []
    for name in variants:
        r = residents[name]
        rows.append([name, 1000 * med[name]["wall"], base["cpu"] / med[name]["cpu"], base["wall"] / med[name]["wall"],
                     r["policy"] / 2**20, r["optimizer"] / 2**20, r["reference"] / 2**20,
                     sum(r.values()) / 2**20, peaks[name] / 2**20])
    print(f"device: {device}; tiny-mixtral (conf/tiny_cpu.yaml), K={args.k}, prompt~{args.prompt_len}, "
          f"response~{args.response_len}, {args.lists} lists x {args.microbatches} micro-batches per step")
    print_table("Optimizer step: online vs precomputed reference (interleaved medians; speed-up vs unpacked/online)",
                ["variant", "step ms (wall)", "speed-up (cpu)", "speed-up (wall)", "policy+grads MiB",
                 "optimizer MiB", "reference MiB", "resident MiB", "step peak extra MiB"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
