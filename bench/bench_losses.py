"""Forward+backward time of lpo vs dpo_pw vs dpo over [B, K] sequence log-probs, measured side by side.

For each K the three losses run interleaved in every repeat round (the order rotates), so machine noise
hits all of them alike; the table shows medians and the ratios lpo/dpo_pw and lpo/dpo. ``dpo`` runs on
the K = 2 Zephyr pruning of the same lists ([B, 2]: the best response vs one random other), as the
paper's DPO baseline does. This times only the loss (the model's forward/backward dominates training).

    .venv/bin/python bench/bench_losses.py [--batch 64] [--ks 2 4 8 16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nemo_lpo.losses import listwise_loss


def make_lists(batch: int, k: int, device: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Full lists of k responses: UltraFeedback-like rewards in [1, 10], summed log-probs around -200."""
    rewards = (1 + 9 * torch.rand(batch, k, generator=gen)).round(decimals=1)
    reference = -200 + 20 * torch.randn(batch, k, generator=gen)
    policy = reference + torch.randn(batch, k, generator=gen)
    mask = torch.ones(batch, k, dtype=torch.bool)
    return {name: t.to(device) for name, t in
            {"policy": policy, "reference": reference, "rewards": rewards, "mask": mask}.items()}


def zephyr_pairs(lists: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """[B, 2] pairs: the best response (slot 0 of the pair) vs one uniformly random other response."""
    rewards = lists["rewards"].cpu()
    batch, k = rewards.shape
    best = rewards.argmax(dim=1)
    other = (best + 1 + torch.randint(0, k - 1, (batch,), generator=gen)) % k
    index = torch.stack([best, other], dim=1).to(lists["policy"].device)
    return {name: t.gather(1, index) for name, t in lists.items()}


def time_once(loss_type: str, inputs: dict[str, torch.Tensor], device: str) -> float:
    """Seconds for one forward (listwise_loss) + backward (sum of per-list losses)."""
    policy = inputs["policy"].detach().requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loss, _ = listwise_loss(loss_type, policy, inputs["reference"], inputs["rewards"], inputs["mask"], 0.1)
    loss.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(batch: int, ks: list[int], warmup: int, repeats: int, device: str, seed: int) -> list[dict]:
    """Median forward+backward seconds of each loss per K (interleaved rounds, rotating order)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for k in ks:
        lists = make_lists(batch, k, device, gen)
        cases = {"lpo": lists, "dpo_pw": lists, "dpo": zephyr_pairs(lists, gen) if k > 2 else lists}
        names = list(cases)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(warmup + repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                elapsed = time_once(name, cases[name], device)
                if round_index >= warmup:
                    times[name].append(elapsed)
        rows.append({"K": k, **{name: statistics.median(values) for name, values in times.items()}})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"listwise loss forward+backward, B={args.batch}, float32, {where}, torch {torch.__version__}; "
          f"median of {args.repeats} interleaved repeats after {args.warmup} warm-up rounds")
    print("dpo runs on the K=2 Zephyr pruning of the same lists ([B, 2]: best vs one random other); "
          "lpo and dpo_pw on the full [B, K] lists")
    rows = bench(args.batch, args.ks, args.warmup, args.repeats, args.device, args.seed)
    header = f"{'K':>3} | {'lpo ms':>9} | {'dpo_pw ms':>9} | {'dpo[B,2] ms':>11} | {'lpo/dpo_pw':>10} | {'lpo/dpo':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['K']:>3} | {row['lpo'] * 1e3:>9.3f} | {row['dpo_pw'] * 1e3:>9.3f} | {row['dpo'] * 1e3:>11.3f} | "
              f"{row['lpo'] / row['dpo_pw']:>10.2f} | {row['lpo'] / row['dpo']:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
