"""Read a packed listwise dataset (megatron IndexedDatasets + manifest) and add reference log-probs to it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from nemo_lpo.data import layout
from nemo_lpo.killpoint import kill_point


def _indexed_dataset(part_prefix: str):
    return IndexedDataset(part_prefix, mmap=True)


def indexed_builder(bin_path: str, dtype) -> IndexedDatasetBuilder:
    """A megatron IndexedDatasetBuilder writing ``bin_path`` (its ``.idx`` is named at ``finalize``)."""
    return IndexedDatasetBuilder(bin_path, dtype=dtype)


class ListwiseDataset:
    """Memory-mapped packed lists: ``ds[i]`` gives a list's prompt ids, K response ids and K rewards.

    Args:
        prefix: the ``--output-prefix`` given to ``nemo-lpo pack``.

    Raises:
        FileNotFoundError: no manifest at the prefix (the dataset was never completed).
        ValueError: the parts disagree with each other or with the manifest.
    """

    def __init__(self, prefix: str | os.PathLike) -> None:
        self.prefix = os.fspath(prefix)
        manifest_file = layout.manifest_path(self.prefix)
        if not manifest_file.is_file():
            raise FileNotFoundError(f"{manifest_file}: no manifest; not a complete packed dataset")
        self.manifest = json.loads(manifest_file.read_text())
        if self.manifest.get("format_version") != layout.FORMAT_VERSION:
            raise ValueError(f"{manifest_file}: format_version {self.manifest.get('format_version')} "
                             f"is not {layout.FORMAT_VERSION}")
        tokenizer = self.manifest["tokenizer"]
        self.pad_id = int(tokenizer["pad_id"])
        self.eos_id = int(tokenizer["eos_id"])
        self.vocab_size = int(tokenizer["vocab_size"])
        self._tokens = _indexed_dataset(layout.part_prefix(self.prefix, layout.TOKENS))
        self._rewards = _indexed_dataset(layout.part_prefix(self.prefix, layout.REWARDS))
        self._doc_index = self._tokens.document_indices
        n = len(self._doc_index) - 1
        if len(self._rewards) != n or self.manifest["counts"]["lists_written"] != n:
            raise ValueError(f"{self.prefix}: {n} token documents, {len(self._rewards)} reward rows, "
                             f"manifest says {self.manifest['counts']['lists_written']}")
        self._ref = None
        self.ref_meta = None
        ref_prefix = layout.part_prefix(self.prefix, layout.REF_LOGPS)
        if layout.ref_meta_path(self.prefix).is_file():
            self.ref_meta = json.loads(layout.ref_meta_path(self.prefix).read_text())
            self._ref = _indexed_dataset(ref_prefix)
            if len(self._ref) != n:
                raise ValueError(f"{ref_prefix}: {len(self._ref)} rows for {n} lists")

    def __len__(self) -> int:
        return len(self._doc_index) - 1

    @property
    def has_ref_logps(self) -> bool:
        """Whether a reference log-probs sidecar is present."""
        return self._ref is not None

    def num_responses(self) -> np.ndarray:
        """Return K of every list (int64 [len]) without reading token data."""
        return np.diff(self._doc_index).astype(np.int64) - 1

    def sequence_lengths(self) -> np.ndarray:
        """Return the token count of every stored sequence (prompts and responses, in document order)."""
        return self._tokens.sequence_lengths

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"list index {i} out of range for {n} lists")
        i = int(i) % n
        start, stop = int(self._doc_index[i]), int(self._doc_index[i + 1])
        sequences = self._tokens[start:stop]
        rewards = np.array(self._rewards[i], dtype=np.float32)
        ref = None if self._ref is None else np.array(self._ref[i], dtype=np.float32)
        return {
            "prompt_ids": np.array(sequences[0], dtype=np.int32),
            "response_ids": [np.array(s, dtype=np.int32) for s in sequences[1:]],
            "rewards": rewards,
            "ref_logps": ref,
            "index": i,
        }


def write_float_rows(part_prefix: str, rows: Iterable[np.ndarray]) -> int:
    """Write one float32 document (a single sequence) per row to ``part_prefix``.bin/.idx; returns the row count."""
    bin_path, idx_path = layout.indexed_files(part_prefix)
    builder = indexed_builder(bin_path, np.float32)
    count = 0
    for row in rows:
        row = np.asarray(row, dtype=np.float32).reshape(-1)
        builder.add_document(row, [row.size])
        count += 1
    builder.finalize(idx_path)
    return count


def write_reference_logps(prefix: str | os.PathLike, per_list_logps: Iterable[np.ndarray], meta: dict) -> None:
    """Store the reference model's log-prob of every response beside the dataset, atomically.

    Args:
        prefix: the packed dataset's prefix.
        per_list_logps: for each list in dataset order, a float array of its K responses' log-probs.
        meta: what produced them (reference checkpoint, options); stored in ``P.ref_logps.json``.

    Raises:
        ValueError: the number of rows or a row's length differs from the dataset.
    """
    prefix = os.fspath(prefix)
    dataset = ListwiseDataset(prefix)
    k_per_list = dataset.num_responses()
    final_part = layout.part_prefix(prefix, layout.REF_LOGPS)
    tag = str(os.getpid())
    temp_part = layout.temp_name(final_part, tag)
    temp_files = list(layout.indexed_files(temp_part))
    meta_path = layout.ref_meta_path(prefix)
    temp_meta = layout.temp_name(str(meta_path), tag)

    def checked_rows():
        for i, row in enumerate(per_list_logps):
            row = np.asarray(row, dtype=np.float32).reshape(-1)
            if i >= len(k_per_list) or row.size != k_per_list[i]:
                expected = k_per_list[i] if i < len(k_per_list) else "no row"
                raise ValueError(f"reference logps row {i}: {row.size} values, dataset expects {expected}")
            if not np.all(np.isfinite(row)):
                raise ValueError(f"reference logps row {i}: non-finite value")
            yield row

    try:
        count = write_float_rows(temp_part, checked_rows())
        if count != len(k_per_list):
            raise ValueError(f"reference logps: {count} rows for {len(k_per_list)} lists")
        with open(temp_meta, "w") as f:
            json.dump({"format_version": layout.FORMAT_VERSION, "lists": count, **meta}, f, indent=2, sort_keys=True)
        # The metadata file marks the sidecar complete, so it is removed first and renamed last.
        layout.remove_quietly([meta_path])
        for temp, final in zip(temp_files, layout.indexed_files(final_part), strict=True):
            os.replace(temp, final)
        kill_point("ref-logps/before_metadata")  # a test hook (nemo_lpo.killpoint); nothing unless a test sets it
        os.replace(temp_meta, meta_path)
    except BaseException:
        layout.remove_quietly([*temp_files, temp_meta])
        raise
