"""``nemo-lpo eval CKPT DATA``: held-out ranking metrics of a checkpoint as JSON and a table (cheap to import)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    """Add the ``eval`` command."""
    p = subparsers.add_parser(
        "eval", help="ranking metrics of a checkpoint on a packed dataset (accuracy, Kendall τ, NDCG, log-lik)",
        description="Run the policy (and its reference) over a packed listwise dataset and report pairwise "
                    "accuracy, Kendall τ and NDCG@K of the implicit reward β(log π − log μ) against the annotated "
                    "rewards, the same for log π alone, and the mean log-likelihood of the best and worst response.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CKPT", help="policy dist checkpoint (a run's checkpoints/ folder or step_*)")
    p.add_argument("data", metavar="DATA", help="packed dataset prefix (nemo-lpo pack --output-prefix)")
    p.add_argument("--reference", help="reference checkpoint, or 'sidecar' for the dataset's stored log-probs "
                                       "(default: the run's reference, then the sidecar)")
    p.add_argument("--beta", type=float, help="β of the implicit reward (default: the run's loss.beta)")
    p.add_argument("--preset", help="model preset name or from_checkpoint (default: the run's model.preset, else "
                                    "from_checkpoint for a converted checkpoint, else tiny-mixtral)")
    p.add_argument("--micro-batch-size", type=int, default=8, help="lists per forward pass")
    p.add_argument("--ndcg-k", type=int, help="NDCG cutoff (default: the whole list)")
    p.add_argument("--json", metavar="PATH", help="also write the metrics to this JSON file")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    """Run ``nemo-lpo eval``: prints the JSON line, then the table.

    Returns 2 when CKPT / DATA / --reference is not what it should be (the start-up check) and where a GPU machine would fall back to the CPU (``check_cuda_or_cpu_allowed``).
    """
    import json

    from rich.console import Console

    from nemo_lpo.config import ConfigError
    from nemo_lpo.evaluate.run import SIDECAR, evaluate_checkpoint, metrics_table, to_jsonable
    from nemo_lpo.model.parallel import CPUFallbackRefused, check_cuda_or_cpu_allowed
    from nemo_lpo.train.preflight import check_dist_checkpoint, check_packed_dataset

    try:  # the start-up check: one line, exit 2, before a model is built; the device first, as train / ref-logps
        check_cuda_or_cpu_allowed()
        check_dist_checkpoint(args.checkpoint, "CKPT")
        check_packed_dataset(args.data, "DATA")
        if args.reference not in (None, SIDECAR):
            check_dist_checkpoint(args.reference, "--reference")
    except ConfigError as err:
        print(f"nemo-lpo eval: {err}", file=sys.stderr)
        return 2
    except CPUFallbackRefused as err:  # a GPU machine whose CUDA does not work: one line, as train / ref-logps
        print(f"nemo-lpo eval: error: {err}", file=sys.stderr)
        return 2
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, reference=args.reference, beta=args.beta,
                                     preset=args.preset, micro_batch_size=args.micro_batch_size, ndcg_k=args.ndcg_k)
    except (FileNotFoundError, ValueError) as err:
        print(f"nemo-lpo eval: {err}", file=sys.stderr)
        return 1
    payload = to_jsonable(result)
    text = json.dumps(payload, indent=2)
    if args.json:
        from pathlib import Path

        from nemo_lpo.io import atomic_write

        atomic_write(Path(args.json), text + "\n")
    print(text)
    Console(stderr=False).print(metrics_table({"policy": result}, title=f"{args.data} (β = {result['beta']})"))
    return 0
