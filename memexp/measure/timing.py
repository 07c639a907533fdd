"""Timed training steps with nothing attached to the model: warm-up first, then repeats.

Each phase (forward+loss, backward, optimizer step) is timed on its own within one real training
step; on a GPU the device is synchronised at every boundary so a phase's time is its own work, not
queued work. Steps repeat until the step time is stable or a time cap is spent (`StoppingRule`),
and the threads and machine load they ran under are kept beside them (memexp.measure.machine).
Each timed step is reported, after its clock stopped, to the job's observer (`memexp.observe`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark.utils.common import Measurement, TaskSpec

from memexp.config import ExperimentSpec, MeasureConfig
from memexp.measure.machine import MachineLoad, load_average, machine_load
from memexp.measure.saved import counting_saved_bytes
from memexp.model import LayerUnits
from memexp.observe import current_observer, enter_phase
from memexp.plan import LAYER
from memexp.storage import in_place_storage, saved_tensor_storage
from memexp.training import (
    Workload,
    autocast_context,
    backward,
    build_model,
    forward_loss,
    optimizer_step,
    train_step,
)

PHASES = ("forward", "backward", "optimizer", "step")


def spread(values_ms: list[float]) -> Measurement:
    """PyTorch's benchmark statistics (median, IQR by linear quantiles) of one phase's samples."""
    return Measurement(1, list(values_ms), TaskSpec(stmt="training step", setup=""))


@dataclass(frozen=True)
class StoppingRule:
    """When timed steps stop: never before `minimum`; then as soon as the step time is stable
    (IQR / median at most `stable_iqr`, as torch.utils.benchmark's adaptive_autorange decides),
    or once the timed steps have taken `max_time_s` seconds in all."""

    minimum: int
    max_time_s: float
    stable_iqr: float

    @classmethod
    def of(cls, measure: MeasureConfig) -> StoppingRule:
        return cls(measure.repeat, measure.max_time_s, measure.stable_iqr)

    @classmethod
    def fixed(cls, steps: int) -> StoppingRule:
        """Exactly `steps` timed steps: no time to spend beyond them."""
        return cls(steps, max_time_s=0.0, stable_iqr=0.0)

    def stable(self, step_ms: list[float]) -> bool:
        stats = spread(step_ms)
        return stats.iqr <= self.stable_iqr * stats.median

    def done(self, step_ms: list[float]) -> bool:
        if len(step_ms) < self.minimum:
            return False
        return self.stable(step_ms) or sum(step_ms) / 1000.0 >= self.max_time_s


@dataclass
class Timings:
    """Milliseconds per phase, one entry per timed step, plus what the untimed first step saw
    and the machine the steps ran on."""

    first_loss: float
    saved_activation_bytes: int
    stable: bool
    machine: MachineLoad
    samples_ms: dict[str, list[float]]

    @property
    def steps(self) -> int:
        return len(self.samples_ms["step"])

    def summary(self, tokens_per_step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for phase, values in self.samples_ms.items():
            stats = spread(values)
            out[f"{phase}_ms_median"] = stats.median
            out[f"{phase}_ms_min"] = min(values)
            out[f"{phase}_ms_max"] = max(values)
        out["step_ms_iqr"] = spread(self.samples_ms["step"]).iqr
        out["tokens_per_s_median"] = tokens_per_step / (out["step_ms_median"] / 1000.0)
        return out


def repeat_until_done(
    step: Callable[[], dict[str, float]], rule: StoppingRule
) -> tuple[dict[str, list[float]], bool]:
    """Run `step` (milliseconds per phase) until `rule` is done; the samples, and whether the
    step time became stable (else the cap stopped it)."""
    samples: dict[str, list[float]] = {p: [] for p in PHASES}
    while not rule.done(samples["step"]):
        for phase, ms in step().items():
            samples[phase].append(ms)
    return samples, rule.stable(samples["step"])


def _clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def synced() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return synced
    return time.perf_counter


def _one_step(work: Workload, now: Callable[[], float]) -> tuple[float, dict[str, float]]:
    start = now()
    loss = forward_loss(work)
    after_forward = now()
    backward(loss)
    after_backward = now()
    optimizer_step(work)
    end = now()
    phases = {
        "forward": after_forward - start,
        "backward": after_backward - after_forward,
        "optimizer": end - after_backward,
        "step": end - start,
    }
    return float(loss.detach()), {k: v * 1000.0 for k, v in phases.items()}


def _forward_counting_saved(work: Workload, for_backward: bool) -> tuple[torch.Tensor, int]:
    """Forward and loss under the saved-bytes count (memexp.measure.saved): the loss, and the
    bytes its forward saved for backward."""
    storage = in_place_storage(work.plan.storage)
    with counting_saved_bytes(work.model, storage, for_backward) as saved_so_far:
        loss = forward_loss(work, in_place=True)
        return loss, saved_so_far()


def forward_saved_bytes(work: Workload) -> int:
    """The bytes the step's forward saves for backward, counted in a forward alone that keeps
    nothing for a backward (its graph goes with its loss): what a prediction counts without
    a warm-up step."""
    return _forward_counting_saved(work, for_backward=False)[1]


def first_step(work: Workload) -> tuple[torch.Tensor, int]:
    """The first warm-up step also counts saved bytes: hooks cost time, and this step is untimed.

    Returns the (detached) loss and the bytes saved for backward; the loss stays a tensor so the
    fake device, whose tensors hold no values, can run the same step.
    """
    loss, saved = _forward_counting_saved(work, for_backward=True)
    backward(loss)
    optimizer_step(work)
    return loss.detach(), saved


def time_steps(work: Workload, warmup: int, rule: StoppingRule) -> Timings:
    """`warmup` untimed steps (the first also counts saved bytes), then timed ones until `rule`
    is done, with the load average read before and after them."""
    now = _clock(work.tokens.device)
    enter_phase("warm-up")
    first_loss, saved = first_step(work)
    for _ in range(warmup - 1):
        train_step(work)
    observer = current_observer()

    def timed_step() -> dict[str, float]:
        _, phases = _one_step(work, now)
        observer.on_step(phases, allocated_bytes(work.tokens.device))
        return phases

    enter_phase("timed steps")
    load_before = load_average()
    samples, stable = repeat_until_done(timed_step, rule)
    return Timings(
        first_loss=float(first_loss),
        saved_activation_bytes=saved,
        stable=stable,
        machine=machine_load(load_before),
        samples_ms=samples,
    )


def allocated_bytes(device: torch.device) -> int | None:
    """Bytes the device's allocator holds for tensors now; None where it keeps no count (CPU)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def _one_layer(spec: ExperimentSpec, device: torch.device) -> tuple[nn.Module, torch.Tensor]:
    """The job's model cut to one layer, and an input for it at the job's batch and sequence:
    any architecture's unit or layer can then be timed alone."""
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = build_model(replace(spec.model, layers=1))
        x = torch.randn(spec.batch_size, spec.seq_len, spec.model.hidden, requires_grad=True)
    return model, x


def time_units(spec: ExperimentSpec) -> dict[str, float]:
    """Milliseconds one forward of each recomputable unit takes on the job's device, timed once
    after a warm-up forward of the layer: what its recomputation costs in time, recorded beside
    the plan with the noise of a single timing."""
    device = torch.device(spec.device)
    now = _clock(device)
    model, x = _one_layer(spec, device)

    def milliseconds(run: Callable[[], Any]) -> float:
        start = now()
        run()
        return (now() - start) * 1000.0

    with autocast_context(spec, device.type):
        units = model.unit_runs(x)
        units[LAYER]()
        return {unit: milliseconds(run) for unit, run in units.items()}


def time_layer_steps(
    spec: ExperimentSpec,
    ways: Mapping[Hashable, tuple[LayerUnits, str | None]],
    repeats: int = 5,
) -> dict[Hashable, Measurement]:
    """One layer's forward and backward on the job's device under each way of running it
    (units recomputed, and a storage kind for what it saves, or None), in milliseconds: what
    each way costs in time, against the way that keeps all, with the spread that says whether
    a difference is more than noise.

    One layer at the job's batch and sequence, so any model that runs can be timed. Each
    repeat runs every way once, in turn, so that a change of machine load falls on all of
    them alike; `repeats` samples each (median and IQR), after one untimed warm-up of each.
    """
    device = torch.device(spec.device)
    now = _clock(device)
    model, x = _one_layer(spec, device)
    with torch.device(device):
        grad = torch.randn(spec.batch_size, spec.seq_len, spec.model.hidden)
    layer = model.layers[0]

    def step_ms(units: LayerUnits, kind: str | None) -> float:
        start = now()
        with autocast_context(spec, device.type), saved_tensor_storage(kind or "keep"):
            out = layer(x, units, *model.layer_inputs(x))
        out.backward(grad)
        elapsed = (now() - start) * 1000.0
        layer.zero_grad(set_to_none=True)
        x.grad = None
        return elapsed

    samples: dict[Hashable, list[float]] = {key: [] for key in ways}
    for round_ in range(repeats + 1):
        for key, (units, kind) in ways.items():
            ms = step_ms(units, kind)
            if round_:  # the first round warms up
                samples[key].append(ms)
    return {key: spread(values) for key, values in samples.items()}
