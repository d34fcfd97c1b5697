"""One optimizer step on megatron's schedules, and the data feeding it.

``train_step`` counts the valid lists of the global batch (all-reduced over data-parallel ranks BEFORE
the step, so every micro-batch's loss is divided by the same global count), fills online reference
log-probs when configured, runs ``get_forward_backward_func`` (no pipelining, 1F1B, or interleaved
1F1B over the model chunks of a virtual pipeline, with gradient
accumulation over the micro-batches), steps the megatron optimizer (gradient clipping inside) and the
learning-rate scheduler, and reduces the loss metrics over micro-batches and data-parallel ranks.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from nemo_lpo.config import Config
from nemo_lpo.train.lpo_model import LPOModel, chunk_iterators, count_valid_lists


@dataclass
class StepResult:
    """What one step produced (metrics already reduced over the global batch, identical on every rank)."""

    metrics: dict[str, float]
    grad_norm: float
    lr: float
    tokens: int
    step_time: float
    timings: dict[str, float] = field(default_factory=dict)


def make_collator(cfg: Config, pad_id: int, multiple: int | None = None):
    """The batch builder of ``cfg.data``: one sequence per (list, slot), or one row per list (shared prompt).

    ``multiple`` overrides the padded-length multiple (``BatchFeeder.pad_multiple``).
    """
    multiple = multiple or BatchFeeder.pad_multiple(cfg)
    if cfg.data.shared_prompt:
        from nemo_lpo.packing.collate import SharedPromptCollator

        return SharedPromptCollator(pad_id, pad_to_multiple_of=multiple, packed=cfg.data.packed)
    from nemo_lpo.data import ListwiseCollator

    return ListwiseCollator(pad_id, pad_to_multiple_of=multiple, packed=cfg.data.packed)


class BatchFeeder:
    """Turns the listwise dataset into this rank's micro-batches of one global batch at a time.

    Every rank of a data-parallel replica (its TP and PP peers) reads the same lists, so no broadcast
    is needed; the sampler gives each data-parallel rank its contiguous chunk of the global batch.
    """

    def __init__(self, cfg: Config, *, dp_rank: int, dp_size: int, device: torch.device) -> None:
        from nemo_lpo.data import ListwiseDataset, ListwiseSampler
        from nemo_lpo.data.blend import BlendedLists
        from nemo_lpo.data.sources import parse_blend

        if not cfg.data.train_prefix:
            raise ValueError("data.train_prefix is not set: give the packed dataset prefix (nemo-lpo pack output)")
        d = cfg.data
        pairs = parse_blend(d.train_prefix)
        # a blend is read in stream order: its sources are shuffled per pass inside (data/blend.py), and each
        # global batch, a contiguous run of the stream, then holds every source in its weight's share
        self.blend = BlendedLists(pairs, d.seed, shuffle=d.shuffle) if len(pairs) > 1 else None
        self.dataset = self.blend or ListwiseDataset(pairs[0][1])
        self.sampler = ListwiseSampler(len(self.dataset), d.global_batch_size, d.micro_batch_size,
                                       dp_rank, dp_size, d.seed, shuffle=d.shuffle and self.blend is None)
        self.source_counts: dict[str, float] = {}  # lists/source/NAME of the last global batch (blends)
        self.collator = make_collator(cfg, self.dataset.pad_id)
        self.num_microbatches = d.global_batch_size // (d.micro_batch_size * dp_size)
        self.device = device
        self.drop_ref_logps = cfg.reference.mode == "online"  # the frozen copy supplies them
        self.cfg = cfg
        self.uniform = cfg.parallel.vpp > 1  # the interleaved schedule needs one shape per step
        self._iter = None

    @staticmethod
    def pad_multiple(cfg: Config) -> int:
        """Padded length multiple: ``data.pad_to_multiple_of``, and a multiple of tp under sequence parallel."""
        multiple = cfg.data.pad_to_multiple_of
        if cfg.parallel.sequence_parallel and cfg.parallel.tp > 1:
            multiple = math.lcm(multiple, cfg.parallel.tp)  # SP splits the sequence dimension over TP
        return multiple

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the dataset."""
        return self.sampler.global_batches_per_epoch

    def next_global_batch(self) -> list[dict]:
        """This rank's micro-batches of the next global batch (tensors on the device)."""
        if self._iter is None:
            self._iter = iter(self.sampler)
        batches = []
        for _ in range(self.num_microbatches):
            try:
                indices = next(self._iter)
            except StopIteration:  # the sampler moved to the next epoch; keep going
                self._iter = iter(self.sampler)
                indices = next(self._iter)
            batches.append(self.blend.items(self.sampler.epoch, indices) if self.blend is not None
                           else [self.dataset[i] for i in indices])
        self.source_counts = self._count_sources(batches)
        batches = collate_uniform(self.cfg, self.dataset.pad_id, batches) if self.uniform else \
            [self.collator(items) for items in batches]
        out = []
        for batch in batches:
            if self.drop_ref_logps:
                batch.pop("ref_logps", None)
            out.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        return out

    def _count_sources(self, groups: list[list[dict]]) -> dict[str, float]:
        """``lists/source/NAME`` of a blend's global batch: this rank's counts summed over data-parallel ranks."""
        from megatron.core import parallel_state

        if self.blend is None:
            return {}
        counts = torch.zeros(len(self.blend.names), dtype=torch.float64, device=self.device)
        for items in groups:
            for item in items:
                counts[item["source"]] += 1
        # TP/PP peers read the same lists: the sum over data-parallel replicas is the global batch's
        torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
        return {f"lists/source/{name}": float(c) for name, c in zip(self.blend.names, counts.tolist(), strict=True)}

    def state_dict(self) -> dict:
        """Data position (the sampler's consumed lists and epoch; a blend's sources, checked on resume)."""
        state = self.sampler.state_dict()
        if self.blend is not None:
            state["blend"] = self.blend.describe()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved data position.

        Raises:
            ValueError: the checkpoint was written for another blend (sources, weights or sizes).
        """
        saved = state.get("blend")
        now = self.blend.describe() if self.blend is not None else None
        if saved != now:
            raise ValueError(f"data.train_prefix: the checkpoint's data position is for the blend {saved}, this run "
                             f"reads {now or self.cfg.data.train_prefix}; resume with the same data")
        self.sampler.load_state_dict(state)
        self._iter = None


def collate_uniform(cfg: Config, pad_id: int, groups: list[list[dict]]) -> list[dict]:
    """Collate each group of dataset items into a micro-batch, all of ONE shape (virtual pipeline).

    Megatron's interleaved schedule sends activations of a fixed shape without exchanging it first (its
    shape exchange is unusable at pp=2, see ``lpo_model.VIRTUAL_PIPELINE_P2P``), so every micro-batch of a
    step is padded to the step's longest: the padding costs only this step's spread of lengths, whereas a
    fixed maximum length would pad every step to the worst case. The collators pad (re-collated with
    ``pad_to_multiple_of`` = that length, which keeps the sequence-parallel multiple), so every layout's
    derived keys (shared-prompt gather indices, packed cu_seqlens) stay consistent. The padded layout's
    sequence count also varies (K sequences per list): missing rows are added as empty sequences
    (``add_empty_rows``); other layouts have one row per list or per micro-batch.
    """
    collator = make_collator(cfg, pad_id)
    batches = [collator(items) for items in groups]
    longest = max(batch["tokens"].shape[1] for batch in batches)
    if any(batch["tokens"].shape[1] != longest for batch in batches):
        repad = make_collator(cfg, pad_id, multiple=longest)
        batches = [batch if batch["tokens"].shape[1] == longest else repad(items)
                   for batch, items in zip(batches, groups, strict=True)]
    rows = max(batch["tokens"].shape[0] for batch in batches)
    if any(batch["tokens"].shape[0] != rows for batch in batches):
        if cfg.data.shared_prompt or cfg.data.packed:
            raise ValueError(f"parallel.vpp: micro-batches of {sorted({b['tokens'].shape[0] for b in batches})} "
                             "rows in one step (the interleaved schedule needs one shape)")
        batches = [add_empty_rows(batch, rows, pad_id) for batch in batches]
    return batches


def add_empty_rows(batch: dict, rows: int, pad_id: int) -> dict:
    """Append empty sequences to a padded batch up to ``rows`` sequences.

    Each is one pad token (as the collator's empty slots: a zero-length sequence would leave its attention
    row fully masked), with loss_mask 0, so it adds nothing to any response's log-prob; it is attributed to
    slot 0 of list 0 with a zero sum. ``empty_rows`` counts them, so the token metric leaves them out.
    """
    n, t = batch["tokens"].shape
    extra = rows - n
    if extra <= 0:
        return batch
    out = dict(batch)
    pad = torch.full((extra, t), pad_id, dtype=batch["tokens"].dtype)
    out["tokens"] = torch.cat([batch["tokens"], pad])
    out["labels"] = torch.cat([batch["labels"], pad.clone()])
    out["loss_mask"] = torch.cat([batch["loss_mask"], batch["loss_mask"].new_zeros(extra, t)])
    out["position_ids"] = torch.cat([batch["position_ids"], torch.arange(t).expand(extra, t)])
    out["seq_lengths"] = torch.cat([batch["seq_lengths"], batch["seq_lengths"].new_ones(extra)])
    for key in ("list_index", "slot_index"):
        out[key] = torch.cat([batch[key], batch[key].new_zeros(extra)])
    out["empty_rows"] = torch.tensor(extra, dtype=torch.int64)
    return out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reduce_metrics(lpo: LPOModel, outputs: list[dict], device: torch.device) -> tuple[dict[str, float], int]:
    """Sum the per-micro-batch metric sums and divide by the global valid count; same result on all ranks.

    Only the last pipeline stage at tensor-parallel rank 0 contributes (one copy per data-parallel
    replica), and the sums are all-reduced over the whole world so that rank 0 can log them.
    """
    from megatron.core import parallel_state

    names = [*lpo.metric_names, "lists/valid", "tokens"]
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
    metrics = {name: value / max(valid, 1.0) for name, value in values.items()}
    metrics["lists/valid"] = valid
    return metrics, tokens


def train_step(lpo: LPOModel, optimizer, scheduler, microbatches: list[dict]) -> StepResult:
    """One optimizer step over this rank's ``microbatches`` of the global batch."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _sync()
    start = time.perf_counter()
    device = microbatches[0]["tokens"].device
    global_valid = sum(count_valid_lists(b) for b in microbatches).to(device=device, dtype=torch.float32)
    torch.distributed.all_reduce(global_valid, group=lpo.dp_group)
    timings = {}
    if lpo.reference is not None:
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
        forward_step_func=lambda it, model: lpo.forward_step(global_valid, len(microbatches), it, model),
        data_iterator=data, model=lpo.models, num_microbatches=len(microbatches),
        seq_length=first.shape[1], micro_batch_size=first.shape[0], forward_only=False,
    )
    _sync()
    opt_start = time.perf_counter()
    timings["forward_backward"] = opt_start - fb_start
    lr = optimizer.param_groups[0]["lr"]  # the rate this step applies (the scheduler moves it after)
    success, grad_norm, _ = optimizer.step()
    if success:
        scheduler.step(increment=1)
    _sync()
    timings["optimizer"] = time.perf_counter() - opt_start
    metrics, tokens = reduce_metrics(lpo, outputs, device)
    return StepResult(metrics=metrics, grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                      lr=float(lr), tokens=tokens, step_time=time.perf_counter() - start, timings=timings)
