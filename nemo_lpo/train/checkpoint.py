"""Megatron dist checkpoints of the whole training state: exact resume, keep-last-N, crash safety, resharding.

Layout under the checkpoint folder::

    step_0000006/        a megatron dist checkpoint (torch_dist): model, optimizer, RNG (sharded), and the
                         common state (step, scheduler, data position, config, layout)
    step_0000006.tmp/    a save in progress (renamed when every rank has finished; a crash leaves it behind)
    latest               the name of the newest COMPLETE checkpoint, written last (temp name + rename)

A ``kill -9`` during a save therefore leaves ``latest`` pointing at the previous checkpoint. Model and
optimizer state are saved in megatron's reshardable formats (the DistributedOptimizer in
``fully_reshardable``: its DP shards are gathered at save into one tensor per parameter and state, shaped and
sharded like the parameter, as a plain optimizer saves them; no ``chained_N.`` prefix under EP), so a checkpoint saved under one TP/PP/EP/DP layout, with or without the
DistributedOptimizer, loads under another. The optimizer's tensors come from the checkpoint, its
non-tensor state (param groups) from the loading optimizer, and Adam's step count from the saved common
state: megatron's own merge of the saved structure fails when the optimizer's shape changes (one optimizer
vs a ChainedOptimizer of dense + expert parts under EP, plain vs distributed). The per-rank RNG state is only
restored when the layout is the same (the tiny and real presets have no dropout, so nothing draws from it).
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.strategies import filesystem_async

from nemo_lpo.io import LATEST, atomic_write, resolve_checkpoint
from nemo_lpo.killpoint import after_calls, kill_point
from nemo_lpo.train.adapters import adapter_sharded_state, check_base_pointer, load_adapter_state
from nemo_lpo.train.optimizer import (
    fill_slots,
    init_optimizer_state,
    is_distributed,
    load_optimizer_state,
    main_params_from_checkpoint,
    saved_adam_step,
    set_adam_step,
    split_sharded,
)

FORMAT_VERSION = 2
# megatron-core 0.19 refuses ShardedTensor.flattened_range, so the DistributedOptimizer's
# `fully_sharded_model_space` format (flattened slices per DP rank) can neither save nor load;
# `fully_reshardable` is its working reshardable format.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
# Format 1 wrote a ChainedOptimizer's (EP > 1) tensors under a `chained_N.` prefix: loadable at the same EP only.
READABLE_FORMATS = {1: {"distrib_optim_sharding_type": "fully_reshardable"}, FORMAT_VERSION: OPTIMIZER_METADATA}


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps."""
    return f"step_{step:07d}"


def layout() -> dict:
    """This run's parallel layout (sizes), as stored with each checkpoint (``vpp`` only when interleaving)."""
    lay = {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
           "ep": ps.get_expert_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size(),
           "world": torch.distributed.get_world_size()}
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp and vpp > 1:
        lay["vpp"] = vpp
    return lay


def model_sharded_state_dict(module) -> dict:
    """The sharded state dict of a model or of its virtual-pipeline chunk list.

    Chunks go under ``model0``, ``model1``, ... (as Megatron-LM): their local names repeat
    (``decoder.layers.0`` in every chunk) but their sharded keys carry GLOBAL layer numbers, so what is read or
    written does not depend on the nesting, and a checkpoint of any layout, with or without chunks, loads into
    any other. All chunks go into ONE request: megatron's load validation wants each rank's whole access
    pattern at once (a load per chunk fails it).
    """
    if isinstance(module, list):
        if len(module) == 1:
            return module[0].sharded_state_dict()
        return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(module)}
    return module.sharded_state_dict()


def training_state_request(lpo) -> dict:
    """What a training checkpoint holds of the model: every weight, or only the adapters under ``peft``."""
    model_sd = model_sharded_state_dict(lpo.module)
    peft = getattr(lpo, "peft", None)
    return model_sd if peft is None else adapter_sharded_state(peft, model_sd)


def load_model_state(module, loaded: dict) -> None:
    """Put the values of a ``model_sharded_state_dict`` request, as loaded, into the model or its chunks."""
    if isinstance(module, list) and len(module) > 1:
        for i, chunk in enumerate(module):
            chunk.load_state_dict(loaded[f"model{i}"])
    else:
        (module[0] if isinstance(module, list) else module).load_state_dict(loaded)


def _rng_state() -> dict:

    state = {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded() -> object:

    return ShardedObject(
        "rng_state", _rng_state(),
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
         ps.get_data_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
        replica_id=0,
    )


def _save_metadata() -> dict:
    """OPTIMIZER_METADATA for a save on this machine.

    The DistributedOptimizer gathers its DP shards at save: over NCCL on GPU (every DP rank gets them and
    the write is spread over DP); on CPU megatron's NCCL path calls ``.cuda()``, so the gather goes over its
    gloo group to DP rank 0 (``mem_efficient``; the checkpoint reads the same either way).
    """
    return {**OPTIMIZER_METADATA, "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available()}


def _save(state: dict, path: Path) -> None:
    """``dist_checkpointing.save``, without the helper process megatron would start for it.

    Megatron's file writer collects each rank's write results in a ``multiprocessing.Manager().Queue()`` (spawn
    context, made on the first save; ``filesystem_async.get_write_results_queue``), for its ASYNC save, whose
    writer runs in another process. The Manager is a server process of its own that does not exit when its
    parent is SIGKILLed: a killed run would leave it behind for good (measured: 780 MB resident each, still
    there 48 minutes later). Our saves are synchronous (the writes run in this process's threads, which
    ``queue.Queue`` serves), so the queue is an in-process one and no process is started.
    """
    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()
    after_calls(filesystem_async.FileSystemWriterAsync, "write_preloaded_data", "checkpoint/between_shard_writes")
    dist_checkpointing.save(state, str(path))


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def prune_checkpoints(root: str | Path, keep_last: int, protect: tuple[str, ...] = ()) -> None:
    """Delete complete checkpoints under ``root`` but the newest ``keep_last`` and those named in ``protect``."""
    if keep_last <= 0:
        return
    done = sorted(p for p in Path(root).glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last]:
        if old.name not in protect:
            shutil.rmtree(old, ignore_errors=True)


def _gather_deferred_params(lpo) -> None:
    """Complete the weights before a save when their all-gather is deferred (``parallel.overlap_param_gather``).

    Then the DistributedOptimizer's step updates only each rank's own slice and the all-gather of the others
    waits for the next forward (a pre-hook): the model saved right after a step held the other ranks' slices
    one step old (a 1-process resume of a DP2 step-2 checkpoint: step-3 loss off by 0.11). Megatron-LM does the
    same around its saves: disable the hook with a synchronous gather, enable it again.
    """
    for model in getattr(lpo, "models", []):
        if getattr(model, "use_forward_hook", False):
            model.disable_forward_pre_hook(param_sync=True)
            model.enable_forward_pre_hook()


def save_checkpoint(root: str | Path, step: int, lpo, optimizer, scheduler, feeder, config_dict: dict,
                    keep_last: int = 0, protect: tuple[str, ...] = ()) -> Path:
    """Save the training state after ``step`` steps under ``root`` (collective: every rank calls it).

    Keeps the newest ``keep_last`` checkpoints (0: all) and the ones named in ``protect`` (the best).
    """
    start = time.perf_counter()
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"{final.name}.tmp"
    rank = torch.distributed.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):  # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    _gather_deferred_params(lpo)
    model_sd = training_state_request(lpo)
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=False, metadata=_save_metadata()),
        "rng": _rng_sharded(),
        "step": step,
        "scheduler": scheduler.state_dict(),
        "data": feeder.state_dict(),
        "config": config_dict,
        "layout": layout(),
        "distributed_optimizer": is_distributed(optimizer),
        "format_version": FORMAT_VERSION,
        "peft": getattr(lpo, "base", None),  # adapter runs: the base checkpoint and its weight checksum
    }
    _save(state, tmp)
    _barrier()
    if rank == 0:
        kill_point("checkpoint/before_rename")  # a test hook (nemo_lpo.killpoint); nothing unless a test sets it
        _copy_model_description(getattr(lpo, "model_sidecar", None), tmp, config_dict)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / LATEST, final.name + "\n")  # the checkpoint is complete before `latest` names it
        prune_checkpoints(root, keep_last, protect)
        print(f"saved checkpoint {final} in {time.perf_counter() - start:.1f} s", flush=True)
    _barrier()
    return final


def saved_layout(path: str | Path) -> dict:
    """The parallel layout a training checkpoint was saved under (plus whether it used the DistributedOptimizer)."""
    common = dist_checkpointing.load_common_state_dict(str(path))
    return {**common["layout"], "distributed_optimizer": common.get("distributed_optimizer", False)}


def load_checkpoint(path: str | Path, lpo, optimizer, scheduler, feeder) -> int:
    """Restore the training state saved at ``path``; returns its step. Works across layouts (see module doc)."""
    path = Path(path)
    common = dist_checkpointing.load_common_state_dict(str(path))
    version = common.get("format_version")
    if version not in READABLE_FORMATS:
        raise ValueError(f"{path}: not a nemo-lpo training checkpoint (format {version})")
    same_layout = common["layout"] == layout()
    if common.get("peft") is not None or getattr(lpo, "base", None) is not None:
        check_base_pointer(common.get("peft"), getattr(lpo, "base", None), path)
    model_sd = training_state_request(lpo)
    init_optimizer_state(optimizer)
    opt_request = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=READABLE_FORMATS[version])
    opt_tensors: dict = {}
    opt_skeleton = split_sharded(opt_request, opt_tensors)
    from_weights = main_params_from_checkpoint(opt_tensors, path)
    # not under "optimizer": the saved common state there has the SAVING optimizer's structure, which
    # megatron would merge into ours (and fail on) when the layout or optimizer kind changed
    request = {"model": model_sd, "optimizer_tensors": opt_tensors}
    if same_layout:
        request["rng"] = _rng_sharded()
    try:
        loaded = dist_checkpointing.load(request, str(path))
    except Exception as err:
        here = {**layout(), "distributed_optimizer": is_distributed(optimizer)}
        raise RuntimeError(f"{path}: cannot load the checkpoint saved under {describe_layout(saved_layout(path))} "
                           f"into this run's {describe_layout(here)}: {err}") from err
    if getattr(lpo, "peft", None) is None:
        load_model_state(lpo.module, loaded["model"])
    else:  # the base weights stay as model.init_checkpoint loaded them
        load_adapter_state(lpo.module, loaded["model"])
    opt_loaded = loaded["optimizer_tensors"]
    if from_weights:
        again = dist_checkpointing.load(from_weights, str(path))
        opt_loaded.update({slot: again[slot] for slot in from_weights})
    opt_state = fill_slots(opt_skeleton, opt_loaded)
    step = saved_adam_step(common["optimizer"])
    if step is not None:
        set_adam_step(opt_state, step)
    load_optimizer_state(optimizer, opt_state)
    scheduler.num_steps = 0  # megatron's load_state_dict ADDS the saved count to the current one
    scheduler.load_state_dict(common["scheduler"])
    feeder.load_state_dict(common["data"])  # consumed lists of the GLOBAL batch: valid for any dp size
    if same_layout:
        _set_rng_state(loaded["rng"])
    return int(common["step"])


def describe_layout(lay: dict) -> str:
    """``tp=2 pp=1 ep=1 dp=1 (2 processes, distributed optimizer)``: a layout for messages."""
    text = " ".join(f"{k}={lay[k]}" for k in ("tp", "pp", "vpp", "ep", "dp") if k in lay)
    extra = [f"{lay['world']} process{'es' if lay.get('world', 1) != 1 else ''}"] if "world" in lay else []
    if "distributed_optimizer" in lay:
        extra.append("distributed optimizer" if lay["distributed_optimizer"] else "plain optimizer")
    return f"layout {text} ({', '.join(extra)})" if extra else f"layout {text}"


def _copy_model_description(sidecar: Path | None, ckpt: Path, config_dict: dict) -> None:
    """Copy the converted model's ``nemo_lpo_model.json`` into a training checkpoint.

    ``nemo-lpo convert mcore-to-hf`` and ``model.preset=from_checkpoint`` then know the architecture of a
    run started from a model that matches no named preset.
    """
    if sidecar is None:
        return
    payload = json.loads(Path(sidecar).read_text())
    payload["params_dtype"] = config_dict.get("model", {}).get("params_dtype", payload.get("params_dtype"))
    payload["source"] = str(sidecar.parent)
    atomic_write(ckpt / sidecar.name, json.dumps(payload, indent=2) + "\n")


def load_model_weights(module, path: str | Path) -> None:
    """Load only the model weights of a dist checkpoint (a training checkpoint or a converted model).

    ``module`` is a model or its virtual-pipeline chunk list. Keys are megatron-core's own GPTModel sharded
    keys, so any TP/PP/VPP/EP layout can read any other.
    """
    path = resolve_checkpoint(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    request = model_sharded_state_dict(module)
    loaded = dist_checkpointing.load(request, str(path))
    # A training checkpoint also returns its common state (step, optimizer, scheduler, config, ...) beside
    # the requested tensors; only the model's own keys go to the module.
    load_model_state(module, {key: value for key, value in loaded.items() if key in request})


def save_model_weights(module, path: str | Path) -> None:
    """Save only the model weights (a model or its chunk list) as a dist checkpoint (e.g. a test run's init)."""
    path = Path(path)
    if torch.distributed.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    _barrier()
    _save(model_sharded_state_dict(module), path)
    _barrier()
