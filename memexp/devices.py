"""One measurement backend per device kind: what a job's step yields where it runs.

The runner asks `backend_for(spec)` and never names a device. Every backend answers the same
two questions, as figures and never as records (memexp.record writes them):

* `measure(spec, plan)`: the step's FLOPs, its memory, its times (or none), the bytes saved for
  backward, the parameter count and, on the fake device, what the prediction adds (whether it
  fits the imagined device, an estimated step time, the host memory offloading would use);
* `time_units(spec)`: one timed forward of each recomputable unit, which the adaptive strategy
  records beside the FLOPs it plans with (none where nothing runs).

`cpu` and `cuda` run the step and time it; `fake` predicts it on fake tensors (memexp.estimate).
`BACKENDS` is the one place a job's device is looked up, and so the seam for substituting a
backend: the tests inject failures (an error, CUDA out of memory) by wrapping its entries,
never by patching the runner.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from memexp import analytic, sharded_states
from memexp.config import FAKE_DEVICE, PARALLEL_NONE, ExperimentSpec
from memexp.estimate import (
    TIME_SOURCE_ESTIMATE,
    Prediction,
    estimated_step_ms,
    predict_job,
    step_flops_without_checkpointing,
)
from memexp.measure.flops import step_flops
from memexp.measure.machine import MachineLoad
from memexp.measure.memory import MemoryMeasurement
from memexp.measure.step import measure_on_ranks, measure_step
from memexp.measure.timing import time_units
from memexp.observe import enter_phase
from memexp.plan import CheckpointPlan
from memexp.results import InfeasibleError, NotApplicableError
from memexp.text import format_bytes


@dataclass(frozen=True)
class StepTimes:
    """Timed steps: `summary` holds `<phase>_ms_median/min/max`, `step_ms_iqr` and
    `tokens_per_s_median`; `steps` were timed, `stable` says whether the rule's IQR was met
    before its time cap, `machine` the threads and load they ran under."""

    warmup: int
    steps: int
    stable: bool
    machine: MachineLoad
    summary: dict[str, float]


@dataclass
class Figures:
    """Everything one plan's step yielded on a device; `None` where the device has no such figure."""

    flops_step: int  # forward, loss and backward, recomputation included
    flops_step_no_checkpoint: int  # the same step with nothing recomputed
    memory: MemoryMeasurement
    param_count: int
    saved_activation_bytes: int | None  # as counted; the record room applies the op-policy rule
    time_source: str | None = None
    times: StepTimes | None = None
    loss_first_step: float | None = None
    prediction: dict[str, Any] = field(default_factory=dict)  # the fake device's extras

    @property
    def peak_bytes(self) -> int:
        return self.memory.peak_bytes

    @property
    def flops_recompute(self) -> int:
        return self.flops_step - self.flops_step_no_checkpoint


class Backend(Protocol):
    def measure(self, spec: ExperimentSpec, plan: CheckpointPlan) -> Figures: ...

    def time_units(self, spec: ExperimentSpec) -> dict[str, float]: ...

    def theory(self, spec: ExperimentSpec, plan: CheckpointPlan) -> dict[str, Any]: ...


def flops_without_checkpointing(spec: ExperimentSpec, plan: CheckpointPlan, with_plan: int) -> int:
    """A plan that recomputes nothing is its own baseline: no second count."""
    return step_flops_without_checkpointing(spec) if plan.recomputes_anything else with_plan


@dataclass(frozen=True)
class MeasuredBackend:
    """Runs the step on the job's device: timed steps, then one tracked memory step; under a
    `parallel` mode on every rank of a `process_group` of `parallel.world_size` processes
    (memexp.ranks: started here, or by the cluster), each rank on its own device.

    `host_memory`: the step allocates in host memory, where running out does not fail cleanly
    (the process swaps or the kernel kills it), so a step whose closed-form floor exceeds the
    memory available is refused before anything is allocated. It also means there is no other
    memory to offload the sharded state to.
    """

    time_source: str
    multi_tensor_optimizer: bool  # PyTorch's default optimizer path for this device's tensors
    process_group: str  # torch.distributed's backend between ranks on this device
    host_memory: bool = False

    def measure(self, spec: ExperimentSpec, plan: CheckpointPlan) -> Figures:
        if self.host_memory:
            refuse_beyond_host_memory(spec, plan, self.multi_tensor_optimizer)
            if spec.parallel.cpu_offload:
                raise NotApplicableError(
                    "parallel.cpu_offload moves the sharded state to host memory, where a "
                    f"device={spec.device} step already keeps it"
                )
        enter_phase("count FLOPs")
        flops = step_flops(spec, plan)  # on fake tensors, before the real model exists
        without = flops_without_checkpointing(spec, plan, flops)
        if spec.parallel.name == PARALLEL_NONE:
            step = measure_step(spec, plan, torch.device(spec.device))
        else:
            enter_phase(f"{spec.parallel.world_size} ranks")
            step = measure_on_ranks(spec, plan, self.process_group)
        timings = step.timings
        return Figures(
            flops_step=flops,
            flops_step_no_checkpoint=without,
            param_count=step.param_count,
            time_source=self.time_source,
            times=StepTimes(
                warmup=spec.measure.warmup,
                steps=timings.steps,
                stable=timings.stable,
                machine=timings.machine,
                summary=timings.summary(spec.tokens_per_step),
            ),
            loss_first_step=timings.first_loss,
            saved_activation_bytes=timings.saved_activation_bytes,
            memory=step.memory,
        )

    def time_units(self, spec: ExperimentSpec) -> dict[str, float]:
        return time_units(spec)

    def theory(self, spec: ExperimentSpec, plan: CheckpointPlan) -> dict[str, Any]:
        return analytic.figures(spec, plan, self.multi_tensor_optimizer) | sharded_states.figures(
            spec
        )


class PredictedBackend:
    """Predicts the step on fake tensors, following the code paths of the device it imagines."""

    def measure(self, spec: ExperimentSpec, plan: CheckpointPlan) -> Figures:
        enter_phase("predict")
        prediction = predict_job(spec, plan)
        time_source, extras = prediction_extras(spec, prediction)
        return Figures(
            flops_step=prediction.flops_step,
            flops_step_no_checkpoint=flops_without_checkpointing(spec, plan, prediction.flops_step),
            param_count=prediction.param_count,
            saved_activation_bytes=prediction.saved_activation_bytes,
            time_source=time_source,
            prediction=extras,
            memory=prediction.memory,
        )

    def time_units(self, spec: ExperimentSpec) -> dict[str, float]:
        return {}  # nothing runs, so nothing can be timed

    def theory(self, spec: ExperimentSpec, plan: CheckpointPlan) -> dict[str, Any]:
        return BACKENDS[spec.imagined_device].theory(spec, plan)


def prediction_extras(spec: ExperimentSpec, prediction: Prediction) -> tuple[str | None, dict]:
    """The time source (an estimate from FLOPs, when a peak rate is given) and what a prediction
    adds to the record: host memory under offloading, the fit in the imagined device's memory,
    the estimated step time. Measured time fields stay empty: nothing was timed."""
    settings = spec.device_settings
    extra: dict[str, Any] = {"fake_imagines": settings.imagine}
    if prediction.host_peak_bytes is not None:
        extra["offloaded_host_peak_bytes"] = prediction.host_peak_bytes
    if spec.device_memory_bytes is not None:
        headroom = spec.device_memory_bytes - prediction.memory.peak_bytes
        extra.update(
            device_memory_bytes=spec.device_memory_bytes,
            fits_device_memory=headroom >= 0,
            device_headroom_bytes=headroom,
        )
    if settings.peak_tflops is None:
        return None, extra
    step_ms = estimated_step_ms(prediction.flops_step, settings.peak_tflops, settings.utilization)
    extra.update(
        estimated_step_ms=step_ms,
        estimated_tokens_per_s=spec.tokens_per_step / (step_ms / 1e3),
        estimate_peak_tflops=settings.peak_tflops,
        estimate_utilization=settings.utilization,
    )
    return TIME_SOURCE_ESTIMATE, extra


# Keyed by `spec.device` (validation resolves `auto`); the fake device looks its imagined
# device up here too, for the optimizer path it follows.
BACKENDS: dict[str, Backend] = {
    "cpu": MeasuredBackend(
        "perf_counter", multi_tensor_optimizer=False, process_group="gloo", host_memory=True
    ),
    "cuda": MeasuredBackend(
        "cuda_synchronized_perf_counter", multi_tensor_optimizer=True, process_group="nccl"
    ),
    FAKE_DEVICE: PredictedBackend(),
}


MEMINFO = Path("/proc/meminfo")
# How an allocation failure reads on each device: CUDA raises its own type, the CPU allocator a
# RuntimeError with this message.
CPU_ALLOCATION_FAILURE = "can't allocate memory"


def available_host_memory() -> int | None:
    """Bytes the kernel says a new allocation can take without swapping (`MemAvailable`);
    None where that is not known."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def refuse_beyond_host_memory(
    spec: ExperimentSpec, plan: CheckpointPlan, multi_tensor: bool
) -> None:
    """InfeasibleError, with both figures, when the step's closed-form floor (memexp.analytic:
    the optimizer step's peak, or the weights, optimizer state, batch and activations the
    forward keeps, whichever is larger) exceeds the host memory available now."""
    available = available_host_memory()
    if available is None:
        return
    floor = analytic.step_floor_bytes(spec, plan, multi_tensor)
    if floor > available:
        raise InfeasibleError(
            f"the step needs at least {format_bytes(floor)} (closed form: "
            f"{analytic.STEP_FLOOR_RULE}), more than the {format_bytes(available)} of host "
            "memory available (MemAvailable); nothing was allocated. Predict it instead with "
            "device=fake"
        )


def is_out_of_memory(error: BaseException) -> bool:
    """An allocation that failed, on any device: CUDA's OutOfMemoryError or the CPU allocator's."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and CPU_ALLOCATION_FAILURE in str(error)
    )


def backend_for(spec: ExperimentSpec) -> Backend:
    return BACKENDS[spec.device]


def release_memory() -> None:
    """Jobs may share a process (Hydra's basic launcher): leave nothing cached for the next one,
    whichever device the job used."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
