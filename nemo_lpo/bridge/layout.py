"""The ``pretrained`` checkpoint folder Megatron-Bridge loads, built race-free by every rank of a launch.

Megatron-Bridge (0.6) loads a torch_dist directory given directly (it has ``metadata.json``) but then wants
``run_config.yaml`` beside it (its TP/PP check; else it looks for Megatron-LM's legacy ``args`` and fails).
``pretrained_layout`` makes ``run_dir/pretrained``: links to every file of the converted checkpoint plus that
small file; the converted checkpoint itself is not modified. Every torchrun rank calls it at once (before the
process group exists), so each builds a private temporary folder and renames it into place: a reader sees the
whole layout or none, and a rank that loses the rename keeps the winner's identical folder. Needs only PyYAML
(no Megatron-Bridge), so it is tested with concurrent processes in the main environment.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import yaml

from nemo_lpo.io import resolve_checkpoint

RUN_CONFIG = "run_config.yaml"
"""What Megatron-Bridge reads beside a torch_dist checkpoint (its TP/PP check)."""
RENAME_TRIES = 20
"""Rename attempts before giving up (each lost race re-reads the folder another process put in place)."""


def _contents(folder: Path) -> dict[str, str] | None:
    """Name -> link target (or ``run_config.yaml``'s text) of a layout folder; None when it is not one."""
    if not folder.is_dir() or folder.is_symlink():
        return None
    try:
        return {item.name: os.readlink(item) if item.is_symlink() else item.read_text() for item in folder.iterdir()}
    except FileNotFoundError:  # another process moved a stale layout aside while it was read
        return None


def _build(source: Path, folder: Path, run_config: str) -> None:
    folder.mkdir(parents=True)
    for item in source.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / RUN_CONFIG).write_text(run_config)


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
    want = {item.name: str(item) for item in source.iterdir()} | {RUN_CONFIG: run_config}
    target = Path(run_dir) / "pretrained"
    target.parent.mkdir(parents=True, exist_ok=True)
    private = target.parent / f".pretrained.{os.getpid()}.{uuid.uuid4().hex}"
    _build(source, private, run_config)
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
