"""``nemo-lpo demo`` and ``nemo-lpo reproduce`` (cheap to import: the work is imported inside the commands)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    """Add the ``demo`` and ``reproduce`` commands."""
    from nemo_lpo.demo.config import DemoConfig

    d = DemoConfig()
    p = subparsers.add_parser(
        "demo", help="the embedded default end to end: pack, train a tiny Mixtral with LPO-abs on CPU, evaluate, export",
        description="Packs the embedded listwise dataset (arithmetic and word-editing tasks with graded rewards) "
                    "with the Mistral tokenizer, evaluates a tiny Mixtral on the held-out lists, trains it with "
                    "LPO-abs, evaluates again, plots the run and exports the model to Hugging Face format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=d.out_dir, help="output folder")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--loss", default=d.loss, help="loss (nemo_lpo.losses.LOSSES name)")
    p.add_argument("--beta", type=float, default=d.beta, help="β of the implicit reward")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=d.global_batch_size, help="lists per step")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--train-file", type=Path, default=d.train_file, help="listwise JSONL to train on")
    p.add_argument("--heldout-file", type=Path, default=d.heldout_file, help="listwise JSONL to evaluate on")
    p.add_argument("--no-export", action="store_true", help="skip the HF export")
    p.add_argument("--verbose", action="store_true", help="show the known-harmless megatron / torch warnings too "
                                                         "(as nemo-lpo --verbose)")
    p.set_defaults(func=run_demo_command)

    r = subparsers.add_parser(
        "reproduce", help="the paper's findings in miniature (Figure 1, Figure 2, Table 1) with a markdown report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    r.add_argument("--out", type=Path, default=Path("outputs/reproduce"), help="output folder")
    r.add_argument("--steps", type=int, default=None, help="steps per run (default 40)")
    r.add_argument("--real-steps", type=int, default=None, help="steps per run on the real data (default: max(8, steps / 5))")
    r.add_argument("--sft-steps", type=int, default=None,
                   help="steps of the SFT warm start that Figure 1's runs start from (default: --steps; 0: none)")
    r.add_argument("--real-sft-steps", type=int, default=None,
                   help="the same on the real data (default: --real-steps)")
    r.add_argument("--skip-real", action="store_true", help="only the embedded default, not the real samples")
    r.add_argument("--data", type=Path, default=None, metavar="DIR",
                   help="folder of real samples whose alpacaeval2/ K = 8 lists are the real suite "
                        "(default: $NEMO_LPO_DATA; without one the real suite is skipped)")
    r.add_argument("--only-real", action="store_true", help="only the real K = 8 lists (e.g. to add them later)")
    r.add_argument("--skip-onpolicy", action="store_true",
                   help="leave out the on-policy rounds (generate -> score -> train, 3 rounds of K = 4)")
    r.add_argument("--report-only", action="store_true", help="redraw figures and report from existing results")
    r.add_argument("--compare-losses", nargs="*", default=None, metavar="LOSS",
                   help="also train every listwise loss (lpo, lpo_abs, listmle, kpo, ...) on the embedded K = 4 lists "
                        "at the same steps and tabulate held-out accuracy, Kendall τ, NDCG and best-response "
                        "log-likelihood; naming losses compares only those (off by default)")
    r.add_argument("--verbose", action="store_true", help="show the known-harmless megatron / torch warnings too "
                                                         "(as nemo-lpo --verbose)")
    r.set_defaults(func=run_reproduce_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Run ``nemo-lpo demo`` and print the summary."""
    from nemo_lpo.demo.config import DemoConfig
    from nemo_lpo.demo.pipeline import run_demo
    from nemo_lpo.demo.summary import print_summary

    cfg = DemoConfig(out_dir=args.out, steps=args.steps, loss=args.loss, beta=args.beta, lr=args.lr,
                     global_batch_size=args.batch_size, micro_batch_size=min(args.batch_size, 8), seed=args.seed,
                     train_file=args.train_file, heldout_file=args.heldout_file, export=not args.no_export)
    if cfg.global_batch_size % cfg.micro_batch_size:
        cfg.micro_batch_size = 1
    for path in (cfg.train_file, cfg.heldout_file):
        if not Path(path).is_file():
            print(f"nemo-lpo demo: {path}: file not found")
            return 1
    print_summary(run_demo(cfg))
    return 0


def run_reproduce_command(args: argparse.Namespace) -> int:
    """Run ``nemo-lpo reproduce``."""
    from nemo_lpo.demo.reproduce import report_only, run_reproduce

    if args.report_only:
        return report_only(args.out)
    return run_reproduce(args.out, steps=args.steps, include_real=not args.skip_real, real_steps=args.real_steps,
                         include_embedded=not args.only_real, sft_steps=args.sft_steps,
                         real_sft_steps=args.real_sft_steps, compare_losses=args.compare_losses, data=args.data,
                         include_onpolicy=not (args.skip_onpolicy or args.only_real))
