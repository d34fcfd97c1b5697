"""Per-step metrics: a JSONL line per step, a console progress line, TensorBoard, optional W&B (rank 0 only).

A line holds ``step``, ``loss``, the loss metrics (rewards/chosen, rewards/accuracies, ... as the loss
module names them), ``lists/valid``, ``grad_norm``, ``lr``, ``tokens``, ``tokens_per_s``, ``step_time``
and the phase timings; on GPU also ``tflops_per_gpu`` and ``mfu``. On resume the file is cut back to the
resumed step (rewritten atomically) so that it never holds two lines for one step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from nemo_lpo.io import atomic_write

# Dense bf16 peak TFLOP/s per GPU, for MFU (vendor datasheets).
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "GH200": 989.4, "B200": 2250.0}


def peak_tflops() -> float | None:
    """Peak dense bf16 TFLOP/s of this rank's GPU, when it is a known one."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


class MetricsLogger:
    """Writes the run's metrics; create it on every rank, only rank 0 writes.

    Args:
        run_dir: folder of metrics.jsonl and tensorboard/.
        total_steps: steps of the run (for the progress line).
        rank: global rank.
        tensorboard: write TensorBoard events.
        wandb_project: W&B project (None: no W&B; imported only when set).
        wandb_name: W&B run name.
        config: the run configuration dict (W&B, TensorBoard text).
        log_interval: print the console line every N steps.
    """

    def __init__(self, run_dir: str | Path, total_steps: int, rank: int, *, tensorboard: bool = True,
                 wandb_project: str | None = None, wandb_name: str | None = None, config: dict | None = None,
                 log_interval: int = 1) -> None:
        self.active = rank == 0
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = self._wandb = None
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb_project:
            import wandb  # optional; only imported when asked for

            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=config, resume="allow")

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (a resumed run repeats them), atomically."""
        if not self.active or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(self.path, "".join(f"{line}\n" for line in kept))

    def log(self, step: int, record: dict) -> None:
        """Append one step's record (a flat dict of numbers) and update the console / TB / W&B."""
        if not self.active:
            return
        line = {"step": step, **{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in record.items()}}
        with self.path.open("a") as handle:
            handle.write(json.dumps(line) + "\n")
            handle.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(record, step=step)
        validated = any(key.startswith("val/") for key in record)
        if step % self.log_interval == 0 or step == self.total_steps or validated:
            print(self.progress_line(step, record), flush=True)

    def progress_line(self, step: int, r: dict) -> str:
        """The console line: step, loss, accuracy, margins, grad norm, lr, throughput; then the validation's."""
        val = self.validation_line(r)
        if "loss" not in r:  # a validation-only line (before the first step)
            return f"step {step}/{self.total_steps} | {val}"
        parts = [f"step {step}/{self.total_steps}", f"loss {r['loss']:.4f}"]
        for key, label in (("rewards/accuracies", "acc"), ("rewards/margins", "margin")):
            if key in r:
                parts.append(f"{label} {r[key]:.3f}")
        parts += [f"grad_norm {r['grad_norm']:.3f}", f"lr {r['lr']:.2e}", f"{r['tokens_per_s']:.0f} tok/s",
                  f"{r['step_time'] * 1000:.0f} ms"]
        if "mfu" in r:
            parts.append(f"{r['tflops_per_gpu']:.1f} TFLOP/s/GPU mfu {r['mfu']:.1%}")
        if val:
            parts.append(val)
        return " | ".join(parts)

    @staticmethod
    def validation_line(r: dict) -> str:
        """``val loss .. acc .. tau .. ndcg ..`` of a record's validation metrics ('' when it has none)."""
        shown = (("val/loss", "val loss"), ("val/rewards/accuracies", "acc"), ("val/rewards/margins", "margin"),
                 ("val/implicit/kendall_tau", "tau"), ("val/implicit/ndcg", "ndcg"))
        parts = [f"{label} {r[key]:.4f}" for key, label in shown
                 if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
        return " ".join(parts)

    def close(self) -> None:
        """Flush and close TensorBoard / W&B."""
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
