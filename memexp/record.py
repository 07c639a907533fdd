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

from memexp.buckets import BucketTable
from memexp.config import PARALLEL_NONE, ExperimentSpec
from memexp.devices import Figures, StepTimes
from memexp.estimate import TIME_SOURCE_ESTIMATE, BatchSearch
from memexp.measure.flops import FLOPS_SOURCE
from memexp.measure.memory import MemoryMeasurement
from memexp.measure.saved import OP_POLICY_NOTE, SAVED_SOURCE, STORED_LAYERS_NOTE
from memexp.plan import CheckpointPlan
from memexp.results import SOURCE_FAKE_TENSORS, STATUS_OK, RunResult, write_json_atomic
from memexp.strategies.base import Outcome
from memexp.sweepdir import TIMELINE_FILE
from memexp.text import aligned_table, format_bytes, format_mib


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


def bucket_rows(table: BucketTable) -> list[dict[str, Any]]:
    """One dict per bucket, shortest first: the record's `extra.dynamic_batch.buckets`."""
    return [
        {
            "shortest_len": row.bucket.shortest,
            "longest_len": row.bucket.longest,
            "sequences": row.bucket.sequences,
            "tokens": row.bucket.tokens,
            "batch": row.batch,
            "whole_bucket": row.whole_bucket,
            "tokens_per_step": row.tokens_per_step,
            "padding_pct": row.padding_pct,
            "steps": row.steps,
            "predicted_peak_bytes": row.predicted_peak_bytes,
            "measured_peak_bytes": row.measured_peak_bytes,
        }
        for row in table.rows
    ]


def write_bucket_table(result: RunResult, table: BucketTable) -> None:
    """batch=dynamic's table as `extra.dynamic_batch`: its buckets (a list: the sweep's
    `dynamic_batch_buckets.csv`) and the comparison with one fixed batch at the longest length."""
    result.extra["dynamic_batch"] = {
        "lengths_file": table.buckets.source,
        "bucket_rule": table.buckets.rule,
        "budget_bytes": table.budget_bytes,
        "source": table.source,
        "imagines": table.imagine,
        "measured_source": table.measured_source,
        "sequences": table.buckets.sequences,
        "tokens": table.buckets.tokens,
        "longest_len": table.buckets.longest,
        "bucket_count": len(table.rows),
        "fixed_batch": table.fixed_batch,
        "fixed_peak_bytes": table.fixed_peak_bytes,
        "fixed_steps": table.fixed_steps,
        "steps": table.steps,
        "fixed_padding_pct": table.fixed_padding_pct,
        "padding_pct": table.padding_pct,
        "padding_saved_tokens": table.padding_saved_tokens,
        "padding_saved_pct": table.padding_saved_pct,
        "fixed_tokens_per_step": table.fixed_tokens_per_step,
        "tokens_per_step": table.tokens_per_step,
        "tokens_per_step_gain": table.tokens_per_step_gain,
        "buckets": bucket_rows(table),
    }


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
    result.extra.update(figures.storage)
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
    if plan.uses_op_policy or plan.stored or plan.stored_units:
        result.saved_activation_bytes = None
        result.extra["saved_activation_note"] = (
            OP_POLICY_NOTE if plan.uses_op_policy else STORED_LAYERS_NOTE
        )
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
    parallel = spec.parallel
    ranks = (
        "" if parallel.name == PARALLEL_NONE else f" parallel={parallel.name}/{parallel.world_size}"
    )
    return (
        f"{spec.model.name} strategy={spec.strategy.name} seq={spec.seq_len} "
        f"batch={spec.batch_size} device={spec.device} precision={spec.precision}{ranks}; "
        f"plan: {plan.describe()}"
    )


def describe_bucket_table(table: BucketTable) -> str:
    """batch=dynamic's table as a job prints it: units in the headers, each peak's source."""
    measured = table.measured_source is not None
    header = [
        "lengths",
        "sequences",
        "batch",
        "tokens/step",
        "padding %",
        "steps",
        f"peak MiB ({table.source})",
        *([f"peak MiB ({table.measured_source})"] if measured else []),
    ]
    rows = [
        [
            f"{row.bucket.shortest}-{row.bucket.longest}",
            f"{row.bucket.sequences:,}",
            f"{row.batch:,}" + (" (all)" if row.whole_bucket else ""),
            f"{row.tokens_per_step:,}",
            f"{row.padding_pct:.1f}",
            f"{row.steps:,}",
            format_mib(row.predicted_peak_bytes),
            *([format_mib(row.measured_peak_bytes)] if measured else []),
        ]
        for row in table.rows
    ]
    buckets = table.buckets
    return "\n".join(
        [
            f"dynamic batching: {buckets.sequences:,} sequences ({buckets.tokens:,} "
            f"tokens) from {buckets.source}, buckets by {buckets.rule}, budget "
            f"{format_bytes(table.budget_bytes)}, peaks predicted on {table.source} imagining "
            f"{table.imagine}" + (f", measured by {table.measured_source}" if measured else ""),
            aligned_table(header, rows),
            *(
                ["(all): the batch holds the whole bucket; a larger one would carry padding only"]
                if any(row.whole_bucket for row in table.rows)
                else []
            ),
            f"against one fixed batch of {table.fixed_batch} at length "
            f"{buckets.longest} (peak {format_mib(table.fixed_peak_bytes)} MiB): padding {table.fixed_padding_pct:.1f}% -> "
            f"{table.padding_pct:.1f}% of tokens ({table.padding_saved_tokens:,} padding tokens "
            f"saved, {table.padding_saved_pct:.1f}% of its padding); steps per pass "
            f"{table.fixed_steps:,} -> {table.steps:,}, own tokens per step "
            f"{table.fixed_tokens_per_step:,.1f} -> {table.tokens_per_step:,.1f} "
            f"(x{table.tokens_per_step_gain:.2f})",
        ]
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
        f"{describe_storage(result)}"
    )


def describe_storage(result: RunResult) -> str:
    """What the plan's storage did, said after the figures ('' when it kept tensors as made)."""
    extra = result.extra
    if "storage_stored_bytes" not in extra:
        return ""
    kind = result.plan.storage if result.plan is not None else "?"
    text = (
        f"; storage {kind}: {format_bytes(extra['storage_stored_bytes'])} stored of "
        f"{format_bytes(extra['storage_source_bytes'])} as made per step"
    )
    if "storage_pack_ms" in extra:
        text += (
            f" (pack {extra['storage_pack_ms']:.1f} ms, unpack {extra['storage_unpack_ms']:.1f} "
            f"ms, read back {format_bytes(extra['storage_restored_bytes'])})"
        )
    if "storage_grad_rel_error" in extra:
        text += (
            f", gradient error {extra['storage_grad_rel_error']:.3%} (worst "
            f"{extra['storage_grad_rel_error_worst']:.3%} in "
            f"{extra['storage_grad_rel_error_worst_parameter']})"
        )
    if "storage_grad_error_note" in extra:
        text += f", gradient error {extra['storage_grad_error_note']}"
    if "storage_transfer_ms" in extra:
        links = " then ".join(
            f"{name} {gbps:g} GB/s" for name, gbps in extra["storage_transfer_links"].items()
        )
        source = extra.get("storage_transfer_source", extra.get("storage_host_gbps_source"))
        text += (
            f"; transfer ≈ {extra['storage_transfer_out_ms']:.2f} ms out + "
            f"{extra['storage_transfer_back_ms']:.2f} ms back over {links} ({source}; not "
            "overlapped with compute)"
        )
    if "storage_transfer_note" in extra:
        text += f"; transfer {extra['storage_transfer_note']}"
    return text


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
    return text + describe_storage(result)
