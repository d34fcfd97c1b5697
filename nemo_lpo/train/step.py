"""One optimizer step on megatron's schedules (the data comes from ``feeder.BatchFeeder``).

``train_step`` counts the valid lists of the global batch (all-reduced over data-parallel ranks BEFORE
the step, so every micro-batch's loss is divided by the same global count), fills online reference
log-probs when configured, runs ``get_forward_backward_func`` (no pipelining, 1F1B, or interleaved
1F1B over the model chunks of a virtual pipeline, with gradient
accumulation over the micro-batches), steps the megatron optimizer (gradient clipping inside) and the
learning-rate scheduler, and reduces the loss metrics over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from nemo_lpo.killpoint import kill_point
from nemo_lpo.train.lpo_model import LPOModel
from nemo_lpo.train.task import chunk_iterators, count_valid_lists


@dataclass
class StepResult:
    """What one step produced (metrics already reduced over the global batch, identical on every rank)."""

    metrics: dict[str, float]
    grad_norm: float
    lr: float
    tokens: int
    attended_pairs: float
    """(query, key) pairs the attention needed over the global batch (the FLOP model's attention term)."""
    step_time: float
    timings: dict[str, float] = field(default_factory=dict)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reduce_metrics(lpo: LPOModel, outputs: list[dict], device: torch.device) -> tuple[dict[str, float], int, float]:
    """Sum the per-micro-batch metric sums and divide by the global valid count; same result on all ranks.

    Only the last pipeline stage at tensor-parallel rank 0 contributes (one copy per data-parallel
    replica), and the sums are all-reduced over the whole world so that rank 0 can log them.
    """
    names = [*lpo.task.metric_names, "lists/valid", "tokens", "attended_pairs"]
    totals = torch.zeros(len(names), dtype=torch.float64, device=device)
    contributes = lpo.is_last_stage and parallel_state.get_tensor_model_parallel_rank() == 0
    if contributes:
        for out in outputs:
            for i, name in enumerate(names):
                totals[i] += out[name].double().to(device)
    torch.distributed.all_reduce(totals)
    values = dict(zip(names, totals.tolist(), strict=True))
    valid = values.pop("lists/valid")
    tokens = int(values.pop("tokens"))
    pairs = values.pop("attended_pairs")
    metrics = {name: value / max(valid, 1.0) for name, value in values.items()}
    metrics["lists/valid"] = valid
    return metrics, tokens, pairs


def train_step(lpo: LPOModel, optimizer, scheduler, microbatches: list[dict]) -> StepResult:
    """One optimizer step over this rank's ``microbatches`` of the global batch."""
    _sync()
    start = time.perf_counter()
    device = microbatches[0]["tokens"].device
    global_valid = sum(count_valid_lists(b) for b in microbatches).to(device=device, dtype=torch.float32)
    torch.distributed.all_reduce(global_valid, group=lpo.dp_group)
    timings = {}
    if lpo.computes_reference:
        lpo.attach_online_reference(microbatches)
        _sync()
        timings["reference"] = time.perf_counter() - start

    for model in lpo.models:
        model.zero_grad_buffer()
    optimizer.zero_grad()
    first = microbatches[0]["tokens"]
    fb_start = time.perf_counter()
    data = chunk_iterators(microbatches, len(lpo.models))
    outputs = get_forward_backward_func()(
        forward_step_func=partial(lpo.task.forward_step, global_valid, len(microbatches)),
        data_iterator=data, model=lpo.models, num_microbatches=len(microbatches),
        seq_length=first.shape[1], micro_batch_size=first.shape[0], forward_only=False,
    )
    _sync()
    opt_start = time.perf_counter()
    timings["forward_backward"] = opt_start - fb_start
    lr = optimizer.param_groups[0]["lr"]  # the rate this step applies (the scheduler moves it after)
    kill_point("train/before_optimizer_step")  # a test hook (nemo_lpo.killpoint); nothing unless a test sets it
    success, grad_norm, _ = optimizer.step()
    if success:
        scheduler.step(increment=1)
    _sync()
    timings["optimizer"] = time.perf_counter() - opt_start
    metrics, tokens, pairs = reduce_metrics(lpo, outputs, device)
    return StepResult(metrics=metrics, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                      lr=float(lr), tokens=tokens, attended_pairs=pairs, step_time=time.perf_counter() - start,
                      timings=timings)
