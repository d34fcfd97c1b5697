"""Resumable, data-parallel record files shared by ``generate`` and ``score``.

Every rank handles the prompts whose index ``i`` satisfies ``i % world_size == rank`` and appends one JSON line
per finished prompt to its own part file under ``<out>.parts/`` (flushed and fsynced per line, so a kill loses at
most the line being written, and a torn last line is cut off on restart). On restart the records of every part
file count as done, whatever the world size was, so a resumed run never redoes nor duplicates a prompt. When all
ranks are done, rank 0 merges the parts in prompt order into ``<out>`` with an atomic write (a reader never sees
a half-written output) and removes the parts. ``<out>.parts/settings.json`` pins the settings of the run: a
restart with different settings stops with an error instead of mixing two runs' samples in one file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch.distributed as dist

from nemo_lpo.io import atomic_write

SETTINGS = "settings.json"


class ShardError(RuntimeError):
    """The part files of an interrupted run do not belong to this run, or a prompt is missing at merge."""


def parts_dir(out: Path) -> Path:
    """The folder of ``out``'s part files while the run is under way."""
    return out.with_name(out.name + ".parts")


def dist_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of a torchrun / srun launch (1 process: ``(0, 1)``)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    return rank, world


def _read_part(path: Path) -> Iterator[dict]:
    """The complete records of one part file; a torn last line (a kill mid-write) is cut off the file."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    for line in data[:end].splitlines():
        if line.strip():
            yield json.loads(line)


def done_records(out: Path) -> dict[int, dict]:
    """Every record already written by any rank of an interrupted run, by prompt index."""
    folder = parts_dir(out)
    done: dict[int, dict] = {}
    if folder.is_dir():
        for part in sorted(folder.glob("part-*.jsonl")):
            for record in _read_part(part):
                done.setdefault(int(record["index"]), record)
    return done


def check_settings(out: Path, settings: dict, rank: int) -> None:
    """Pin ``settings`` for the parts of ``out`` (rank 0 writes them); raise if an earlier run used others."""
    path = parts_dir(out) / SETTINGS
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ShardError(f"{parts_dir(out)}: the interrupted run used other settings ({', '.join(changed)}); "
                             f"rerun with the same settings to resume, or delete that folder to start over")
    elif rank == 0:
        atomic_write(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


class PartWriter:
    """Append-only writer of one rank's records (one fsynced JSON line each)."""

    def __init__(self, out: Path, rank: int) -> None:
        folder = parts_dir(out)
        folder.mkdir(parents=True, exist_ok=True)
        self._file = open(folder / f"part-{rank:05d}.jsonl", "ab")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        """Append ``record`` and make it durable before the next prompt starts."""
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the part file."""
        self._file.close()


def merge_parts(out: Path, count: int, meta: dict) -> None:
    """Write the records of all parts in prompt order to ``out`` (atomically) and ``meta`` beside it; drop parts.

    Raises:
        ShardError: a prompt index in ``range(count)`` has no record (a rank did not finish).
    """
    done = done_records(out)
    missing = [i for i in range(count) if i not in done]
    if missing:
        raise ShardError(f"{parts_dir(out)}: {len(missing)} of {count} prompts have no record (first: index "
                         f"{missing[0]}); rerun the same command to finish them")
    lines = "".join(json.dumps(done[i], ensure_ascii=False) + "\n" for i in range(count))
    atomic_write(meta_path(out), json.dumps(meta, indent=2) + "\n")
    atomic_write(out, lines)
    shutil.rmtree(parts_dir(out))


def meta_path(out: Path) -> Path:
    """The settings record written beside an output file (``<out>.meta.json``)."""
    return out.with_name(out.name + ".meta.json")


def finished(out: Path, settings: dict) -> bool:
    """True when ``out`` is complete (its ``.meta.json`` written) from a run with these ``settings``."""
    meta = meta_path(out)
    if not (out.is_file() and meta.is_file()):
        return False
    recorded = json.loads(meta.read_text())
    return all(recorded.get(key) == value for key, value in settings.items())


def barrier(world: int) -> None:
    """Wait for every rank of a multi-process launch (gloo, initialised here from the launcher's env if needed)."""
    if world == 1:
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
