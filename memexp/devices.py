"""One measurement backend per device kind: what a job's step yields where it runs.

The runner asks `backend_for(spec)` and never names a device. Every backend answers the same
two questions, as figures and never as records (memexp.record writes them):

* `measure(spec, plan)`: the step's FLOPs, its memory, its times (or none), the bytes saved for
  backward, the parameter count, what the plan's storage packed (and, for a lossy storage on a
  real device, the gradients' error; for offloading, its transfers) and, on the fake device,
  what the prediction adds (whether it fits the imagined device, an estimated step time, the
  host memory offloading would use);
* `time_units(spec)`: one timed forward of each recomputable unit, which the adaptive strategy
  records beside the FLOPs it plans with (none where nothing runs);
* `memory_step(spec, plan)`: one step's memory, measured at steady state, which confirms a
  predicted batch (batch=dynamic's buckets); None where nothing runs.

`cpu` and `cuda` run the step and time it; `fake` predicts it on fake tensors (memexp.estimate).
`BACKENDS` is the one place a job's device is looked up, and so the seam for substituting a
backend: the tests inject failures (an error, CUDA out of memory) by wrapping its entries,
never by patching the runner.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from memexp import analytic, sharded_states
from memexp.buckets import BucketTable
from memexp.config import FAKE_DEVICE, PARALLEL_NONE, ExperimentSpec
from memexp.estimate import (
    TIME_SOURCE_ESTIMATE,
    Prediction,
    estimated_step_ms,
    predict_job,
    step_flops_without_checkpointing,
)
from memexp.measure.fidelity import GRADIENT_ERROR_SOURCE, gradient_error
from memexp.measure.flops import CompiledRecompute, step_flops
from memexp.measure.link import HOST_LINK_SOURCE, measure_host_link_gbps, offload_transfer
from memexp.measure.machine import MachineLoad
from memexp.measure.memory import MemoryMeasurement, measure_memory
from memexp.measure.step import measure_on_ranks, measure_step
from memexp.measure.timing import first_step, time_units
from memexp.observe import enter_phase
from memexp.plan import COMPRESSED_KINDS, OFFLOAD_KINDS, CheckpointPlan
from memexp.results import InfeasibleError, NotApplicableError
from memexp.storage import StorageLedger
from memexp.text import format_bytes
from memexp.training import build_workload


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
    storage: dict[str, Any] = field(default_factory=dict)  # `storage_*`: what the storage did
    # What a compiled forward's backward recomputes (memexp.compile_partition), where recorded.
    compiled_recompute: CompiledRecompute | None = None

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

    def memory_step(
        self, spec: ExperimentSpec, plan: CheckpointPlan
    ) -> MemoryMeasurement | None: ...


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
    # Measures the host link's GB/s when a plan offloads to host memory (a GPU's backend).
    host_link_gbps: Callable[[torch.device], float] | None = None

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
        fidelity = measured_fidelity(spec, plan)  # before the job's own model exists
        if spec.parallel.name == PARALLEL_NONE:
            step = measure_step(spec, plan, torch.device(spec.device))
        else:
            enter_phase(f"{spec.parallel.world_size} ranks")
            step = measure_on_ranks(spec, plan, self.process_group)
        timings = step.timings
        storage = {**fidelity, **self._storage_figures(spec, plan, step.storage_ledger)}
        if step.compiled_recompute is not None:
            # The count on fake tensors ran the forward eagerly, recomputing nothing.
            flops += step.compiled_recompute.flops
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
            storage=storage,
            memory=step.memory,
            compiled_recompute=step.compiled_recompute,
        )

    def _storage_figures(
        self, spec: ExperimentSpec, plan: CheckpointPlan, ledger: StorageLedger
    ) -> dict[str, Any]:
        """The ledger of the warm-up and timed steps, per step; for offloading to host memory
        on a GPU, the link measured here and the transfer time it gives."""
        if plan.storage == "keep":
            return {}
        figures = ledger_figures(ledger, measured=True)
        if plan.storage == "host" and self.host_link_gbps is not None:
            gbps = self.host_link_gbps(torch.device(spec.device))
            figures.update(
                storage_host_gbps_measured=gbps,
                storage_host_gbps_source=HOST_LINK_SOURCE,
                **storage_transfer(plan.storage, ledger, gbps, None, through_host=True),
            )
        return figures

    def time_units(self, spec: ExperimentSpec) -> dict[str, float]:
        return time_units(spec)

    def memory_step(self, spec: ExperimentSpec, plan: CheckpointPlan) -> MemoryMeasurement:
        """A warm-up step (the optimizer's state exists after it), then one measured step."""
        if self.host_memory:
            refuse_beyond_host_memory(spec, plan, self.multi_tensor_optimizer)
        work = build_workload(spec, plan, spec.device)
        first_step(work)
        return measure_memory(work)

    def theory(self, spec: ExperimentSpec, plan: CheckpointPlan) -> dict[str, Any]:
        return analytic.figures(spec, plan, self.multi_tensor_optimizer) | sharded_states.figures(
            spec
        )


class PredictedBackend:
    """Predicts the step on fake tensors, following the code paths of the device it imagines."""

    def measure(self, spec: ExperimentSpec, plan: CheckpointPlan) -> Figures:
        if spec.parallel.cpu_offload:
            raise NotApplicableError(
                "parallel.cpu_offload is not predicted: on fake tensors here the host and the "
                "device are one CPU, so offloaded states cannot be told from the rank's own"
            )
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
            storage=predicted_storage(spec, plan, prediction, extras),
            memory=prediction.memory,
        )

    def time_units(self, spec: ExperimentSpec) -> dict[str, float]:
        return {}  # nothing runs, so nothing can be timed

    def memory_step(self, spec: ExperimentSpec, plan: CheckpointPlan) -> None:
        return None  # nothing runs: the prediction is all there is

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


# Why a fake-device record has no gradient error.
FIDELITY_NOT_MEASURED = "not measured: fake tensors hold no values"
TRANSFER_SOURCE = "closed form from fake-tensor bytes"


def measured_fidelity(spec: ExperimentSpec, plan: CheckpointPlan) -> dict[str, Any]:
    """A lossy storage's gradient error, measured on the job's device (memexp.measure.fidelity)."""
    if not plan.storage_kinds & set(COMPRESSED_KINDS):
        return {}
    enter_phase("gradient error")
    error = gradient_error(spec, plan)
    release_memory()
    return {
        "storage_grad_rel_error": error.relative_error,
        "storage_grad_rel_error_worst": error.worst_relative_error,
        "storage_grad_rel_error_worst_parameter": error.worst_parameter,
        "storage_loss": error.loss,
        "storage_reference_loss": error.reference_loss,
        "storage_grad_error_source": GRADIENT_ERROR_SOURCE,
    }


def ledger_figures(ledger: StorageLedger, measured: bool) -> dict[str, Any]:
    """What the storage packed, per step; seconds only where the step really ran."""
    per_step = ledger.per_context()
    figures: dict[str, Any] = {
        "storage_tensors": per_step["tensors"],
        "storage_source_bytes": int(per_step["source_bytes"]),
        "storage_stored_bytes": int(per_step["stored_bytes"]),
        "storage_restored_bytes": int(per_step["restored_bytes"]),
        "storage_steps": ledger.contexts,
    }
    if measured:
        figures.update(storage_pack_ms=per_step["pack_ms"], storage_unpack_ms=per_step["unpack_ms"])
    return figures


def storage_transfer(
    kind: str,
    ledger: StorageLedger,
    host_gbps: float | None,
    disk_gbps: float | None,
    through_host: bool,
) -> dict[str, Any]:
    """Offloading's transfer time per step from the ledger's bytes (memexp.measure.link)."""
    if kind not in OFFLOAD_KINDS:
        return {}
    per_step = ledger.per_context()
    transfer = offload_transfer(
        kind,
        per_step["stored_bytes"],
        per_step["restored_bytes"],
        host_gbps,
        disk_gbps,
        through_host,
    )
    return {f"storage_{key}": value for key, value in transfer.items()}


def predicted_storage(
    spec: ExperimentSpec, plan: CheckpointPlan, prediction: Prediction, extras: dict[str, Any]
) -> dict[str, Any]:
    """The fake device's storage figures: the tracked step's ledger (bytes, no times), the
    transfer time of offloading from the device's bandwidths (added to the estimated step
    time: not overlapped), and why a lossy storage has no gradient error."""
    if plan.storage == "keep" or prediction.storage is None:
        return {}
    figures = ledger_figures(prediction.storage, measured=False)
    if plan.storage in COMPRESSED_KINDS:
        figures["storage_grad_error_note"] = FIDELITY_NOT_MEASURED
    settings = spec.device_settings
    through_host = settings.imagine == "cuda"
    transfer = storage_transfer(
        plan.storage, prediction.storage, settings.host_gbps, settings.disk_gbps, through_host
    )
    if transfer:
        transfer["storage_transfer_source"] = TRANSFER_SOURCE
        if "estimated_step_ms" in extras:
            transfer["storage_estimated_step_with_transfer_ms"] = (
                extras["estimated_step_ms"] + transfer["storage_transfer_ms"]
            )
    elif prediction.storage.stored_bytes and plan.storage in OFFLOAD_KINDS:
        transfer["storage_transfer_note"] = "not estimated: set device.host_gbps/disk_gbps"
    return {**figures, **transfer}


# Keyed by `spec.device` (validation resolves `auto`); the fake device looks its imagined
# device up here too, for the optimizer path it follows.
BACKENDS: dict[str, Backend] = {
    "cpu": MeasuredBackend(
        "perf_counter", multi_tensor_optimizer=False, process_group="gloo", host_memory=True
    ),
    "cuda": MeasuredBackend(
        "cuda_synchronized_perf_counter",
        multi_tensor_optimizer=True,
        process_group="nccl",
        host_link_gbps=measure_host_link_gbps,
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


def confirm_bucket_batches(
    spec: ExperimentSpec, table: BucketTable, plan_for: Callable[[ExperimentSpec], CheckpointPlan]
) -> BucketTable:
    """Each bucket's batch measured once on the job's device, where it is a real one: the table
    with `measured_peak_bytes` filled in (the batches stay as predicted; a measured peak over
    the budget is reported, not stepped down). The fake device's table comes back unchanged."""
    backend = backend_for(spec)
    rows, source = [], None
    for row in table.rows:
        at = replace(spec, seq_len=row.bucket.longest, batch_size=row.batch)
        memory = backend.memory_step(at, plan_for(at))
        if memory is None:
            return table
        release_memory()
        rows.append(replace(row, measured_peak_bytes=memory.peak_bytes))
        source = memory.source
    return replace(table, rows=tuple(rows), measured_source=source)


def release_memory() -> None:
    """Jobs may share a process (Hydra's basic launcher): leave nothing cached for the next one,
    whichever device the job used."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
