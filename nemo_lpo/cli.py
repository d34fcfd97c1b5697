"""The single entry point ``nemo-lpo <command>``.

Thin on purpose: each command lives in its subpackage's ``cli`` module, which exposes
``register(subparsers)`` adding its sub-parsers with ``set_defaults(func=...)``.
Command modules must stay cheap to import (import megatron/torch inside ``func``),
so that ``nemo-lpo --help`` and ``nemo-lpo pack`` do not pay for megatron's import.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from nemo_lpo import killpoint, quiet

# Modules that contribute commands (each has ``register(subparsers)``).
COMMAND_MODULES = (
    "nemo_lpo.data.cli",  # pack, inspect
    "nemo_lpo.train.cli",  # train, ref-logps
    "nemo_lpo.convert.cli",  # convert hf-to-mcore / mcore-to-hf
    "nemo_lpo.evaluate.cli",  # eval
    "nemo_lpo.onpolicy.cli",  # generate, score, iterate
    "nemo_lpo.demo.cli",  # demo, reproduce
    "nemo_lpo.bridge.cli",  # bridge-train (Megatron-Bridge, optional)
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available command registered."""
    from nemo_lpo import __version__

    parser = argparse.ArgumentParser(
        prog="nemo-lpo",
        description="Listwise preference optimisation (LPO) on megatron-core.",
    )
    parser.add_argument("--version", action="version", version=f"nemo-lpo {__version__}")
    parser.add_argument("--verbose", dest="show_all_warnings", action="store_true",
                        help=f"also show the known-harmless warnings of megatron / torch / TE / Apex that are "
                             f"hidden by default (nemo_lpo/quiet.py; or set {quiet.VERBOSE_ENV}=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    killpoint.warn_if_set()  # a leaked crash-test variable is said once, at the start (rank 0)
    # before any command imports megatron / torch; every rank of a torchrun / srun launch passes here
    quiet.install(verbose=args.show_all_warnings or getattr(args, "verbose", False))
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
