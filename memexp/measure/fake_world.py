"""The one adapter over PyTorch's fake process group (`torch.testing._internal`, a private module).

The fake backend answers every collective at once without sending anything, so one process
plays rank `rank` of a world of any size: with fake tensors, a 512-rank FSDP step costs what a
one-rank step costs, not 512 times it. Only this module touches the private name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

FAKE_BACKEND = "fake"


@contextlib.contextmanager
def fake_ranks(world_size: int, rank: int = 0) -> Iterator[DeviceMesh]:
    """This process as rank `rank` of `world_size` fake ranks, with their one-dimensional CPU
    mesh; the process group is destroyed after, so the next job of the process starts afresh."""
    dist.init_process_group(FAKE_BACKEND, store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()
