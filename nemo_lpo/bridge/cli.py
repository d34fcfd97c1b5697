"""``nemo-lpo bridge-train``: LPO through Megatron-Bridge's ``finetune`` (cheap to import; Megatron-Bridge is optional).

Run it as every rank of a torchrun / srun launch inside the NeMo Framework container; Megatron-Bridge initialises
the process group. Without Megatron-Bridge it exits with status 2 and says where to get it.
"""

from __future__ import annotations

import argparse
import sys


def _bridge_train(args) -> int:
    from nemo_lpo.bridge import bridge_import_error, missing_bridge_message

    error = bridge_import_error()
    if error is not None:
        print(f"nemo-lpo bridge-train: {missing_bridge_message(error)}", file=sys.stderr)
        return 2
    from megatron.bridge.training.finetune import finetune

    from nemo_lpo.bridge.recipes import RECIPE_CONFS, recipe
    from nemo_lpo.config import ConfigError, load_config
    from nemo_lpo.train.cli import setup_distributed_env
    from nemo_lpo.train.preflight import launch_rank_and_world, preflight

    try:
        rank, world = launch_rank_and_world(setup_distributed_env())
        if rank == 0 and args.recipe in RECIPE_CONFS:  # the start-up check, once per launch (train/preflight.py)
            preflight(load_config(RECIPE_CONFS[args.recipe], list(args.overrides)), "bridge-train", world)
        container, task = recipe(args.recipe, args.overrides)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"nemo-lpo bridge-train: {err}", file=sys.stderr)
        return 2
    if container.checkpoint.pretrained_checkpoint is None:
        print("nemo-lpo bridge-train: set model.init_checkpoint (a `nemo-lpo convert hf-to-mcore` output): "
              "Megatron-Bridge's finetune starts from a pretrained checkpoint", file=sys.stderr)
        return 2
    finetune(container, task)
    return 0


def register(subparsers) -> None:
    """Add ``bridge-train``."""
    parser = subparsers.add_parser(
        "bridge-train", help="train LPO with Megatron-Bridge's finetune (NeMo Framework container)",
        description="Build the Megatron-Bridge ConfigContainer of a recipe (nemo-lpo's layered YAML + key=value "
                    "overrides) and run megatron.bridge.training.finetune with nemo-lpo's LPO forward step.")
    parser.add_argument("recipe", choices=("mixtral-8x7b", "mistral-7b", "tiny-cpu"),
                        help="recipe: mixtral-8x7b (TP1 PP4 EP8 FP8), mistral-7b (TP2+SP DP4), tiny-cpu")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="nemo-lpo key=value overrides (data.train_prefix=..., model.init_checkpoint=...)")
    parser.set_defaults(func=_bridge_train)
