"""The model description beside a checkpoint (``nemo_lpo_model.json``): which architecture its weights hold.

``nemo-lpo convert hf-to-mcore`` writes it, each training checkpoint carries a copy, and the trainer, ``eval`` and
the exporter read it (``model.preset: from_checkpoint`` builds the recorded architecture).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from nemo_lpo.io import SIDECAR_NAME, atomic_write
from nemo_lpo.model.presets import ModelPreset

SIDECAR_VERSION = 1


class ModelDescriptionError(ValueError):
    """A missing, unreadable or foreign model description (the converters' ``ConversionError`` derives from it)."""


def write_sidecar(ckpt_dir: Path, *, preset, architecture: str, hf_config, dtype: str, sharded_metadata: dict,
                  source: str) -> None:
    """Write :data:`SIDECAR_NAME`: what model the checkpoint holds, for the trainer and the exporter."""
    payload = {
        "format": "nemo-lpo-model",
        "version": SIDECAR_VERSION,
        "preset": dataclasses.asdict(preset),
        "architecture": architecture,
        "params_dtype": dtype,
        "sharded_metadata": sharded_metadata,
        "hf_config": hf_config.to_dict() if hf_config is not None else None,
        "source": source,
    }
    atomic_write(Path(ckpt_dir) / SIDECAR_NAME, json.dumps(payload, indent=2, default=str) + "\n")


def read_sidecar(ckpt_dir: str | Path) -> dict | None:
    """The checkpoint's :data:`SIDECAR_NAME` as a dict (``preset`` rebuilt as a ModelPreset), or None."""
    path = Path(ckpt_dir) / SIDECAR_NAME
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        payload["preset"] = ModelPreset(**payload["preset"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ModelDescriptionError(f"{path}: unreadable model description ({err})") from err
    if payload.get("format") != "nemo-lpo-model" or payload.get("version") != SIDECAR_VERSION:
        raise ModelDescriptionError(f"{path}: not a nemo-lpo model description of version {SIDECAR_VERSION}")
    return payload


def read_checkpoint_preset(ckpt_dir: str | Path):
    """The ModelPreset recorded with a converted checkpoint (for the trainer's ``model.init_checkpoint``)."""
    payload = read_sidecar(ckpt_dir)
    if payload is None:
        raise ModelDescriptionError(f"{Path(ckpt_dir) / SIDECAR_NAME}: not found (not a converted checkpoint)")
    return payload["preset"]
