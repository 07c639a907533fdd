"""The one adapter over PyTorch's tensor-level memory tracker (a private module).

`torch.distributed._tools.mem_tracker.MemTracker` counts the bytes of every tensor storage
alive under a dispatch mode and files them as parameters, gradients, optimizer state,
activations or temporaries. It works the same on real CPU tensors and under FakeTensorMode,
which is why the CPU and fake devices report exactly the same bytes. Everything that touches
its private names lives here, so an upstream rename breaks one file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.distributed._tools.mem_tracker import MemTracker

# MemTracker's category names → this project's record fields.
CATEGORY_FIELDS = {
    "Parameter": "params_bytes",
    "Buffer": "other_bytes",
    "Gradient": "grads_bytes",
    "Optstate": "optimizer_state_bytes",
    "Activation": "activations_bytes",
    "Temp": "temporaries_bytes",
    "Other": "other_bytes",
}
TOTAL_KEY = "Total"


@dataclass
class TrackedStep:
    """The tracker's answer for one step: the peak, what it was made of, and the path to it."""

    peak_bytes: int
    breakdown: dict[str, int]  # record field name → bytes at the moment of the peak
    phase_bytes: dict[str, int]
    timeline: list[tuple[int, int, str]] = field(default_factory=list)  # (op, bytes, phase)
    # Peaks on devices other than the tracked one (e.g. host memory holding offloaded tensors).
    other_device_peaks: dict[str, int] = field(default_factory=dict)


class _TimelineTracker(MemTracker):
    """MemTracker that also writes down the total after every operator: the step's timeline."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.phase = "setup"
        self.timeline: list[tuple[int, int, str]] = []

    def current_bytes(self) -> int:
        return int(self._curr_mem_snap.get(self.device, {}).get(TOTAL_KEY, 0))

    def _update_peak_stats(self, peak_state: Any) -> None:
        """Keep only the per-device peak, which is all this project reads.

        Upstream also refreshes the peak of every module seen so far after every operator,
        walking a weak-key dictionary of all modules: O(ops × modules), over a minute for a
        32-layer model's step. The per-device peak it keeps is the same either way.
        """
        for device, snapshot in self._curr_mem_snap.items():
            if snapshot[TOTAL_KEY] > self._peak_mem.get(device, 0):
                self._peak_mem[device] = snapshot[TOTAL_KEY]
                self._peak_mem_snap[device] = dict(snapshot)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        result = super().__torch_dispatch__(func, types, args, kwargs)
        self.timeline.append((len(self.timeline), self.current_bytes(), self.phase))
        return result


def optimizer_state_tensors(optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    return [
        value
        for optimizer in optimizers
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    ]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors`, each counted once: a DTensor's are its
    local shard's, padding included, so a rank's sharded parameters count what the rank holds."""
    sizes = {
        storage.data_ptr(): storage.nbytes()
        for tensor in tensors
        for storage in get_untyped_storages(tensor)
    }
    return sum(sizes.values())


class TensorTracker:
    """Track one training step phase by phase: `with tracker.phase("forward"): ...`."""

    def __init__(self, device: torch.device, *tracked: Any) -> None:
        self._tracker = _TimelineTracker(device)
        self._tracker.track_external(*tracked)
        self._optimizers = [t for t in tracked if isinstance(t, torch.optim.Optimizer)]
        self._phase_peaks: dict[str, int] = {}

    def __enter__(self) -> TensorTracker:
        self._tracker.__enter__()
        self._phase_peaks["after_setup"] = self._tracker.current_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        self._tracker.__exit__(*exc)

    def set_phase(self, name: str) -> None:
        self._tracker.phase = name

    def _optimizer_state_bytes(self) -> int:
        """Bytes of the tracked optimizers' state tensors on the tracked device, as tracked."""
        tracker = self._tracker
        sizes: dict[int, int] = {}
        for value in optimizer_state_tensors(self._optimizers):
            if value.device != tracker.device:
                continue
            for storage in get_untyped_storages(value):  # a DTensor's: its local shard's
                info, _ = tracker._WINFO.get(storage, (None, None))
                sizes[id(storage)] = info.mem_consumed if info is not None else 0
        return sum(sizes.values())

    def _breakdown(self, peak_snapshot: dict[Any, int]) -> dict[str, int]:
        """Record fields at the peak, with the optimizer step's scratch tensors as temporaries.

        MemTracker files every tensor made inside `optimizer.step()` as optimizer state, so the
        step's scratch (Adam's sqrt(v) and the division by its bias correction) would otherwise
        inflate the state; whatever exceeds the state tensors' own bytes is scratch.
        """
        breakdown: dict[str, int] = {}
        for category, field_name in CATEGORY_FIELDS.items():
            breakdown[field_name] = breakdown.get(field_name, 0) + int(
                peak_snapshot.get(category, 0)
            )
        if self._optimizers:
            scratch = breakdown["optimizer_state_bytes"] - self._optimizer_state_bytes()
            if scratch > 0:
                breakdown["optimizer_state_bytes"] -= scratch
                breakdown["temporaries_bytes"] += scratch
        return breakdown

    def result(self) -> TrackedStep:
        tracker = self._tracker
        peaks = tracker.get_tracker_snapshot("peak")
        peak_snapshot = peaks.get(tracker.device, {})
        breakdown = self._breakdown(peak_snapshot)
        phase_bytes = dict(self._phase_peaks)
        for op_bytes_phase in tracker.timeline:
            _, allocated, phase = op_bytes_phase
            key = f"{phase}_peak"
            phase_bytes[key] = max(phase_bytes.get(key, 0), allocated)
        phase_bytes["after_step"] = tracker.current_bytes()
        return TrackedStep(
            peak_bytes=int(peak_snapshot.get(TOTAL_KEY, 0)),
            breakdown=breakdown,
            phase_bytes=phase_bytes,
            timeline=list(tracker.timeline),
            other_device_peaks={
                str(device): int(snapshot[TOTAL_KEY])
                for device, snapshot in peaks.items()
                if device != tracker.device
            },
        )
