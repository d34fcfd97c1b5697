"""The reference pass (``nemo-lpo ref-logps``): μ's log-prob of every response, stored beside the dataset.

It runs the frozen reference (the starting checkpoint) over the packed dataset with the training layout
(TP/PP/EP through megatron's forward-only schedule, lists spread over data-parallel ranks), gathers the
per-list log-probs on rank 0 and writes them with ``write_reference_logps`` (atomic sidecar). Training
with ``reference.mode=precomputed`` then reads them from the batch and holds no reference model.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from megatron.core import parallel_state as ps

from nemo_lpo.config import Config
from nemo_lpo.config.sources import train_prefixes, valid_prefixes
from nemo_lpo.data import ListwiseDataset, write_reference_logps
from nemo_lpo.model.resolve import resolve_preset
from nemo_lpo.train.checkpoint import load_model_weights
from nemo_lpo.train.feeder import CHUNK_MICROBATCHES, collate_uniform, microbatch_plan, run_pad_multiple
from nemo_lpo.train.lpo_model import LPOModel
from nemo_lpo.train.preflight import reference_identity
from nemo_lpo.train.worker_errors import mark


def build_reference(cfg: Config) -> LPOModel:
    """The frozen reference μ as an ``LPOModel(train=False)``: ``reference.checkpoint`` or ``model.init_checkpoint``."""
    lpo = LPOModel(cfg, train=False)
    if cfg.reference.checkpoint and cfg.reference.checkpoint != cfg.model.init_checkpoint:
        load_model_weights(lpo.module, cfg.reference.checkpoint)
    for module in lpo.modules:
        module.eval()
    return lpo


def reference_logps(cfg: Config, prefix: str | None = None, lpo: LPOModel | None = None) -> dict[int, np.ndarray]:
    """Compute μ's log-probs of every list of ``prefix`` on this rank's share; returns {list index: float32[K_i]}.

    ``prefix`` defaults to ``data.train_prefix`` (a single prefix), ``lpo`` to :func:`build_reference`.
    Only the last pipeline stage at tensor-parallel rank 0 returns values; other ranks return {}.
    Needs ``init_parallel(cfg)`` first.
    """
    lpo = lpo or build_reference(cfg)
    dataset = ListwiseDataset(prefix or cfg.data.train_prefix)
    multiple = run_pad_multiple(cfg)
    collator = lpo.layout.collator(dataset.pad_id, multiple)
    mbs = cfg.data.micro_batch_size
    # the same number of micro-batches on every data-parallel rank (a short rank repeats one and drops its result)
    plan = microbatch_plan(len(dataset), mbs, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
    fallback = next((rows for rows in plan if rows is not None), range(min(mbs, len(dataset))))
    keep = lpo.is_last_stage and ps.get_tensor_model_parallel_rank() == 0
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    results: dict[int, np.ndarray] = {}
    for c in range(0, len(plan), CHUNK_MICROBATCHES):
        entries = plan[c:c + CHUNK_MICROBATCHES]
        groups = [[dataset[i] for i in (rows if rows is not None else fallback)] for rows in entries]
        if cfg.parallel.vpp > 1:
            # one shape for the interleaved schedule: a short last micro-batch repeats its last list (same
            # list id, same values), then all are padded to the longest (step.collate_uniform)
            groups = [items + [items[-1]] * (mbs - len(items)) for items in groups]
            collated = collate_uniform(lpo.layout, dataset.pad_id, multiple, groups)
        else:
            collated = [collator(items) for items in groups]
        batches = [{k: v.to(device) for k, v in batch.items()} for batch in collated]
        logps = lpo.task.run_forward_only(lpo.module, batches, cfg.loss.length_average)
        if not keep:
            continue
        for rows, batch, values in zip(entries, batches, logps, strict=True):
            if rows is None:
                continue
            mask = batch["response_mask"].cpu().numpy()
            values = values.float().cpu().numpy()
            for row, list_id in enumerate(batch["list_ids"].tolist()):
                results[list_id] = values[row][mask[row]].astype(np.float32)
    return results


def reference_prefixes(cfg: Config) -> list[str]:
    """The datasets a run reads: every source of ``data.train_prefix`` (a blend's too), then ``data.valid_prefix``."""
    prefixes = train_prefixes(cfg.data.train_prefix) + valid_prefixes(cfg.data.valid_prefix)
    if not prefixes:
        raise ValueError("data.train_prefix is not set: give the packed dataset prefix (nemo-lpo pack output)")
    return list(dict.fromkeys(prefixes))


def write_reference(cfg: Config, prefixes: list[str] | None = None) -> int:
    """Write the reference sidecar of each of ``prefixes`` (default: :func:`reference_prefixes`); returns the lists.

    One reference model serves every dataset; each sidecar is written by rank 0 as soon as its pass is done.
    """
    lpo = build_reference(cfg)
    total = 0
    for prefix in prefixes or reference_prefixes(cfg):
        try:
            total += _write_one(cfg, prefix, lpo)
        except BaseException as err:  # where it happened, for the one-line report (train.worker_errors)
            mark(err, f"reference pass over {prefix}")
            raise
    return total


def _write_one(cfg: Config, prefix: str, lpo) -> int:
    """The reference pass over one dataset on every rank, its sidecar written from rank 0; returns the list count."""
    start = time.perf_counter()
    local = reference_logps(cfg, prefix, lpo)
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    merged: dict[int, np.ndarray] = {}
    for part in gathered:
        merged.update(part)
    num_lists = len(ListwiseDataset(prefix))
    missing = sorted(set(range(num_lists)) - merged.keys())
    if missing:
        raise RuntimeError(f"reference pass produced no log-probs for lists {missing[:10]} ...")
    if torch.distributed.get_rank() == 0:
        meta = {"checkpoint": cfg.reference.checkpoint or cfg.model.init_checkpoint,
                "checkpoint_path": reference_identity(cfg),  # compared by the start-up check of training
                "init_seed": cfg.train.seed if not (cfg.reference.checkpoint or cfg.model.init_checkpoint) else None,
                "preset": resolve_preset(cfg).name, "params_dtype": cfg.model.params_dtype,
                "length_average": cfg.loss.length_average,
                "layout": {"tp": cfg.parallel.tp, "pp": cfg.parallel.pp, "ep": cfg.parallel.ep,
                           "world": torch.distributed.get_world_size()}}
        write_reference_logps(prefix, (merged[i] for i in range(num_lists)), meta)
        print(f"wrote reference log-probs of {num_lists} lists beside {prefix} "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
    torch.distributed.barrier()
    return num_lists
