"""The one adapter over PyTorch's tensor-level memory trackers (private modules).

`torch.distributed._tools.mem_tracker.MemTracker` counts the bytes of every tensor storage
alive under a dispatch mode and files them as parameters, gradients, optimizer state,
activations or temporaries. It works the same on real CPU tensors and under FakeTensorMode,
which is why the CPU and fake devices report exactly the same bytes. Its FSDP2 flavour,
`fsdp2_mem_tracker.FSDPMemTracker`, tells one rank's sharded parameters and gradients from the
unsharded ones a layer gathers, and counts the all-gather and reduce-scatter buffers; it is
used whenever the model is sharded with `fully_shard`. Everything that touches their private
names lives here, so an upstream rename breaks one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed._tools.mod_tracker import ModTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

# The trackers' category names → this project's record fields. Under sharding, `params_bytes`
# and `grads_bytes` are the rank's own shards; what is gathered for compute is apart.
CATEGORY_FIELDS = {
    "Parameter": "params_bytes",
    "Sharded Param": "params_bytes",
    "Unsharded Param": "unsharded_params_bytes",
    "Buffer": "other_bytes",
    "Gradient": "grads_bytes",
    "Sharded Grad": "grads_bytes",
    "Unsharded Grad": "unsharded_grads_bytes",
    "Optstate": "optimizer_state_bytes",
    "OptState": "optimizer_state_bytes",
    "Activation": "activations_bytes",
    "Temp": "temporaries_bytes",
    "All Gather": "communication_bytes",
    "Reduce Scatter": "communication_bytes",
    "Inputs": "other_bytes",
    "Other": "other_bytes",
}
# The fields only a sharded step has: absent (None in the record) from a one-device step.
SHARDED_FIELDS = ("unsharded_params_bytes", "unsharded_grads_bytes", "communication_bytes")
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


class _Timeline:
    """Mixed into a tracker: it also writes down the total after every operator (the step's
    timeline) and keeps only the per-device peak."""

    _curr_mem_snap: dict[Any, dict[str, int]]
    _peak_mem: dict[Any, int]
    _peak_mem_snap: dict[Any, dict[str, int]]

    def _start_timeline(self, device: torch.device) -> None:
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
        result = super().__torch_dispatch__(func, types, args, kwargs)  # type: ignore[misc]
        if result is not NotImplemented:  # DTensor ops come back desugared into local ones
            self.timeline.append((len(self.timeline), self.current_bytes(), self.phase))
        return result


class _TimelineTracker(_Timeline, MemTracker):
    """MemTracker with the timeline: a step on one device, or one replicated rank's."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self._start_timeline(device)


class _ModulesUnhooked(ModTracker):
    """ModTracker that registers no module hooks; it still tells forward from backward
    (`is_bw`), which is all MemTracker needs to file activations apart from temporaries.

    A compiled forward runs no module but the root one, whose forward hook would put a
    multi-grad hook on the logits; with it there, autograd copies every gradient the compiled
    backward returns instead of taking it (measured on `tiny`: 28 parameter-sized copies, all
    alive at the end of the backward), which the step never does untracked.
    """

    def __enter__(self) -> _ModulesUnhooked:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class _CompiledTimelineTracker(_TimelineTracker):
    """The plain tracker letting compiled code run under it (torch.compile otherwise runs a frame
    eagerly under a dispatch mode): it then sees every operator of a compiled step whose graphs
    run operator by operator (memexp.compile_partition), the compiled step's own tensors. It
    hooks no module (`_ModulesUnhooked`); the parameters' gradient hooks, which file gradients
    as such, it installs itself."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self._mod_tracker = _ModulesUnhooked()

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def track_external(self, *external: Any) -> None:
        super().track_external(*external)
        for module in external:
            if isinstance(module, nn.Module):
                self._track_module_params_and_buffers(module, install_grad_hooks=True)


class _ShardedTimelineTracker(_Timeline, FSDPMemTracker):
    """FSDPMemTracker with the timeline: one rank's step of a model sharded by `fully_shard`."""

    def __init__(
        self, device: torch.device, model: FSDPModule, optimizer: torch.optim.Optimizer
    ) -> None:
        super().__init__(model, optimizer)  # type: ignore[call-arg]
        self._start_timeline(device)


def _stepping_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the state: ZeRO-1's wrapper steps a local one over its shard."""
    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A rank's own part of a sharded tensor (a DTensor's local shard); any other as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class TensorTracker:
    """Track one training step phase by phase: `tracker.set_phase("forward")` and so on.

    `tracked` are the step's model, optimizer and input tensors; a model sharded by
    `fully_shard` is tracked by FSDP2's tracker, everything else by the plain one, which with
    `compiled` lets a compiled forward run compiled under it and watches its graphs' operators.
    """

    def __init__(self, device: torch.device, *tracked: Any, compiled: bool = False) -> None:
        optimizers = [
            _stepping_optimizer(t) for t in tracked if isinstance(t, torch.optim.Optimizer)
        ]
        others = [t for t in tracked if not isinstance(t, torch.optim.Optimizer)]
        sharded = [t for t in others if isinstance(t, FSDPModule)]
        self._tracker: _TimelineTracker | _ShardedTimelineTracker
        if sharded:
            self._tracker = _ShardedTimelineTracker(device, sharded[0], *optimizers)
            self._tracker.track_inputs(tuple(t for t in others if isinstance(t, torch.Tensor)))
        else:
            self._tracker = (_CompiledTimelineTracker if compiled else _TimelineTracker)(device)
            self._tracker.track_external(*optimizers, *others)
        self._optimizers = optimizers
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
        for optimizer in self._optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.device == tracker.device:
                        storage = _local(value).untyped_storage()
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
        sharded = isinstance(self._tracker, _ShardedTimelineTracker)
        for category, field_name in CATEGORY_FIELDS.items():
            if field_name in SHARDED_FIELDS and not sharded:
                continue
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
