"""Failures inside a worker: one console line from the failing rank, the traceback in the run's log file.

The line names the rank, the step, the error and what to do; the traceback goes to
``<logging.run_dir>/logs/rank<R>.error.log`` (``nemo-lpo --verbose`` also prints it).

What happens alike on every rank (a non-finite loss: the metrics are all-reduced) and what a rank sees only because
ANOTHER one failed (a lost connection) is printed by rank 0 alone; a dist-checkpoint load that fails raises on every
rank with the failed ranks listed, and the first of them prints it. A 64-rank job says it once.
"""

from __future__ import annotations

import datetime
import math
import sys
import traceback
from pathlib import Path

import torch

WHERE = "nemo_lpo_where"  # the attribute naming where the error happened (``mark``)
# what gloo / NCCL raise on a rank whose peer died: a consequence, reported by the rank that failed first
PEER_FAILURE_TEXT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was "
                     "aborted", "Socket Timeout", "timed out")


class NonFiniteLoss(FloatingPointError):
    """The step's loss (all-reduced: the same on every rank) is NaN or infinite."""


def mark(err: BaseException, where: str) -> None:
    """Record where ``err`` happened (``step 12``, ``start-up``) unless an inner handler already did."""
    if not hasattr(err, WHERE):
        setattr(err, WHERE, where)


def check_finite_loss(metrics: dict) -> None:
    """Raise NonFiniteLoss when the step's loss is not finite (before it is logged or checkpointed)."""
    loss = metrics.get("loss")
    if loss is not None and not math.isfinite(loss):
        raise NonFiniteLoss(f"the loss is {loss}")


def _hint(err: BaseException) -> str:
    if isinstance(err, torch.OutOfMemoryError):
        return ("lower data.micro_batch_size, set model.recompute=full, or spread the model wider "
                "(parallel.tp / pp / ep)")
    if isinstance(err, NonFiniteLoss):
        return ("lower optim.lr or raise optim.warmup_steps, keep optim.clip_grad > 0, and check the data's rewards; "
                "resume from the last checkpoint")
    if isinstance(err, FileNotFoundError | PermissionError):
        return "every node must see the same files (a shared file system)"
    if getattr(err, "failures", None):
        return "a checkpoint file is damaged or unreadable from this node: copy the checkpoint again"
    return ""


def _describe(err: BaseException) -> tuple[str, str]:
    """(error name, first line of its message); torch's CheckpointException: the first rank's own failure."""
    failures = getattr(err, "failures", None)  # torch.distributed.checkpoint: {rank: (exception, stack)}
    if isinstance(failures, dict) and failures:
        rank, failure = next(iter(failures.items()))
        inner = failure[0] if isinstance(failure, tuple) else failure
        return type(err).__name__, f"reading the checkpoint failed on rank {rank}: {type(inner).__name__}: {inner}"
    return type(err).__name__, (str(err).strip().splitlines() or [""])[0]


def _is_peer_failure(err: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(err)
    return isinstance(err, dist_error) or any(marker in text for marker in PEER_FAILURE_TEXT)


def _write_log(run_dir: str | Path, rank: int, command: str, err: BaseException) -> Path | None:
    path = Path(run_dir) / "logs" / f"rank{rank}.error.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as log:  # appended: a requeued job keeps the earlier failures
            stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            log.write(f"--- {stamp} nemo-lpo {command}, rank {rank}\n")
            log.write("".join(traceback.format_exception(err)))
        return path
    except OSError:
        return None


def report_worker_error(err: BaseException, command: str, run_dir: str | Path, rank: int, verbose: bool) -> int:
    """Log ``err``'s traceback, print its one line (from the rank that should say it); returns the exit code 1."""
    log = _write_log(run_dir, rank, command, err)
    if verbose or log is None:
        traceback.print_exception(err, file=sys.stderr)
    everywhere = isinstance(err, NonFiniteLoss) or _is_peer_failure(err)
    failures = getattr(err, "failures", None)  # a dist-checkpoint load raises on every rank, naming the failed ones
    speaker = min(failures) if isinstance(failures, dict) and failures else 0
    if (everywhere or failures) and rank != speaker:
        return 1
    where = getattr(err, WHERE, "start-up")
    name, message = _describe(err)
    message = message[:400]
    if _is_peer_failure(err):
        message = f"lost contact with another rank, which failed (its line and log say why): {message}"
    hint = _hint(err)
    seen = f"traceback in {log}" if log else "traceback above"
    print(f"nemo-lpo {command}: rank {rank}, {where}: {name}: {message}"
          + (f"; {hint}" if hint else "") + f" ({seen}; `nemo-lpo --verbose` prints it)", file=sys.stderr, flush=True)
    return 1
