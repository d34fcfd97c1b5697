"""A weighted blend of packed listwise datasets (``data.train_prefix: [w1, prefix1, w2, prefix2, ...]``).

The blend is one stream of lists. Which source each position of the stream draws from is megatron-core's
blending index (``megatron.core.datasets.helpers.build_blending_indices``, the C++ greedy that Megatron's
``BlendedDataset`` uses): position i goes to the source whose share so far lags its weight the most, so every
prefix of the stream -- hence every global batch, which is a contiguous run of it -- holds each source within
one list of its weight's share. ``BlendedDataset`` itself is not used: it blends ``MegatronDataset`` objects
(fixed-length token windows with their own cached sample indices, built from a ``BlendedMegatronDatasetConfig``),
while a list is a variable group of documents of a ``ListwiseDataset``.

One blend epoch is as many lists as the sources hold together. The n-th list a source gives is its list
``order(pass)[n mod size]`` with ``pass = n // size``: a seeded permutation per pass when shuffling (a source
smaller than its share repeats in a new order, a larger one is subsampled and continues where it stopped in the
next epoch). The stream is a pure function of (sources, weights, seed, shuffle), so the sampler's position
(epoch, consumed lists) resumes it exactly.
"""

from __future__ import annotations

import numpy as np
from megatron.core.datasets import helpers

from nemo_lpo.config.sources import source_names
from nemo_lpo.data.dataset import ListwiseDataset


def blending_index(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source of each position, its sample number within the source) for ``size`` positions (megatron's greedy)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    source = np.zeros(size, dtype=np.int16)
    sample = np.zeros(size, dtype=np.int64)
    helpers.build_blending_indices(source, sample, w, len(w), size, False)
    return source, sample


class BlendedLists:
    """The lists of several packed datasets drawn by weight; ``items(epoch, positions)`` reads the stream.

    Args:
        pairs: ``[(weight, prefix), ...]`` (``sources.parse_blend``).
        seed: seed of the per-source orders.
        shuffle: permute each source per pass (else its lists in order).

    Raises:
        ValueError: the sources were packed with different pad tokens (one batch mixes them).
    """

    def __init__(self, pairs: list[tuple[float, str]], seed: int, shuffle: bool = True) -> None:
        self.weights = [w for w, _ in pairs]
        self.prefixes = [p for _, p in pairs]
        self.names = source_names(self.prefixes)
        self.datasets = [ListwiseDataset(p) for p in self.prefixes]
        pads = {ds.pad_id for ds in self.datasets}
        if len(pads) > 1:
            raise ValueError(f"data.train_prefix: the blended datasets use different pad ids {sorted(pads)}; pack "
                             "them with one tokenizer")
        self.pad_id = self.datasets[0].pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.sizes = [len(ds) for ds in self.datasets]
        self.epoch_size = sum(self.sizes)
        self.source, self.sample = blending_index(self.weights, self.epoch_size)
        self.per_epoch = np.bincount(self.source, minlength=len(self.datasets)).astype(np.int64)
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        """Lists per blend epoch."""
        return self.epoch_size

    @property
    def has_ref_logps(self) -> bool:
        """Whether every source has its reference sidecar."""
        return all(ds.has_ref_logps for ds in self.datasets)

    def describe(self) -> list[dict]:
        """What the stream depends on (stored with the sampler state, compared on resume)."""
        return [{"weight": w, "prefix": p, "lists": n} for w, p, n in zip(self.weights, self.prefixes, self.sizes,
                                                                          strict=True)]

    def _order(self, source: int, pass_: int) -> np.ndarray:
        key = (source, pass_)
        if key not in self._orders:
            n = self.sizes[source]
            self._orders = {k: v for k, v in self._orders.items() if k[0] != source}  # one pass per source cached
            self._orders[key] = np.random.default_rng([self.seed, source, pass_]).permutation(n) if self.shuffle \
                else np.arange(n)
        return self._orders[key]

    def locate(self, epoch: int, position: int) -> tuple[int, int]:
        """(source, list index in that source) of ``position`` of blend epoch ``epoch``."""
        source = int(self.source[position])
        n = epoch * int(self.per_epoch[source]) + int(self.sample[position])
        pass_, within = divmod(n, self.sizes[source])
        return source, int(self._order(source, pass_)[within])

    def items(self, epoch: int, positions) -> list[dict]:
        """The dataset items at ``positions`` of epoch ``epoch``, each with its ``source`` number."""
        out = []
        for position in positions:
            source, index = self.locate(epoch, int(position))
            out.append({**self.datasets[source][index], "source": source})
        return out
