"""File names of a packed dataset with prefix ``P`` (no heavy imports: used by the CLI too).

- ``P.tokens.bin/.idx``: int32 IndexedDataset, one document per list: the prompt ids, then the K response ids
  (each response ends with EOS unless it was truncated).
- ``P.rewards.bin/.idx``: float32 IndexedDataset, one document per list holding one sequence of K rewards.
- ``P.ref_logps.bin/.idx`` + ``P.ref_logps.json``: optional float32 sidecar with the reference model's
  log-probability of each response (same shape as the rewards), and its metadata.
- ``P.manifest.json``: written last; a prefix without a manifest is not a (complete) dataset.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
TOKENS = "tokens"
REWARDS = "rewards"
REF_LOGPS = "ref_logps"


def part_prefix(prefix: str | os.PathLike, part: str) -> str:
    """Return the IndexedDataset prefix of one part (``tokens``, ``rewards``, ``ref_logps``)."""
    return f"{os.fspath(prefix)}.{part}"


def manifest_path(prefix: str | os.PathLike) -> Path:
    """Return the manifest path of the dataset at ``prefix``."""
    return Path(f"{os.fspath(prefix)}{MANIFEST_SUFFIX}")


def ref_meta_path(prefix: str | os.PathLike) -> Path:
    """Return the metadata JSON of the reference-logps sidecar."""
    return Path(part_prefix(prefix, REF_LOGPS) + ".json")


def indexed_files(part: str) -> tuple[str, str]:
    """Return the two file names (``.bin``, ``.idx``) of an IndexedDataset prefix."""
    return part + ".bin", part + ".idx"


def temp_name(path: str, tag: str) -> str:
    """Return a temporary sibling name of ``path`` (same directory, so that rename is atomic)."""
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{tag}")


def remove_quietly(paths) -> None:
    """Delete every path that exists (cleanup after a failure)."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
