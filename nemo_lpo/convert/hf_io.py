"""Lazy reading and sharded writing of HF safetensors checkpoints.

Reading opens one shard at a time and copies out only the tensor asked for, so a conversion holds at
most one shard's mapped pages plus the tensors of one layer. Writing buffers tensors up to a shard size,
then names the shards ``model-0000i-of-0000N.safetensors`` with the index transformers expects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_lpo.convert.hf_config import ConversionError
from nemo_lpo.convert.mcore_side import release_freed_memory

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Buffers some old checkpoints carry that are recomputed by the model, never weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class HFCheckpointReader:
    """The tensors of an HF model directory, read on demand from its safetensors shards."""

    def __init__(self, path: str | Path):
        """Index ``path``'s shards (headers only); raises ConversionError when a shard is missing."""
        self.path = Path(path)
        index_file = self.path / INDEX_NAME
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ConversionError(f"{index_file}: not a safetensors index ({err})") from err
            source = index_file
        elif (self.path / SINGLE_NAME).is_file():
            source = self.path / SINGLE_NAME
            weight_map = None
        else:
            raise ConversionError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME} (only safetensors are supported)")
        shards = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_NAME]
        missing = [s for s in shards if not (self.path / s).is_file()]
        if missing:
            raise ConversionError(f"{source}: {len(missing)} shard file(s) missing from {self.path}: {missing[:5]}")
        self._open_name: str | None = None
        self._open_handle = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self.shard_of: dict[str, str] = {}

        for shard in shards:
            with safe_open(str(self.path / shard), framework="pt") as handle:
                for name in handle.keys():
                    if name.endswith(IGNORED_SUFFIXES):
                        continue
                    tensor_slice = handle.get_slice(name)
                    self.shapes[name] = tuple(tensor_slice.get_shape())
                    self.dtypes[name] = tensor_slice.get_dtype()
                    self.shard_of[name] = shard
        if weight_map is not None:
            for name, shard in weight_map.items():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                if self.shard_of.get(name) != shard:
                    raise ConversionError(f"{index_file}: tensor {name!r} is listed in {shard} but that shard "
                                          f"does not hold it")

    def validate(self, expected: dict[str, tuple[int, ...]], config_source: str) -> None:
        """Check the weights are exactly those the config describes (names and shapes)."""
        missing = sorted(set(expected) - set(self.shapes))
        extra = sorted(set(self.shapes) - set(expected))
        if missing:
            raise ConversionError(f"{config_source} does not match the weights in {self.path}: "
                                  f"{len(missing)} tensor(s) missing, e.g. {missing[:5]}")
        if extra:
            raise ConversionError(f"{config_source} does not match the weights in {self.path}: "
                                  f"{len(extra)} unexpected tensor(s), e.g. {extra[:5]}")
        for name, shape in expected.items():
            if self.shapes[name] != tuple(shape):
                raise ConversionError(f"{config_source} does not match the weights: {name} in "
                                      f"{self.path / self.shard_of[name]} has shape {self.shapes[name]}, the config "
                                      f"implies {tuple(shape)}")

    def get(self, name: str) -> torch.Tensor:
        """A copy of tensor ``name`` (only its shard is open while reading)."""
        shard = self.shard_of[name]
        if shard != self._open_name:
            self.close()
            self._open_handle = safe_open(str(self.path / shard), framework="pt")
            self._open_name = shard
        return self._open_handle.get_tensor(name)

    def close(self) -> None:
        """Release the open shard (its mapping)."""
        self._open_handle = None
        self._open_name = None


def new_file_mode(directory: str | Path) -> int:
    """The permission bits a file newly created in ``directory`` gets (0666 & ~umask, default ACLs included).

    Found by creating one (reading the umask would need ``os.umask``, which sets it process-wide).
    """
    probe = Path(directory) / f".mode-probe-{os.getpid()}"
    fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        probe.unlink()


class ShardedSafetensorsWriter:
    """Writes ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` into a directory."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30):
        """Buffer tensors for ``out_dir`` in shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temp file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``name``; flushes a shard when the buffer would overflow."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._buffer[name] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Write the buffered tensors as one shard."""
        if not self._buffer:
            return

        temp_name = f"shard-{len(self._written):05d}.tmp"
        save_file(self._buffer, str(self.out_dir / temp_name), metadata={"format": "pt"})
        self._written.append((temp_name, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

        release_freed_memory()

    def finish(self) -> list[str]:
        """Flush, give the shards their final names and write the index; returns the shard names."""
        self.flush()
        count = len(self._written)
        weight_map: dict[str, str] = {}
        names = []
        # safetensors writes through a temporary file of its own (mode 0600): give the shards the usual mode
        mode = new_file_mode(self.out_dir)
        for i, (temp_name, tensor_names) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.chmod(self.out_dir / temp_name, mode)
            os.replace(self.out_dir / temp_name, self.out_dir / final)
            weight_map.update({t: final for t in tensor_names})
            names.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return names
