"""Two-stream batch sampling: every batch holds labelled and unlabelled slices.

The batch of iteration ``i`` is a pure function of ``(seed, i)``: each stream walks through
seeded per-epoch permutations of its indices, and every sample carries its own augmentation
seed. So resuming at iteration ``i`` reproduces exactly the batches an uninterrupted run would
have drawn, whatever the number of DataLoader workers or how far they prefetched.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class TwoStreamBatchSampler:
    """Yields batches ``[(slice index, sample seed), ...]``: labelled first, then unlabelled.

    Args:
        labelled: indices of labelled slices.
        unlabelled: indices of unlabelled slices (may be empty when ``unlabelled_per_batch`` is 0).
        labelled_per_batch, unlabelled_per_batch: how many of each per batch.
        iterations: total number of batches of the run (the sampler stops there).
        seed: the run's seed.
        start: first iteration to yield (set by :meth:`load_state_dict` on resume).
    """

    def __init__(
        self,
        labelled: list[int],
        unlabelled: list[int],
        labelled_per_batch: int,
        unlabelled_per_batch: int,
        iterations: int,
        seed: int,
        start: int = 0,
    ):
        if labelled_per_batch < 1 or not labelled:
            raise ValueError("the two-stream sampler needs labelled slices in every batch")
        if unlabelled_per_batch > 0 and not unlabelled:
            raise ValueError(
                "no unlabelled slices for the unlabelled part of each batch: add images "
                "without labels, mark fewer cases labelled, or train the supervised method"
            )
        self.labelled = np.asarray(labelled, dtype=np.int64)
        self.unlabelled = np.asarray(unlabelled, dtype=np.int64)
        self.labelled_per_batch = labelled_per_batch
        self.unlabelled_per_batch = unlabelled_per_batch
        self.iterations = iterations
        self.seed = seed
        self.start = start

    def _stream(self, indices: np.ndarray, stream: int, first: int, count: int) -> list[int]:
        """Positions ``first .. first + count - 1`` of an endless stream of seeded epochs."""
        out = []
        n = len(indices)
        for position in range(first, first + count):
            epoch, offset = divmod(position, n)
            order = np.random.default_rng([self.seed, stream, epoch]).permutation(n)
            out.append(int(indices[order[offset]]))
        return out

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """The batch of ``iteration``: a list of (slice index, augmentation seed)."""
        lab = self._stream(
            self.labelled, 0, iteration * self.labelled_per_batch, self.labelled_per_batch
        )
        unl = []
        if self.unlabelled_per_batch:
            unl = self._stream(
                self.unlabelled, 1, iteration * self.unlabelled_per_batch,
                self.unlabelled_per_batch,
            )
        seeds = np.random.default_rng([self.seed, 2, iteration]).integers(
            0, 2**31 - 1, size=len(lab) + len(unl)
        )
        return [(index, int(s)) for index, s in zip(lab + unl, seeds)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in range(self.start, self.iterations):
            yield self.batch(iteration)

    def __len__(self) -> int:
        return max(0, self.iterations - self.start)

    def state_dict(self) -> dict:
        """Plain ints: the seed and the next iteration to yield."""
        return {"seed": self.seed, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.start = int(state["start"])
