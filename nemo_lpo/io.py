"""File I/O every part shares: atomic writes, and where a checkpoint folder's pieces live.

A failure never leaves a half-written file under the final name: ``atomic_write`` / ``atomic_path`` write a
temporary sibling (the usual mode, 0666 & ~umask) and rename it over the target only when complete; on error the
temporary is removed. Writers of several files at once (a packed dataset's .bin/.idx/manifest, a reference
sidecar, a training checkpoint) rename each piece and the piece readers check (manifest, ``latest``) last.

Checkpoint folders: a training run's ``checkpoints/`` holds ``step_NNNNNNN/`` folders and ``latest`` (the name of
the newest complete one); a converted or trained model checkpoint carries ``nemo_lpo_model.json`` (its
architecture, ``nemo_lpo.model.sidecar``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

LATEST = "latest"
"""The marker file naming a run's newest complete checkpoint."""
SIDECAR_NAME = "nemo_lpo_model.json"
"""The model description beside a converted (or trained) checkpoint."""


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (bytes, or str as UTF-8) to ``path`` through a temporary sibling and a rename."""
    with atomic_path(path) as tmp:
        # os.open with 0666 rather than mkstemp (0600): the file gets the usual mode, 0666 & ~umask
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under a run's checkpoint folder ``root`` (its ``latest`` marker), or None."""
    marker = Path(root) / LATEST
    if not marker.is_file():
        return None
    path = Path(root) / marker.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{marker} names {path.name}, which does not exist")
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or the newest complete checkpoint when ``path`` is a run's checkpoint folder."""
    path = Path(path)
    if (path / LATEST).is_file():
        return latest_checkpoint(path) or path
    return path


def checkpoint_sidecar(path: str | Path | None) -> Path | None:
    """The model description (``nemo_lpo_model.json``) of checkpoint ``path`` (or a run's newest), if it has one."""
    if not path:
        return None
    sidecar = resolve_checkpoint(path) / SIDECAR_NAME
    return sidecar if sidecar.is_file() else None
