"""``nemo-lpo pack``: read → parse, validate, convert, tokenise (worker processes) → megatron IndexedDatasets.

The main process reads raw records in input order and hands chunks of them to the workers
(``chunk_worker.process_chunk``; ``workers.ordered_map``, the main process being one of the workers). It
takes the results back in input order, checks ids for duplicates and writes, so ``file:line`` errors and
duplicates are found deterministically and the output bytes do not depend on the worker count. Everything
is written under temporary names and renamed at the end, the manifest last: a failure leaves nothing that
looks complete.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet
from tqdm import tqdm

from nemo_lpo.data import chunk_worker, layout
from nemo_lpo.data.dataset import indexed_builder
from nemo_lpo.data.examples import DUPLICATE_ID, TIED_REWARDS, TOO_LONG
from nemo_lpo.data.pack_config import PackConfig, PackError
from nemo_lpo.data.readers import get_reader, iter_lines, iter_records, parse_input, sniff_format
from nemo_lpo.data.workers import ordered_map, start_pool
from nemo_lpo.killpoint import kill_point

# PackConfig / PackError are defined in pack_config (the workers read the config too) and exported from here.
__all__ = ["PackConfig", "PackError", "pack"]

CHUNK_LISTS = 32


def _scan(path: str, count: bool) -> tuple[str | None, int | None]:
    """sha256 of a local input file and, with ``count``, its number of records when that is cheap, else None.

    JSONL lines are counted in the same pass as the hash (blank lines, which are skipped, are counted too:
    the progress total is corrected at the end); ``.gz`` is decompressed once more for the count (about 1% of
    a pack); parquet has its row count in its metadata; other inputs (``.json``, datasets) have no total.
    """
    if not os.path.isfile(path):
        return None, None
    name = os.fspath(path)
    jsonl = count and name.endswith((".jsonl", ".ndjson"))
    digest = hashlib.sha256()
    records, last = 0, b"\n"
    with open(name, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            if jsonl:
                records += block.count(b"\n")
                last = block[-1:]
    records += last != b"\n"
    if not count:
        records = None
    elif name.endswith(".gz") and ".json" in name:
        records = sum(1 for _ in iter_lines(name))  # a truncated stream fails here as it would when read
    elif name.endswith(".parquet"):
        records = pyarrow.parquet.read_metadata(name).num_rows
    elif not jsonl:
        records = None
    return digest.hexdigest(), records


class _Reader:
    """Reads the inputs in order, yielding chunks of (format, ``file:line``, position, raw record) to process."""

    def __init__(self, config: PackConfig, log) -> None:
        self.config = config
        self.log = log
        self.inputs = []
        self.read = 0
        self._scans = {}

    def total(self) -> int | None:
        """The number of input records if every input's is cheap to know (progress total), else None."""
        for path in self.config.inputs:
            if path not in self._scans:
                self._scans[path] = _scan(path, count=True)
        counts = [self._scans[path][1] for path in self.config.inputs]
        return None if None in counts else sum(counts)

    def items(self):
        for path in self.config.inputs:
            fmt, why = self.config.format, "given by --format"
            if fmt == "auto":
                fmt, why = sniff_format(path)
                self.log(f"{path}: detected format {fmt} ({why})")
            get_reader(fmt, self.config.ultrafeedback_score)  # bad options fail here, not in a worker
            sha256 = (self._scans.get(path) or _scan(path, count=False))[0]
            self.inputs.append({"path": str(path), "format": fmt, "format_reason": why, "sha256": sha256})
            for number, raw in iter_records(path, raw=True):
                yield fmt, f"{path}:{number}", self.read, raw
                self.read += 1

    def chunks(self):
        chunk = []
        for item in self.items():
            chunk.append(item)
            if len(chunk) == CHUNK_LISTS:
                yield chunk
                chunk = []
        if chunk:
            yield chunk


def pack(config: PackConfig, log=None) -> dict:
    """Pack ``config.inputs`` into ``config.output_prefix``; returns the manifest.

    Raises:
        PackError: bad input without ``skip_invalid`` (``file:line: reason``), or bad options. Nothing is
            left at the output prefix in that case.
    """
    if log is None:  # tqdm.write keeps a running progress bar below the message
        log = (lambda message: tqdm.write(message, file=sys.stderr)) if config.progress else (
            lambda message: print(message, file=sys.stderr))
    for path in config.inputs:  # fail before any work; hub names and NAME:SPLIT selections pass
        parse_input(path)
    prefix = os.fspath(config.output_prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    reader = _Reader(config, log)
    tag = f"{os.getpid()}"
    parts = {part: layout.temp_name(layout.part_prefix(prefix, part), tag) for part in (layout.TOKENS, layout.REWARDS)}
    temp_manifest = layout.temp_name(str(layout.manifest_path(prefix)), tag)
    temp_files = [f for part in parts.values() for f in layout.indexed_files(part)] + [temp_manifest]
    skipped = collections.Counter()
    counts = collections.Counter()
    k_hist = collections.Counter()
    responses_skipped = collections.Counter()
    seen_ids = {}
    pool = None
    try:
        chunk_worker.init(config)  # before the fork: the pool's processes inherit the loaded tokenizer
        pool = start_pool(config.workers)
        results = ordered_map(chunk_worker.process_chunk, reader.chunks(), pool, config.workers)
        tokens = indexed_builder(layout.indexed_files(parts[layout.TOKENS])[0], np.int32)
        rewards = indexed_builder(layout.indexed_files(parts[layout.REWARDS])[0], np.float32)
        progress = _progress(config.progress, reader.total() if config.progress else None)
        for chunk in results:
            progress.update(len(chunk))
            for kind, source, list_id, dropped, payload in chunk:
                responses_skipped.update(dropped)
                if list_id is not None:  # ids are checked here, in input order, before any later error
                    if list_id in seen_ids:
                        kind, payload = "error", (DUPLICATE_ID, f"duplicate id {list_id!r} "
                                                                f"(first at {seen_ids[list_id]})")
                    else:
                        seen_ids[list_id] = source
                if kind == "error":
                    reason, message = payload
                    if not config.skip_invalid and reason not in (TOO_LONG, TIED_REWARDS):  # options' drops
                        raise PackError(f"{source}: {reason}: {message}")
                    skipped[reason] += 1
                    continue
                encoded, tied, tied_list = payload
                counts["lists_kept"] += 1
                counts["tied_pairs_left_out"] += tied
                counts["tied_lists"] += tied_list
                for ids, lengths, reward_row, prompt_cut, response_cuts in encoded:
                    tokens.add_document(ids, lengths)
                    rewards.add_document(reward_row, [len(reward_row)])
                    counts["lists_written"] += 1
                    counts["prompts_truncated"] += prompt_cut
                    counts["responses_truncated"] += response_cuts
                    counts["prompt_tokens"] += lengths[0]
                    counts["response_tokens"] += sum(lengths[1:])
                    counts["max_sequence_length"] = max(counts["max_sequence_length"], lengths[0] + max(lengths[1:]))
                    k_hist[len(lengths) - 1] += 1
        if progress.total is not None and progress.total != progress.n:  # blank lines counted in the total
            progress.total = progress.n
            progress.refresh()
        progress.close()
        if counts["lists_written"] == 0:
            raise PackError(f"no list left to write from {config.inputs} (skipped: {dict(skipped)})")
        for part, builder in ((layout.TOKENS, tokens), (layout.REWARDS, rewards)):
            builder.finalize(layout.indexed_files(parts[part])[1])
        manifest = _manifest(config, reader, chunk_worker.tokenizer().identity(), counts, skipped, responses_skipped,
                             k_hist)
        with open(temp_manifest, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
        _publish(prefix, parts, temp_manifest)
    except BaseException:
        layout.remove_quietly(temp_files)
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    if skipped or responses_skipped:
        log(f"skipped lists by reason: {dict(sorted(skipped.items()))}; "
            f"skipped responses by reason: {dict(sorted(responses_skipped.items()))}")
    if counts["tied_lists"]:
        log(f"kept {counts['tied_lists']} lists whose rewards all tie (no ordered pair: LPO-abs learns from them, "
            f"pairwise losses get nothing; --drop-tied drops them)")
    log(f"wrote {counts['lists_written']} lists ({counts['lists_kept']} of {reader.read} read) to {prefix}")
    return manifest


def _progress(enabled: bool, total: int | None):
    return tqdm(total=total, unit=" lists", disable=not enabled, mininterval=0.5)


def _publish(prefix: str, parts: dict, temp_manifest: str) -> None:
    """Rename the finished files into place, manifest last; stale manifest / reference sidecar go first."""
    ref_part = layout.part_prefix(prefix, layout.REF_LOGPS)
    layout.remove_quietly([str(layout.manifest_path(prefix)), str(layout.ref_meta_path(prefix)),
                           *layout.indexed_files(ref_part)])
    for part, temp in parts.items():
        for src, dst in zip(layout.indexed_files(temp), layout.indexed_files(layout.part_prefix(prefix, part)),
                            strict=True):
            os.replace(src, dst)
    kill_point("pack/before_manifest")  # a test hook (nemo_lpo.killpoint); nothing unless a test sets it
    os.replace(temp_manifest, layout.manifest_path(prefix))


def _manifest(config: PackConfig, reader: _Reader, tokenizer: dict, counts, skipped, responses_skipped,
              k_hist) -> dict:
    kept = counts["lists_kept"]
    return {
        "format_version": layout.FORMAT_VERSION,
        "tokenizer": tokenizer,
        "inputs": reader.inputs,
        "options": {
            "ultrafeedback_score": config.ultrafeedback_score, "reward_transform": config.reward_transform.describe(),
            "pairs": config.pairs, "max_k": config.max_k, "limits": config.limits.describe(),
            "skip_invalid": config.skip_invalid, "drop_tied": config.drop_tied, "seed": config.seed,
        },
        "counts": {
            "lists_read": reader.read, "lists_kept": kept, "lists_skipped": sum(skipped.values()),
            "skipped": dict(sorted(skipped.items())), "responses_skipped": dict(sorted(responses_skipped.items())),
            "lists_written": counts["lists_written"], "tied_pairs_left_out": counts["tied_pairs_left_out"],
            "tied_lists": counts["tied_lists"],
            "prompts_truncated": counts["prompts_truncated"], "responses_truncated": counts["responses_truncated"],
        },
        "stats": {
            "prompt_tokens": counts["prompt_tokens"], "response_tokens": counts["response_tokens"],
            "max_sequence_length": counts["max_sequence_length"],
            "k_histogram": {str(k): n for k, n in sorted(k_hist.items())},
        },
        "files": {
            "tokens": {"prefix": Path(layout.part_prefix(config.output_prefix, layout.TOKENS)).name, "dtype": "int32",
                       "layout": "one document per list: prompt, then the K responses"},
            "rewards": {"prefix": Path(layout.part_prefix(config.output_prefix, layout.REWARDS)).name,
                        "dtype": "float32", "layout": "one document per list: one sequence of K rewards"},
        },
    }
