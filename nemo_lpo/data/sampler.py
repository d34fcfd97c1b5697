"""Data-parallel sampler over lists: the same global batches for every dp size, seeded, resumable."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class ListwiseSampler:
    """Yield this rank's micro-batches of list indices.

    Each epoch is a seeded permutation of the lists (identity when ``shuffle=False``) cut into global
    batches of ``global_batch_size`` lists; the incomplete tail batch of an epoch is dropped. Rank ``r``
    takes the ``r``-th contiguous chunk of every global batch and splits it into micro-batches in order,
    so the set of lists in a global batch does not depend on ``dp_size``.

    Args:
        num_lists: size of the dataset.
        global_batch_size: lists per optimizer step over all data-parallel ranks.
        micro_batch_size: lists per micro-batch on one rank.
        dp_rank: this rank's data-parallel index.
        dp_size: number of data-parallel ranks.
        seed: seed of the per-epoch shuffles.
        shuffle: permute the lists each epoch.
        num_epochs: stop after this many epochs (``None``: iterate forever; the trainer stops by step count).

    Raises:
        ValueError: the batch sizes do not divide or exceed the dataset.
    """

    def __init__(self, num_lists: int, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True, num_epochs: int | None = None) -> None:
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad micro_batch_size={micro_batch_size} / dp_rank={dp_rank} / dp_size={dp_size}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of "
                             f"micro_batch_size {micro_batch_size} x dp_size {dp_size}")
        if global_batch_size > num_lists:
            raise ValueError(f"global_batch_size {global_batch_size} exceeds the {num_lists} lists")
        self.num_lists = num_lists
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_epochs = num_epochs
        self.epoch = 0
        # Lists consumed in the current epoch, summed over all ranks (advances by micro_batch_size x dp_size).
        self.consumed_lists = 0

    @property
    def global_batches_per_epoch(self) -> int:
        """Complete global batches in one epoch."""
        return self.num_lists // self.global_batch_size

    @property
    def micro_batches_per_global_batch(self) -> int:
        """Micro-batches each rank runs per global batch (gradient-accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def __len__(self) -> int:
        """Micro-batches this rank yields per epoch."""
        return self.global_batches_per_epoch * self.micro_batches_per_global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Return the list order of ``epoch`` (the same on every rank)."""
        if not self.shuffle:
            return np.arange(self.num_lists, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_lists).astype(np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.micro_batch_size * self.dp_size
        chunk = self.global_batch_size // self.dp_size
        usable = self.global_batches_per_epoch * self.global_batch_size
        while self.num_epochs is None or self.epoch < self.num_epochs:
            order = self.epoch_order(self.epoch)
            while self.consumed_lists < usable:
                g, within = divmod(self.consumed_lists, self.global_batch_size)
                m = within // step  # micro-batch number inside the global batch
                start = g * self.global_batch_size + self.dp_rank * chunk + m * self.micro_batch_size
                batch = order[start:start + self.micro_batch_size].tolist()
                self.consumed_lists += step
                yield batch
            self.epoch += 1
            self.consumed_lists = 0

    def state_dict(self) -> dict:
        """Return the position to resume from (the next micro-batch not yet yielded)."""
        return {"epoch": self.epoch, "consumed_lists": self.consumed_lists, "seed": self.seed,
                "num_lists": self.num_lists, "global_batch_size": self.global_batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` output.

        Raises:
            ValueError: the state belongs to a different dataset, seed or global batch size, or stops at a
                micro-batch boundary this (micro_batch_size, dp_size) cannot resume from.
        """
        for key in ("seed", "num_lists", "global_batch_size", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler {getattr(self, key)}")
        if state["consumed_lists"] % (self.micro_batch_size * self.dp_size):
            raise ValueError(f"consumed_lists {state['consumed_lists']} is not a multiple of "
                             f"micro_batch_size x dp_size = {self.micro_batch_size * self.dp_size}")
        self.epoch = int(state["epoch"])
        self.consumed_lists = int(state["consumed_lists"])
