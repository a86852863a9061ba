"""The two-stream batch sampler sharded over the ranks of a ``torchrun`` job.

Batch sizes are **global**: the run draws exactly the batches a single process would
(:class:`mcsc.data.sampling.TwoStreamBatchSampler`: a pure function of the seed and the
iteration) and rank r takes the r-th contiguous slice of the labelled part and the r-th slice
of the unlabelled part. So every rank sees its own labelled and unlabelled slices in the
configured proportion, the ranks' slices of a batch are disjoint and together are the
single-process batch (no item is seen twice where one process would see it once), each item
keeps its augmentation seed, and resuming at iteration i on any number of ranks reproduces the
uninterrupted run.
"""

from __future__ import annotations

from mcsc.data.sampling import TwoStreamBatchSampler


class ShardedTwoStreamBatchSampler(TwoStreamBatchSampler):
    """Rank ``rank``'s share of every :class:`TwoStreamBatchSampler` batch.

    Args:
        labelled, unlabelled, iterations, seed, start: as for :class:`TwoStreamBatchSampler`.
        labelled_per_batch, unlabelled_per_batch: the **global** counts per batch; each must be
            divisible by ``world_size``.
        rank, world_size: this process and the number of processes.

    Each yielded batch holds ``labelled_per_batch / world_size`` labelled then
    ``unlabelled_per_batch / world_size`` unlabelled ``(slice index, sample seed)`` pairs.
    ``state_dict``/``load_state_dict`` are the base sampler's (seed and next iteration, the same
    on every rank), so one checkpoint written by rank 0 resumes every rank.
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
        rank: int = 0,
        world_size: int = 1,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}"
            )
        for name, count in (("labelled", labelled_per_batch), ("unlabelled", unlabelled_per_batch)):
            if count % world_size:
                raise ValueError(
                    f"the {name} slices per batch ({count}) must be divisible by the number of processes "
                    f"({world_size}): batch sizes are global, each rank takes an equal share"
                )
        super().__init__(
            labelled, unlabelled, labelled_per_batch, unlabelled_per_batch, iterations, seed, start
        )
        self.rank, self.world_size = rank, world_size
        self.local_labelled_per_batch = labelled_per_batch // world_size
        self.local_unlabelled_per_batch = unlabelled_per_batch // world_size

    def batch(self, iteration: int) -> list[tuple[int, int]]:
        """This rank's part of the global batch of ``iteration`` (labelled first)."""
        items = super().batch(iteration)
        lab, unl = self.local_labelled_per_batch, self.local_unlabelled_per_batch
        labelled, unlabelled = items[: self.labelled_per_batch], items[self.labelled_per_batch :]
        return (
            labelled[self.rank * lab : (self.rank + 1) * lab]
            + unlabelled[self.rank * unl : (self.rank + 1) * unl]
        )
