"""The ``pretrained`` checkpoint folder Megatron-Bridge loads, built race-free by every rank of a launch.

Megatron-Bridge (0.6) loads a torch_dist directory given directly (it has ``metadata.json``) but then wants
``run_config.yaml`` beside it (its TP/PP check; else it looks for Megatron-LM's legacy ``args`` and fails).
``pretrained_layout`` makes ``run_dir/pretrained``: links to every file of the converted checkpoint plus that
small file, and a ``common.pt``: the checkpoint's common state with Megatron's ``checkpoint_version``
(``CHECKPOINT_VERSION``) where it has none; the converted checkpoint itself is not modified. Every torchrun rank calls it at once (before the
process group exists), so each builds a private temporary folder and renames it into place: a reader sees the
whole layout or none, and a rank that loses the rename keeps the winner's identical folder. Needs no
Megatron-Bridge, so it is tested with concurrent processes in the main environment.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from pathlib import Path

import torch
import yaml
from megatron.core.dist_checkpointing.serialization import load_common_state_dict

from nemo_lpo.io import resolve_checkpoint

RUN_CONFIG = "run_config.yaml"
"""What Megatron-Bridge reads beside a torch_dist checkpoint (its TP/PP check)."""
COMMON_STATE = "common.pt"
"""A torch_dist checkpoint's non-tensor state (megatron-core ``dist_checkpointing/strategies/common.py``)."""
CHECKPOINT_VERSION = 3.0
"""Megatron-LM's ``checkpoint_version``, which Megatron-Bridge writes into every checkpoint it saves. Bridge asserts
that all checkpoints one process loads agree on it (``training/checkpointing.py`` ``set_checkpoint_version``, a
missing one read as 0). nemo-lpo's checkpoints carry none, so a PEFT run's resume, which loads the base through
this layout and then Bridge's own adapter checkpoint, stopped with "checkpoint versions do not match" (found by
tests/test_bridge_loop.py's LoRA resume); the layout's common state carries 3.0."""
RENAME_TRIES = 20
"""Rename attempts before giving up (each lost race re-reads the folder another process put in place)."""


def _contents(folder: Path) -> dict[str, str | bytes] | None:
    """Name -> link target (or a written file's bytes) of a layout folder; None when it is not one."""
    if not folder.is_dir() or folder.is_symlink():
        return None
    try:
        return {item.name: os.readlink(item) if item.is_symlink() else item.read_bytes() for item in folder.iterdir()}
    except FileNotFoundError:  # another process moved a stale layout aside while it was read
        return None


def _versioned_common_state(source: Path) -> bytes | None:
    """The checkpoint's common state with ``checkpoint_version`` added, as a ``common.pt``; None when it has one.

    megatron-core 0.19 keeps the common state inside the torch_dist files and reads a ``common.pt`` beside them
    first when there is one (``serialization.load_common_state_dict``: the older layout), so the layout's file
    replaces it whole. torch.save writes the same bytes for the same dict in every process, so racing ranks build
    identical layouts.
    """
    common = load_common_state_dict(str(source))
    if "checkpoint_version" in common:
        return None
    buffer = io.BytesIO()
    torch.save({**common, "checkpoint_version": CHECKPOINT_VERSION}, buffer)
    return buffer.getvalue()


def _build(source: Path, folder: Path, written: dict[str, bytes]) -> None:
    """Links to the files of ``source`` and the ``written`` files (these replace a source file of their name)."""
    folder.mkdir(parents=True)
    for item in source.iterdir():
        if item.name not in written:
            (folder / item.name).symlink_to(item)
    for name, data in written.items():
        (folder / name).write_bytes(data)


def pretrained_layout(checkpoint: str | Path, run_dir: str | Path, tp: int, pp: int) -> str:
    """``run_dir/pretrained``: a folder Megatron-Bridge's ``pretrained_checkpoint`` loads (see the module docstring).

    A training run's ``checkpoints/`` folder resolves to its latest checkpoint. An existing layout for another
    checkpoint or parallel layout is replaced; one with the same contents is kept as it is.

    Raises:
        FileNotFoundError: ``checkpoint`` is not a megatron dist checkpoint (names ``model.init_checkpoint``).
    """
    source = resolve_checkpoint(Path(checkpoint).resolve())
    if not (source / "metadata.json").is_file():
        raise FileNotFoundError(f"model.init_checkpoint: {source} is not a megatron dist checkpoint (no metadata.json); "
                                "convert the HF model with `nemo-lpo convert hf-to-mcore`")
    run_config = yaml.safe_dump({"model": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
                                 "checkpoint": {"save_optim": False, "save_rng": False, "fully_parallel_save": True}})
    written = {RUN_CONFIG: run_config.encode()}
    common = _versioned_common_state(source)
    if common is not None:
        written[COMMON_STATE] = common
    want = {item.name: str(item) for item in source.iterdir()} | written
    target = Path(run_dir) / "pretrained"
    target.parent.mkdir(parents=True, exist_ok=True)
    private = target.parent / f".pretrained.{os.getpid()}.{uuid.uuid4().hex}"
    _build(source, private, written)
    try:
        for _ in range(RENAME_TRIES):
            if _contents(target) == want:
                return str(target)
            if target.exists() or target.is_symlink():  # another checkpoint / layout: moved aside, then removed
                stale = target.parent / f".pretrained.stale.{uuid.uuid4().hex}"
                try:
                    target.rename(stale)
                except FileNotFoundError:  # another process moved it first
                    continue
                shutil.rmtree(stale) if stale.is_dir() and not stale.is_symlink() else stale.unlink()
            try:
                private.rename(target)
                return str(target)
            except OSError:  # another process renamed its identical folder into place first: re-read it
                continue
        raise RuntimeError(f"{target}: could not put the pretrained layout in place after {RENAME_TRIES} tries")
    finally:
        if private.exists():
            shutil.rmtree(private)
