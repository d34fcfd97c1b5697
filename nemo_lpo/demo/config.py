"""The demo's settings (a plain dataclass: ``nemo-lpo --help`` reads its defaults without importing the demo)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from nemo_lpo.demo.tasks import DATA_DIR


@dataclasses.dataclass
class DemoConfig:
    """Knobs of the demo (defaults: the measured CPU setting, see docs/demo.md).

    Attributes:
        out_dir: output folder (replaced parts are rewritten; nothing outside it is touched).
        steps: LPO-abs optimizer steps.
        loss: loss name (``nemo_lpo.losses.LOSSES``).
        beta: β of the implicit reward.
        lr: peak learning rate (cosine decay, short warm-up).
        global_batch_size: lists per optimizer step.
        micro_batch_size: lists per forward/backward.
        seed: seed of the initial weights and the data order.
        train_file: listwise JSONL to train on (default: the embedded train split).
        heldout_file: listwise JSONL to evaluate on (default: the embedded held-out split).
        export: export the trained model to HF format.
        eval_interval: validate during training every N steps (its first ``eval_lists`` held-out lists).
        eval_lists: lists of the held-out split the trainer validates on (the plots' validation curves).
    """

    out_dir: Path = Path("outputs/demo")
    steps: int = 600
    loss: str = "lpo_abs"
    beta: float = 0.1
    lr: float = 1e-3
    global_batch_size: int = 8
    micro_batch_size: int = 8
    seed: int = 1234
    train_file: Path = DATA_DIR / "train.jsonl"
    heldout_file: Path = DATA_DIR / "heldout.jsonl"
    export: bool = True
    eval_interval: int = 50
    eval_lists: int = 16
