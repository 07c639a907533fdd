"""The one room that writes figures into a RunResult, and the line a job prints about them.

Measurement, prediction and planning return figures; only this module turns them into the
record's fields (identity, plan, FLOPs, memory and its timeline, times, saved bytes, the fake
device's prediction extras, the analytic figures, a strategy's own record content), so every
rule about what a field holds lives in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memexp.config import ExperimentSpec
from memexp.devices import Figures, StepTimes
from memexp.estimate import TIME_SOURCE_ESTIMATE, BatchSearch
from memexp.measure.flops import FLOPS_SOURCE
from memexp.measure.memory import MemoryMeasurement
from memexp.measure.saved import OP_POLICY_NOTE, SAVED_SOURCE
from memexp.plan import CheckpointPlan
from memexp.results import SOURCE_FAKE_TENSORS, STATUS_OK, RunResult, write_json_atomic
from memexp.strategies.base import Outcome
from memexp.sweepdir import TIMELINE_FILE
from memexp.text import format_bytes


def write_identity_from_config(result: RunResult, cfg: DictConfig) -> None:
    """What the job was asked to be, before validation: an invalid job's record still says."""
    for field_name, key in (
        ("model", "model.name"),
        ("strategy", "strategy.name"),
        ("seq_len", "seq.len"),
        ("batch_size", "batch.size"),
        ("precision", "precision"),
        ("parallel", "parallel.name"),
        ("world_size", "parallel.world_size"),
    ):
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        setattr(result, field_name, value if isinstance(value, (str, int)) else None)


def write_identity(result: RunResult, spec: ExperimentSpec) -> None:
    result.model = spec.model.name
    result.strategy = spec.strategy.name
    result.attention = spec.model.attention
    result.seq_len = spec.seq_len
    result.batch_size = spec.batch_size
    result.device = spec.device
    result.precision = spec.precision
    result.optimizer = spec.optimizer.name
    result.seed = spec.seed
    result.parallel = spec.parallel.name
    result.world_size = spec.parallel.world_size


def write_batch_search(result: RunResult, search: BatchSearch) -> None:
    """batch=auto's search; when even the first batch did not fit, its peak is the record's."""
    result.extra.update(
        auto_batch_budget_bytes=search.budget_bytes,
        auto_batch_probes=[[batch, peak] for batch, peak in search.probes.items()],
        auto_batch_source=SOURCE_FAKE_TENSORS,
        auto_batch_imagines=search.imagine,
    )
    if search.batch_size is None:
        result.peak_bytes, result.memory_source = search.peak_bytes, SOURCE_FAKE_TENSORS
        return
    result.extra.update(
        auto_batch_size=search.batch_size,
        auto_batch_predicted_peak_bytes=search.peak_bytes,
        auto_batch_headroom_bytes=search.headroom_bytes,
        auto_batch_next_peak_bytes=search.probes.get(search.batch_size + 1),
        auto_batch_limit_reached=search.limit_reached,
    )


def write_plan(result: RunResult, plan: CheckpointPlan, theory: dict[str, Any]) -> None:
    """The plan about to be measured and what the closed forms say of it (memexp.analytic)."""
    result.plan = plan
    result.plan_summary = plan.describe()
    result.extra.update(theory)


def write_figures(result: RunResult, plan: CheckpointPlan, figures: Figures, job_dir: Path) -> None:
    """Everything `plan`'s step yielded; the memory timeline goes to its own file beside."""
    _write_flops(result, figures)
    result.param_count = figures.param_count
    result.loss_first_step = figures.loss_first_step
    result.time_source = figures.time_source
    if figures.times is not None:
        _write_times(result, figures.times)
    _write_saved_bytes(result, plan, figures.saved_activation_bytes)
    result.extra.update(figures.prediction)
    _write_memory(result, figures.memory, job_dir)


def write_outcome(result: RunResult, outcome: Outcome) -> None:
    """The strategy's own record content (adaptive's `extra["adaptive"]`)."""
    result.extra.update(outcome.extra)


def _write_flops(result: RunResult, figures: Figures) -> None:
    with_plan, without = figures.flops_step, figures.flops_step_no_checkpoint
    result.flops_step = with_plan
    result.flops_step_no_checkpoint = without
    result.flops_recompute = with_plan - without
    result.recompute_flops_pct = 100.0 * (with_plan - without) / without
    result.flops_source = FLOPS_SOURCE


def _write_times(result: RunResult, times: StepTimes) -> None:
    result.time_warmup = times.warmup
    result.time_repeats = times.steps
    result.time_stable = times.stable
    machine = times.machine
    result.time_threads = machine.threads
    result.time_interop_threads = machine.interop_threads
    result.time_cpus = machine.cpus
    result.time_load_before = machine.load_before
    result.time_load_after = machine.load_after
    for key, value in times.summary.items():
        setattr(result, key, value)


def _write_saved_bytes(result: RunResult, plan: CheckpointPlan, counted: int | None) -> None:
    """The count, unless the plan keeps tensors where saved-tensor hooks cannot see them."""
    result.saved_source = SAVED_SOURCE
    if plan.op_policy:
        result.saved_activation_bytes = None
        result.extra["saved_activation_note"] = OP_POLICY_NOTE
    else:
        result.saved_activation_bytes = counted


def _write_memory(result: RunResult, memory: MemoryMeasurement, job_dir: Path) -> None:
    result.memory_source = memory.source
    result.peak_bytes = memory.peak_bytes
    result.forward_backward_peak_bytes = memory.forward_backward_peak_bytes
    result.peak_reserved_bytes = memory.peak_reserved_bytes
    for field_name, value in memory.breakdown.items():
        setattr(result, field_name, value)
    result.phase_bytes = memory.phase_bytes
    result.rank_memory = memory.ranks or None
    result.peak_rank = memory.peak_rank
    result.extra.update(memory.notes)
    timeline = {"source": memory.timeline_source, "unit": "bytes", "events": memory.timeline}
    write_json_atomic(job_dir / TIMELINE_FILE, timeline)
    result.timeline_file = TIMELINE_FILE


# --- the lines a job prints ----------------------------------------------------------------


def describe_job(spec: ExperimentSpec, plan: CheckpointPlan) -> str:
    return (
        f"{spec.model.name} strategy={spec.strategy.name} seq={spec.seq_len} "
        f"batch={spec.batch_size} device={spec.device} precision={spec.precision}; "
        f"plan: {plan.describe()}"
    )


def describe_outcome(result: RunResult) -> str:
    """A failure's message; a prediction said as one (fake tensors); else the measured figures."""
    if result.status != STATUS_OK:
        return f"{result.status}: {result.message}"
    if result.memory_source == SOURCE_FAKE_TENSORS:
        return describe_prediction(result)
    ranks = ""
    if result.rank_memory:
        ranks = f" on the fullest of {len(result.rank_memory)} ranks (rank {result.peak_rank})"
    return (
        f"step peak {format_bytes(result.peak_bytes)}, fwd+bwd peak "
        f"{format_bytes(result.forward_backward_peak_bytes)} ({result.memory_source}){ranks}, "
        f"saved activations {format_bytes(result.saved_activation_bytes)} ({result.saved_source}), "
        f"step {result.step_ms_median:.1f} ms median of {result.time_repeats} "
        f"[{result.step_ms_min:.1f}-{result.step_ms_max:.1f}]"
        f"{'' if result.time_stable else ' (not stable)'}, {result.time_threads} thread(s), "
        f"load {result.time_load_after:.1f} on {result.time_cpus} CPU(s), "
        f"recompute {result.recompute_flops_pct:.1f}% FLOPs"
    )


def describe_prediction(result: RunResult) -> str:
    """The one line a fake-device job prints: predicted, with its sources, never 'measured'."""
    extra = result.extra
    text = (
        f"predicted step peak {format_bytes(result.peak_bytes)}, fwd+bwd peak "
        f"{format_bytes(result.forward_backward_peak_bytes)} ({result.memory_source}), "
        f"saved activations {format_bytes(result.saved_activation_bytes)}, "
        f"recompute {result.recompute_flops_pct:.1f}% FLOPs"
    )
    if "offloaded_host_peak_bytes" in extra:
        text += f", host memory peak {format_bytes(extra['offloaded_host_peak_bytes'])} (offloaded)"
    if "device_memory_bytes" in extra:
        verdict = "fits" if extra["fits_device_memory"] else "does NOT fit"
        text += (
            f"; {verdict} in {format_bytes(extra['device_memory_bytes'])} "
            f"(headroom {format_bytes(extra['device_headroom_bytes'])})"
        )
    if "estimated_step_ms" in extra:
        text += (
            f"; step ≈ {extra['estimated_step_ms']:,.1f} ms ({TIME_SOURCE_ESTIMATE}: "
            f"{extra['estimate_utilization']:.0%} of {extra['estimate_peak_tflops']:g} TFLOP/s)"
        )
    return text
