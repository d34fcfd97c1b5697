"""``nemo-lpo pack`` and ``nemo-lpo inspect`` (cheap to import: the work is imported inside the commands)."""

from __future__ import annotations

import argparse
import sys

FORMAT_CHOICES = ("auto", "ultrafeedback", "ultrafeedback_binarized", "ultrainteract", "hh_rlhf", "nemo_dpo",
                  "listwise")


def register(subparsers) -> None:
    """Add the ``pack`` and ``inspect`` sub-commands."""
    p = subparsers.add_parser("pack", help="tokenise preference / reward data into a packed listwise dataset",
                              description="Read preference or reward data, tokenise it with a chat template and "
                                          "write megatron indexed datasets + a manifest at --output-prefix.")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help="JSONL(.gz) / JSON / parquet files")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES, help="input format (auto: detect per file)")
    p.add_argument("--tokenizer", default="mistral", help="'mistral' (mistral-common v1) or a local HF tokenizer dir")
    p.add_argument("--chat-template", metavar="NAME|FILE.jinja",
                   help="for an HF tokenizer without a chat template (or to replace its own): a built-in "
                        "(plain, chatml, zephyr, llama2, mistral) or a Jinja template file; recorded in the manifest")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX")
    p.add_argument("--max-length", type=int, help="longest prompt + response sequence, in tokens")
    p.add_argument("--max-prompt-length", type=int, help="longest prompt, in tokens")
    p.add_argument("--max-response-length", type=int, help="longest response, in tokens")
    p.add_argument("--overflow", default="truncate_prompt", choices=("truncate_prompt", "truncate_response", "drop"),
                   help="what to do with a list over a limit: cut the prompt from the left, cut the responses, "
                        "or drop the list (every case is counted in the manifest)")
    p.add_argument("--workers", type=int, default=1, help="tokenising processes, this one included (the output does not depend on it)")
    p.add_argument("--pairs", choices=("zephyr", "1vs0", "all"), help="convert each list into preference pairs")
    p.add_argument("--max-k", type=int, help="keep the best and K-1 random other responses per list")
    p.add_argument("--reward-transform", default="none", choices=("none", "affine", "logodds", "rank"))
    p.add_argument("--reward-scale", type=float, default=1.0, help="affine: reward * scale + shift")
    p.add_argument("--reward-shift", type=float, default=0.0, help="affine: reward * scale + shift")
    p.add_argument("--logodds-eps", type=float, default=1e-6, help="log-odds: clip probabilities to [eps, 1-eps]")
    p.add_argument("--ultrafeedback-score", default="overall",
                   choices=("overall", "fine_grained", "helpfulness", "honesty", "instruction_following",
                            "truthfulness"), help="which raw UltraFeedback rating is the reward")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip bad records (counted per reason) instead of stopping at the first one")
    p.add_argument("--drop-tied", action="store_true",
                   help="drop lists whose rewards all tie (no ordered pair; counted as skipped 'tied_rewards'); "
                        "by default they are kept (LPO-abs learns from them) and counted")
    p.add_argument("--seed", type=int, default=1234, help="seed of --pairs zephyr and --max-k choices")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pack)

    i = subparsers.add_parser("inspect", help="show a packed dataset: manifest, length histograms, decoded lists")
    i.add_argument("prefix", metavar="PREFIX")
    i.add_argument("--show", type=int, default=2, help="lists to decode back to text")
    i.add_argument("--max-chars", type=int, default=400, help="characters shown per decoded sequence")
    i.set_defaults(func=run_inspect)


def run_pack(args: argparse.Namespace) -> int:
    """Run ``nemo-lpo pack``; returns the exit code (1 on bad input, nothing written)."""
    from nemo_lpo.data.pack import PackConfig, PackError, pack
    from nemo_lpo.data.transforms import LengthLimits, RewardTransform

    try:
        config = PackConfig(
            inputs=list(args.input), output_prefix=args.output_prefix, tokenizer=args.tokenizer,
            chat_template=args.chat_template, format=args.format,
            ultrafeedback_score=args.ultrafeedback_score,
            reward_transform=RewardTransform(args.reward_transform, args.reward_scale, args.reward_shift,
                                             args.logodds_eps),
            pairs=args.pairs, max_k=args.max_k,
            limits=LengthLimits(args.max_prompt_length, args.max_response_length, args.max_length, args.overflow),
            skip_invalid=args.skip_invalid, drop_tied=args.drop_tied, seed=args.seed, workers=args.workers, progress=not args.no_progress)
        pack(config)
    except (PackError, ValueError, FileNotFoundError) as err:
        print(f"nemo-lpo pack: error: {err}", file=sys.stderr)
        return 1
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Run ``nemo-lpo inspect``."""
    from nemo_lpo.data.inspect import inspect_dataset

    try:
        print(inspect_dataset(args.prefix, show=args.show, max_chars=args.max_chars))
    except (FileNotFoundError, ValueError) as err:
        print(f"nemo-lpo inspect: error: {err}", file=sys.stderr)
        return 1
    return 0
