"""``checkpoint.keep_best``: the checkpoint of the best validation so far, kept apart from keep-last-N.

``<checkpoint dir>/best.json`` names it (``{"metric", "mode", "step", "value", "checkpoint"}``), written with a
temp name + rename after the checkpoint is complete, so a crash leaves the previous best named and on disk. A
resumed run reads the file back and goes on comparing with that value; a file written for another metric or
mode is ignored (with a warning), so changing the metric starts a new record. Only validations after a
training step count (the step-0 validation scores the starting weights, which are ``model.init_checkpoint``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nemo_lpo.io import atomic_write
from nemo_lpo.train.checkpoint import step_dir_name

BEST_FILE = "best.json"


class BestCheckpoint:
    """Tracks the best value of one validation metric and the checkpoint that holds it.

    Args:
        root: the checkpoint folder.
        metric: the ``val/...`` key (``checkpoint.keep_best``).
        mode: ``min`` or ``max`` (``checkpoint.keep_best_mode``).
        rank: global rank (only rank 0 writes).
    """

    def __init__(self, root: str | Path, metric: str, mode: str, rank: int) -> None:
        self.root = Path(root)
        self.metric = metric
        self.mode = mode
        self.rank = rank
        self.step: int | None = None
        self.value: float | None = None

    @property
    def path(self) -> Path:
        """The ``best.json`` file."""
        return self.root / BEST_FILE

    @property
    def name(self) -> str | None:
        """Folder name of the best checkpoint, if there is one."""
        return None if self.step is None else step_dir_name(self.step)

    def load(self) -> None:
        """Read ``best.json`` back (resume); a record of another metric / mode is ignored with a warning."""
        if not self.path.is_file():
            return
        record = json.loads(self.path.read_text())
        if record.get("metric") != self.metric or record.get("mode") != self.mode:
            if self.rank == 0:
                print(f"WARNING: {self.path} is for {record.get('metric')} ({record.get('mode')}), this run keeps the "
                      f"best {self.metric} ({self.mode}): starting a new record", flush=True)
            return
        self.step, self.value = int(record["step"]), float(record["value"])

    def improves(self, record: dict) -> bool:
        """Whether ``record`` (a step's metrics) holds a finite ``metric`` better than the best so far.

        Raises:
            KeyError: the validation reports no such metric (the message lists the ``val/`` keys it has).
        """
        if self.metric not in record:
            names = sorted(k for k in record if k.startswith("val/"))
            raise KeyError(f"checkpoint.keep_best: validation reports no {self.metric!r}; it has {names}")
        value = record[self.metric]
        if not isinstance(value, int | float) or not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value < self.value if self.mode == "min" else value > self.value

    def accept(self, step: int, value: float) -> None:
        """Record ``step`` as the best (its checkpoint must be complete), in ``best.json`` too."""
        self.step, self.value = step, float(value)
        if self.rank == 0:
            payload = {"metric": self.metric, "mode": self.mode, "step": step, "value": self.value,
                       "checkpoint": self.name}
            atomic_write(self.path, json.dumps(payload, indent=2) + "\n")

    def summary(self) -> dict | None:
        """``{metric, mode, step, value, checkpoint path}`` or None before any best."""
        if self.step is None:
            return None
        return {"metric": self.metric, "mode": self.mode, "step": self.step, "value": self.value,
                "checkpoint": str(self.root / self.name)}
