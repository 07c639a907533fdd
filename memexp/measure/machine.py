"""What the machine gives a timed step: PyTorch's thread counts, the CPUs, the load on them.

A CPU step runs each op on PyTorch's intra-op (OpenMP) pool and waits for every thread of it; when
other processes hold the cores, a descheduled thread holds up every op. So the record keeps the
threads, the CPUs this process may use and the 1-minute load average around the timed steps, and
`measure.threads` lets a user choose fewer threads than PyTorch's default (one per core).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> float:
    """The 1-minute load average: runnable (and, on Linux, uninterruptible) tasks, smoothed."""
    return os.getloadavg()[0]


@dataclass(frozen=True)
class MachineLoad:
    """Threads and load while steps were timed: the figures a reader needs to trust a time."""

    threads: int  # PyTorch intra-op threads
    interop_threads: int
    cpus: int
    load_before: float
    load_after: float


def machine_load(load_before: float) -> MachineLoad:
    """Threads, CPUs and the load now, beside the load read before the timed steps began."""
    return MachineLoad(
        threads=torch.get_num_threads(),
        interop_threads=torch.get_num_interop_threads(),
        cpus=available_cpus(),
        load_before=load_before,
        load_after=load_average(),
    )


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """`torch.set_num_threads(threads)` inside the block, the previous count restored after;
    None leaves PyTorch's count as it is."""
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
