"""The data side of a training step: this rank's micro-batches of one global batch at a time.

Every rank of a data-parallel replica (its TP and PP peers) reads the same lists, so no broadcast is needed; the
sampler gives each data-parallel rank its contiguous chunk of the global batch, and the run's ``BatchLayout``
collates them.
"""

from __future__ import annotations

import math

import torch
from megatron.core import parallel_state

from nemo_lpo.batch.layouts import BatchLayout, pad_multiple
from nemo_lpo.config import Config
from nemo_lpo.config.sources import parse_blend
from nemo_lpo.data.blend import BlendedLists
from nemo_lpo.data.dataset import ListwiseDataset
from nemo_lpo.data.sampler import ListwiseSampler
from nemo_lpo.model.varlen import fp8_length_multiple

CHUNK_MICROBATCHES = 64
"""Micro-batches per forward-only schedule call over a fixed set of lists (bounds the memory of one call's results)."""


def run_pad_multiple(cfg: Config) -> int:
    """Padded length multiple of a run.

    ``data.pad_to_multiple_of``, times tp under sequence parallelism, and TE's FP8 length rule when FP8 runs
    (``varlen.fp8_length_multiple``: the same rule the THD checks apply).
    """
    p = cfg.parallel
    multiple = pad_multiple(cfg.data.pad_to_multiple_of, tp=p.tp, sequence_parallel=p.sequence_parallel)
    recipe = (cfg.model.fp8_recipe or "delayed") if cfg.model.fp8 else None  # megatron's default recipe: delayed
    return math.lcm(multiple, fp8_length_multiple(recipe, tp=p.tp, sequence_parallel=p.sequence_parallel))


def collate_uniform(layout: BatchLayout, pad_id: int, multiple: int, groups: list[list[dict]]) -> list[dict]:
    """Collate each group of dataset items into a micro-batch, all of ONE shape (virtual pipeline).

    Megatron's interleaved schedule sends activations of a fixed shape without exchanging it first (its shape
    exchange is unusable at pp=2, see ``nemo_lpo.model.resolve.VIRTUAL_PIPELINE_P2P``), so every micro-batch of a
    step is padded to the step's longest: the padding costs only this step's spread of lengths, whereas a fixed
    maximum length would pad every step to the worst case. The collator pads (groups re-collated with
    ``pad_to_multiple_of`` = that length, which keeps the sequence-parallel multiple), so every layout's derived
    keys (shared-prompt gather indices, packed cu_seqlens) stay consistent; row counts are then evened by the
    layout's ``fill_rows`` (the padded layout's sequence count varies with K).
    """
    batches = [layout.collator(pad_id, multiple)(items) for items in groups]
    longest = max(batch["tokens"].shape[1] for batch in batches)
    if any(batch["tokens"].shape[1] != longest for batch in batches):
        repad = layout.collator(pad_id, longest)
        batches = [batch if batch["tokens"].shape[1] == longest else repad(items)
                   for batch, items in zip(batches, groups, strict=True)]
    rows = max(batch["tokens"].shape[0] for batch in batches)
    return [layout.fill_rows(batch, rows, pad_id) for batch in batches]


def microbatch_plan(num_lists: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[range | None]:
    """Rows of each micro-batch this data-parallel rank runs over a fixed set of lists (reference pass, validation).

    Micro-batch j (rows ``[j*mbs, (j+1)*mbs)``) goes to rank ``j % dp``; every rank gets ``ceil(M / dp)`` entries, and
    None marks a repeat that only keeps the ranks in step: expert-parallel all-to-alls span data-parallel ranks, so a
    rank with one micro-batch more than another would wait for it forever.
    """
    count = math.ceil(num_lists / micro_batch_size)
    per_rank = math.ceil(count / dp_size)
    plan: list[range | None] = []
    for j in range(dp_rank, per_rank * dp_size, dp_size):
        plan.append(range(j * micro_batch_size, min((j + 1) * micro_batch_size, num_lists)) if j < count else None)
    return plan


class BatchFeeder:
    """Turns the listwise dataset into this rank's micro-batches of one global batch at a time.

    Args:
        cfg: the run configuration (``data``, ``reference.mode``, ``parallel.vpp``).
        layout: the run's batch layout.
        dp_rank: this rank's data-parallel index.
        dp_size: data-parallel world size.
        device: where the micro-batches go.
    """

    def __init__(self, cfg: Config, layout: BatchLayout, *, dp_rank: int, dp_size: int, device: torch.device) -> None:
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
        self.train_prefix = d.train_prefix
        self.layout = layout
        self.multiple = run_pad_multiple(cfg)
        self.collator = layout.collator(self.dataset.pad_id, self.multiple)
        self.num_microbatches = d.global_batch_size // (d.micro_batch_size * dp_size)
        self.device = device
        self.drop_ref_logps = cfg.reference.mode in ("online", "base")  # the step computes them
        self.uniform = cfg.parallel.vpp > 1  # the interleaved schedule needs one shape per step
        self._iter = None

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the dataset."""
        return self.sampler.global_batches_per_epoch

    def next_global_batch(self) -> list[dict]:
        """This rank's micro-batches of the next global batch (tensors on the device)."""
        if self._iter is None:
            self._iter = iter(self.sampler)
        groups = []
        for _ in range(self.num_microbatches):
            try:
                indices = next(self._iter)
            except StopIteration:  # the sampler moved to the next epoch; keep going
                self._iter = iter(self.sampler)
                indices = next(self._iter)
            groups.append(self.blend.items(self.sampler.epoch, indices) if self.blend is not None
                          else [self.dataset[i] for i in indices])
        self.source_counts = self._count_sources(groups)
        batches = collate_uniform(self.layout, self.dataset.pad_id, self.multiple, groups) if self.uniform else \
            [self.collator(items) for items in groups]
        out = []
        for batch in batches:
            if self.drop_ref_logps:
                batch.pop("ref_logps", None)
            out.append({k: v.to(self.device, non_blocking=True) for k, v in batch.items()})
        return out

    def _count_sources(self, groups: list[list[dict]]) -> dict[str, float]:
        """``lists/source/NAME`` of a blend's global batch: this rank's counts summed over data-parallel ranks."""
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
                             f"reads {now or self.train_prefix}; resume with the same data")
        self.sampler.load_state_dict(state)
        self._iter = None
