"""Dynamic batching in a training loop: a `torch.utils.data` batch sampler over a bucket table.

`batch=dynamic` (memexp.buckets, memexp.estimate) finds, per bucket of sequence lengths, the
largest batch that fits a memory budget when padded to the bucket's longest sequence. This
sampler hands a `DataLoader` index batches that keep to that table: each batch holds sequences
of one bucket and at most its batch.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch.utils.data import Sampler


class BucketBatchSampler(Sampler[list[int]]):
    """Index batches for a `DataLoader(batch_sampler=...)`: each holds sequences of one bucket
    and at most that bucket's batch, so padded to its longest member it fits the budget the
    batches were chosen for (a step's peak grows with its batch and its length).

    `batches` maps a bucket's longest length to its batch (`memexp.buckets.BucketTable.batches`);
    a sequence goes to the first bucket whose longest length it does not exceed. Without `shuffle`, the
    buckets come shortest first and their indices in order; with it, the indices within each
    bucket and then the order of all batches are permuted by a generator seeded with `seed`
    plus the epoch (`set_epoch`, as `DistributedSampler` has it): the same seed and epoch, the
    same batches; each epoch its own order.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batches: Mapping[int, int],
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if not batches or min(batches.values()) < 1:
            raise ValueError(f"every bucket needs a batch of at least 1: {dict(batches)}")
        self.limits = sorted(batches)
        self.batch_of = dict(batches)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.members: dict[int, list[int]] = {limit: [] for limit in self.limits}
        for index, length in enumerate(lengths):
            position = bisect.bisect_left(self.limits, length)
            if position == len(self.limits):
                raise ValueError(
                    f"sequence {index} has length {length}, longer than the longest bucket "
                    f"({self.limits[-1]}): no batch was chosen for it"
                )
            self.members[self.limits[position]].append(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for limit in self.limits:
            indices = self.members[limit]
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator)]
            size = self.batch_of[limit]
            batches += [indices[start : start + size] for start in range(0, len(indices), size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        yield from batches

    def __len__(self) -> int:
        return sum(
            math.ceil(len(self.members[limit]) / self.batch_of[limit]) for limit in self.limits
        )
