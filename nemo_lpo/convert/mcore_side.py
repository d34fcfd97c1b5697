"""The megatron side of the converters: a meta-device model and a streaming dist-checkpoint save.

The save produces each tensor's data one parameter at a time, while it is written.

Why a meta model: megatron decides the dist-checkpoint keys, shapes and factories (stacked layers,
stacked experts, the SwiGLU split of ``linear_fc1``, TE-compatible norm keys); building the real model
on the ``meta`` device gives exactly what the trainer's ``dist_checkpointing.load(model.sharded_state_dict())``
will ask for, at no memory cost. Why a custom save strategy: megatron's own torch_dist save stages every
tensor before writing; torch DCP's ``FileSystemWriter`` asks the planner for each tensor only when it
writes it, so ``resolve_data`` reads the HF tensors of that one parameter there.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import WriteItemType

from nemo_lpo.convert.hf_config import ConversionError
from nemo_lpo.model.build import build_gpt_model
from nemo_lpo.model.parallel import initialize_parallel
from nemo_lpo.model.presets import transformer_config

# megatron's sharded_state_dict(metadata=...) variants: the layout a checkpoint was saved with is detected
# on load by which one's keys it holds; the converter writes megatron's default (the first).
SHARDED_METADATA_VARIANTS: tuple[dict, ...] = (
    {},
    {"non_homogeneous_layers": True},
    {"singleton_local_shards": True},
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ensure_single_process_parallel() -> None:
    """Initialise a one-rank megatron world (gloo on CPU) unless one exists; refuse a model-parallel one."""
    if not (torch.distributed.is_initialized() and parallel_state.model_parallel_is_initialized()):
        initialize_parallel(tp=1, pp=1, ep=1)
        return
    sizes = (parallel_state.get_tensor_model_parallel_world_size(),
             parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_expert_model_parallel_world_size())
    if sizes != (1, 1, 1) or torch.distributed.get_world_size() != 1:
        raise RuntimeError(f"the converters run in one process at TP=PP=EP=1 (megatron is initialised with "
                           f"tp/pp/ep={sizes}, world {torch.distributed.get_world_size()}); the checkpoint "
                           "they write loads at any layout")


def build_meta_model(preset, params_dtype: torch.dtype):
    """The preset's megatron GPTModel (local spec, TP=PP=EP=1) with parameters on the meta device."""
    config = transformer_config(preset, params_dtype=params_dtype, use_cpu_initialization=True,
                                perform_initialization=False)
    with torch.device("meta"):
        return build_gpt_model(preset, config, pre_process=True, post_process=True, use_te=False)


def check_layout(preset, tp: int, pp: int, ep: int) -> None:
    """Raise ConversionError when the preset cannot run at TP/PP/EP (megatron's own checks)."""
    try:
        transformer_config(preset, tp=tp, pp=pp, ep=ep, sequence_parallel=tp > 1 and preset.is_moe,
                           use_cpu_initialization=True)
    except (ValueError, AssertionError) as err:
        raise ConversionError(f"layout tp={tp} pp={pp} ep={ep} is not possible for this model: {err}") from err


def model_sharded_state_dict(model, metadata: dict) -> dict:
    """``model.sharded_state_dict(metadata=...)`` with extra state objects kept (megatron saves them)."""
    return model.sharded_state_dict(metadata=dict(metadata))


def iter_chunks(sharded_sd: dict):
    """Yield ``(param name, ShardedTensor, parameter's storage offset)`` for every chunk megatron saves.

    The dict keys of megatron's sharded state dict are the parameter names; factories (the SwiGLU split
    of ``linear_fc1``) are built on the (meta) data to find which view of the parameter each chunk is.
    """
    for name, obj in sharded_sd.items():
        if isinstance(obj, ShardedTensorFactory):
            chunks = list(nested_values(obj.build()))
        elif isinstance(obj, ShardedTensor):
            chunks = [obj]
        else:
            continue
        for sh in chunks:
            if not isinstance(sh, ShardedTensor):
                raise RuntimeError(f"unexpected nested sharded object under {name}: {type(sh).__name__}")
            yield name, sh, obj.data.storage_offset()


class ChunkLocation(NamedTuple):
    """Where a saved chunk lives in its (TP=1) parameter, and its extent in checkpoint coordinates."""

    param: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    dcp_sizes: tuple[int, ...]

    def view_of(self, full: torch.Tensor) -> torch.Tensor:
        """The chunk as a view of the full parameter tensor."""
        return full.as_strided(self.size, self.stride, self.storage_offset)


def chunk_locations(sharded_sd: dict) -> dict[tuple[str, tuple[int, ...]], ChunkLocation]:
    """``{(checkpoint key, global offset): ChunkLocation}`` for every chunk of the model's sharded state dict."""
    locations = {}
    for name, sh, base_offset in iter_chunks(sharded_sd):
        view = sh.data
        locations[(sh.key, tuple(sh.global_offset))] = ChunkLocation(
            name, tuple(view.shape), tuple(view.stride()), view.storage_offset() - base_offset,
            (1,) * sh.prepend_axis_num + tuple(sh.local_shape))
    return locations


class _ChunkRequest(torch.Tensor):
    """The chunks of one checkpoint key to read, in torch DCP's checkpointable protocol."""

    @staticmethod
    def __new__(cls, global_shape, chunks: dict, dtype):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(global_shape), dtype=dtype)

    def __init__(self, global_shape, chunks: dict, dtype):
        self.chunks = chunks  # {offset tuple: tensor of the chunk's DCP sizes}

    def __create_chunk_list__(self):

        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=t.shape) for o, t in self.chunks.items()]

    def __get_tensor_shard__(self, index):
        return self.chunks[tuple(index.offset)]

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{cls.__name__} only carries read requests")


def read_parameters(ckpt_dir: str | Path, locations: dict, names: set[str], shapes: dict, global_shapes: dict,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read the full (TP=1) parameters ``names`` from a torch_dist checkpoint saved at any layout.

    torch DCP reassembles each requested chunk from the stored ones, whatever TP/PP/EP wrote them.
    """
    params = {name: torch.empty(shapes[name], dtype=dtype) for name in names}
    requests: dict[str, dict] = {}
    for (key, offset), loc in locations.items():
        if loc.param in params:
            chunk = loc.view_of(params[loc.param])
            if not chunk.is_contiguous():
                raise RuntimeError(f"chunk {key}@{offset} is not a contiguous view of {loc.param}")
            requests.setdefault(key, {})[offset] = chunk.view(loc.dcp_sizes)
    state = {key: _ChunkRequest(global_shapes[key], chunks, dtype) for key, chunks in requests.items()}
    dcp_load(state, storage_reader=FileSystemReader(str(ckpt_dir)),
             planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)
    return params


def checkpoint_global_shapes(sharded_sd: dict) -> dict[str, tuple[int, ...]]:
    """``{checkpoint key: global shape}`` of every tensor the model's sharded state dict asks for."""
    return {sh.key: tuple(sh.global_shape) for _, sh, _ in iter_chunks(sharded_sd)}


def _malloc_trim():
    try:

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed mid-size tensors in its heap otherwise).

    Without it, glibc's adaptive mmap threshold moves tensors of a few MB onto the heap, where the freed
    ones of earlier parameters stay resident (measured: +35 MB on a 320 MB conversion).
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class LazyParameters:
    """Produces megatron parameters on demand, one at a time.

    A parameter saved as several chunks (the SwiGLU halves of ``linear_fc1``) is kept until all its
    chunks were written (at most ``keep`` such parameters at once; an evicted one is produced again).
    """

    def __init__(self, produce: Callable[[str], torch.Tensor], chunk_counts: dict[str, int], keep: int = 2):
        """``produce(param_name)`` returns the full (TP=1) parameter; ``chunk_counts[name]`` its chunk count."""
        self.produce = produce
        self.chunk_counts = chunk_counts
        self.keep = keep
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._served: dict[str, int] = {}
        self.produced = 0

    def get(self, name: str) -> torch.Tensor:
        """The full parameter ``name``, for writing one of its chunks."""
        tensor = self._cache.pop(name, None)
        if tensor is None:
            release_freed_memory()
            tensor = self.produce(name)
            self.produced += 1
        self._served[name] = self._served.get(name, 0) + 1
        if self._served[name] < self.chunk_counts.get(name, 1):
            self._cache[name] = tensor
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return tensor

    def clear(self) -> None:
        """Drop the kept parameters."""
        self._cache.clear()


def make_lazy_save_strategy(locations: dict, params: LazyParameters):
    """A torch_dist save strategy whose tensor chunks are read from ``params`` while they are written."""

    class LazySavePlanner(MCoreSavePlanner):
        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            key = (write_item.index.fqn, tuple(write_item.index.offset))
            location = locations[key]
            chunk = location.view_of(params.get(location.param)).contiguous()
            return chunk.reshape(tuple(write_item.tensor_data.chunk.sizes))

    class LazyTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):
            flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
            for shards in flat.values():
                for sh in shards:
                    if isinstance(sh, ShardedTensor) and (sh.key, tuple(sh.global_offset)) not in locations:
                        raise RuntimeError(f"no source for checkpoint chunk {sh.key} @ {sh.global_offset}")
            pyt_state_dict = mcore_to_pyt_state_dict(flat, False)
            writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True, thread_count=1)
            planner = LazySavePlanner(flatten_state_dict=False, flatten_sharded_tensors=False)
            dcp_save(pyt_state_dict, storage_writer=writer, planner=planner)

    return LazyTorchDistSaveStrategy("torch_dist", 1)
