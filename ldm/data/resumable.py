"""Training data order fixed by (seed, epoch), sharded across ranks, and resumable mid-epoch.

Lightning restores the model, optimizers and loop counters from a checkpoint, but a plain shuffled
DataLoader draws a new order from the global RNG and restarts the epoch from its first batch. Here
the order of epoch e is `randperm(n, seed + e)` (DistributedSampler's scheme, so DDP ranks take
disjoint shards of one permutation and Lightning does not swap in its own sampler), and the loader
is "stateful" in Lightning's sense (it has `state_dict`/`load_state_dict`): the checkpoint records
how many batches of the current epoch were served, and a resumed run skips exactly those indices
(without loading their data) and continues with the next batch of the same permutation.
Iterating draws nothing from the global RNG (whose state `ldm.callbacks.resume` checkpoints).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` (order from `seed + epoch`, shard `rank` of `num_replicas`) that can
    start a pass part-way: the next pass skips the first `start` indices of this rank's shard."""

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())[self.start :]
        self.start = 0
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` whose position Lightning saves in checkpoints.

    `state_dict()` is `{"epoch", "batches"}`: the sampler's epoch and the batches served in it.
    Lightning calls `load_state_dict` before it iterates again when it resumes a stopped epoch; the
    skip applies only if that pass is for the same epoch (a checkpoint taken at an epoch's end
    resumes with the next epoch, which starts from its first batch).
    """

    def __init__(self, dataset: Dataset, sampler: ResumableSampler, **kwargs: Any):
        if not isinstance(sampler, ResumableSampler):
            raise ValueError(f"sampler={type(sampler).__name__} must be a ResumableSampler")
        # Each pass draws the workers' base seed from this generator, seeded by (seed, epoch) below;
        # DataLoader's default draws it from the global RNG, which a resumed run restores only as
        # of the checkpoint, so a pass started after that point would shift the global stream.
        super().__init__(dataset, sampler=sampler, generator=torch.Generator(), **kwargs)
        self.batches_served = 0
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing, not even the permutation, is drawn before the first batch is asked
        # for, so the `set_epoch` Lightning calls after `iter()` still applies to this pass.
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        skip = 0
        if self._resume is not None:
            epoch, batches = self._resume
            self._resume = None
            skip = batches if epoch == self.sampler.epoch else 0
        self.sampler.start = skip * self.batch_size
        self.generator.manual_seed(self.sampler.seed + self.sampler.epoch)
        self.batches_served = skip
        for batch in super().__iter__():
            self.batches_served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self.batches_served)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))
