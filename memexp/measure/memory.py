"""The memory step: one training step run once, separately from the timed ones, and watched.

On the CPU (and under fake tensors) the tensor tracker counts exact bytes per category. On a
GPU the caching allocator's own statistics give the peaks the card really saw (allocator
rounding and caching included); the tracker then runs once more to say where those bytes go.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from memexp.results import (
    SCOPE_FORWARD_BACKWARD,
    SCOPE_STEP,
    SOURCE_CUDA_ALLOCATOR,
    SOURCE_TENSOR_TRACKER,
)
from memexp.training import Workload, backward, forward_loss, optimizer_step

# The phases whose peaks make the forward+backward peak (the forward phase includes the loss).
FORWARD_BACKWARD_PHASES = ("forward", "backward")


@dataclass
class MemoryMeasurement:
    source: str
    peak_bytes: int  # the whole step, optimizer step included
    breakdown: dict[str, int]
    phase_bytes: dict[str, int]
    timeline: list[tuple[int, int, str]]
    timeline_source: str
    peak_reserved_bytes: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    other_device_peaks: dict[str, int] = field(default_factory=dict)  # e.g. offloaded to host
    # Under a process group, every rank's own figures (`rank_figures`), in rank order; the
    # fields above are then those of the rank with the highest step peak (`peak_rank`).
    ranks: list[dict[str, int]] = field(default_factory=list)
    peak_rank: int | None = None

    @property
    def forward_backward_peak_bytes(self) -> int:
        """The peak over forward, loss and backward: where checkpointing acts (the seed's peak).

        Every source records each phase's own peak in `phase_bytes`, so this is their maximum.
        """
        return max(self.phase_bytes[f"{phase}_peak"] for phase in FORWARD_BACKWARD_PHASES)

    def peak_in(self, scope: str) -> int:
        """The peak over `scope` (memexp.results.PEAK_FIELDS: the whole step or forward+backward)."""
        peaks = {
            SCOPE_STEP: self.peak_bytes,
            SCOPE_FORWARD_BACKWARD: self.forward_backward_peak_bytes,
        }
        return peaks[scope]


def rank_figures(measurement: MemoryMeasurement) -> dict[str, int]:
    """One rank's peaks and the breakdown at its peak: what a record keeps of every rank."""
    return {
        "peak_bytes": measurement.peak_bytes,
        "forward_backward_peak_bytes": measurement.forward_backward_peak_bytes,
        **measurement.breakdown,
    }


def across_ranks(measurements: list[MemoryMeasurement]) -> MemoryMeasurement:
    """The step as a job reports it when it ran on several ranks: the rank whose step peak is
    highest (the lowest such rank on a tie) stands for the job, since the device that must hold
    the step is the fullest one; every rank's own figures ride along in `ranks`."""
    peak_rank = max(
        range(len(measurements)), key=lambda rank: (measurements[rank].peak_bytes, -rank)
    )
    return replace(
        measurements[peak_rank],
        ranks=[rank_figures(measurement) for measurement in measurements],
        peak_rank=peak_rank,
    )


def tracked_step(work: Workload, source: str = SOURCE_TENSOR_TRACKER) -> MemoryMeasurement:
    """One step under the tensor tracker: exact bytes of every live tensor, op by op; a
    compiled forward whose graphs run operator by operator runs compiled under it."""
    # Imported here: the tracker's module pulls in torch's compiler stack (~2 s per process).
    from memexp.measure.tracker import TensorTracker

    tracker = TensorTracker(
        work.tokens.device,
        work.model,
        work.optimizer,
        work.tokens,
        work.targets,
        compiled=work.partition is not None,  # the graphs run operator by operator
    )
    with tracker:
        tracker.set_phase("forward")
        loss = forward_loss(work)
        tracker.set_phase("backward")
        backward(loss)
        del loss
        tracker.set_phase("optimizer")
        optimizer_step(work)
    step = tracker.result()
    return MemoryMeasurement(
        source=source,
        peak_bytes=step.peak_bytes,
        breakdown=step.breakdown,
        phase_bytes=step.phase_bytes,
        timeline=step.timeline,
        timeline_source=source,
        other_device_peaks=step.other_device_peaks,
    )


def _allocator_timeline(
    trace: list[dict[str, Any]], boundaries: list[tuple[int, str]], start_bytes: int
) -> list[tuple[int, int, str]]:
    """Replay the allocator's alloc/free trace into allocated bytes after each event."""
    timeline, allocated = [], start_bytes
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            allocated += event["size"]
        elif event["action"] == "free_completed":
            allocated -= event["size"]
        else:
            continue
        phase = next(name for end, name in boundaries if index < end)
        timeline.append((len(timeline), allocated, phase))
    return timeline


def cuda_allocator_step(work: Workload) -> MemoryMeasurement:
    """One step watched by the CUDA caching allocator: peaks per phase and the alloc/free trace."""
    device = work.tokens.device
    index = device.index if device.index is not None else torch.cuda.current_device()
    cuda = torch.cuda
    cuda.synchronize(device)
    cuda.reset_peak_memory_stats(device)
    after_setup = cuda.memory_allocated(device)
    cuda.memory._record_memory_history(context=None, stacks="python", max_entries=1_000_000)
    peaks: dict[str, int] = {"after_setup": after_setup}
    reserved = cuda.memory_reserved(device)
    boundaries: list[tuple[int, str]] = []

    def close_phase(name: str) -> None:
        nonlocal reserved
        cuda.synchronize(device)
        peaks[f"{name}_peak"] = cuda.max_memory_allocated(device)
        reserved = max(reserved, cuda.max_memory_reserved(device))
        boundaries.append((len(cuda.memory._snapshot()["device_traces"][index]), name))
        cuda.reset_peak_memory_stats(device)

    try:
        loss = forward_loss(work)
        close_phase("forward")
        backward(loss)
        del loss
        close_phase("backward")
        optimizer_step(work)
        close_phase("optimizer")
        peaks["after_step"] = cuda.memory_allocated(device)
        trace = cuda.memory._snapshot()["device_traces"][index]
    finally:
        cuda.memory._record_memory_history(enabled=None)
    boundaries[-1] = (len(trace) + 1, "optimizer")
    breakdown = tracked_step(work).breakdown
    return MemoryMeasurement(
        source=SOURCE_CUDA_ALLOCATOR,
        peak_bytes=max(v for k, v in peaks.items() if k.endswith("_peak")),
        breakdown=breakdown,
        phase_bytes=peaks,
        timeline=_allocator_timeline(trace, boundaries, after_setup),
        timeline_source=SOURCE_CUDA_ALLOCATOR,
        peak_reserved_bytes=reserved,
        notes={"breakdown_source": SOURCE_TENSOR_TRACKER},
    )


def measure_memory(work: Workload) -> MemoryMeasurement:
    if work.tokens.device.type == "cuda":
        return cuda_allocator_step(work)
    return tracked_step(work)
