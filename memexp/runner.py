"""One job: validate, plan, time, measure, record. Whatever happens, a `result.json` is written.

A job that fails is a result too (status `error` or `oom` with its message): the exception never
escapes, so Hydra carries on with the sweep and its end-of-sweep callbacks still run.
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from memexp import analytic
from memexp.config import FAKE_DEVICE, ConfigError, ExperimentSpec
from memexp.configure import validate
from memexp.environment import describe_environment
from memexp.estimate import (
    choose_batch,
    describe_prediction,
    predict_job,
    record_prediction,
    step_flops_without_checkpointing,
)
from memexp.interrupts import describe_interrupt
from memexp.measure.flops import FLOPS_SOURCE, step_flops
from memexp.measure.memory import MemoryMeasurement, measure_memory
from memexp.measure.saved import record_saved_bytes
from memexp.measure.timing import time_steps
from memexp.model import parameter_count
from memexp.plan import CheckpointPlan
from memexp.planner import time_units
from memexp.results import (
    STATUS_ERROR,
    STATUS_INFEASIBLE,
    STATUS_INTERRUPTED,
    STATUS_NOT_APPLICABLE,
    STATUS_OK,
    STATUS_OOM,
    InfeasibleError,
    NotApplicableError,
    RunResult,
    write_json_atomic,
    write_result,
)
from memexp.resume import CONFIG_HASH_KEY, config_hash, keep_previous_record
from memexp.strategies import adaptive, make_plan
from memexp.sweepdir import TIMELINE_FILE
from memexp.text import format_bytes
from memexp.training import build_workload


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fill_identity_from_config(result: RunResult, cfg: DictConfig) -> None:
    """What the job was asked to be, before validation: an invalid job's record still says."""
    for field_name, key in (
        ("model", "model.name"),
        ("strategy", "strategy.name"),
        ("seq_len", "seq.len"),
        ("batch_size", "batch.size"),
        ("precision", "precision"),
    ):
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        setattr(result, field_name, value if isinstance(value, (str, int)) else None)


def _fill_identity(result: RunResult, spec: ExperimentSpec) -> None:
    result.model = spec.model.name
    result.strategy = spec.strategy.name
    result.attention = spec.model.attention
    result.seq_len = spec.seq_len
    result.batch_size = spec.batch_size
    result.device = spec.device
    result.precision = spec.precision
    result.optimizer = spec.optimizer.name
    result.seed = spec.seed


def _record_flops(
    result: RunResult, spec: ExperimentSpec, plan: CheckpointPlan, with_plan: int | None = None
) -> None:
    """`with_plan`: the step's FLOPs when already counted (the fake device counts them)."""
    if with_plan is None:
        with_plan = step_flops(spec, plan)
    without = step_flops_without_checkpointing(spec) if plan.recomputes_anything else with_plan
    result.flops_step = with_plan
    result.flops_step_no_checkpoint = without
    result.flops_recompute = with_plan - without
    result.recompute_flops_pct = 100.0 * (with_plan - without) / without
    result.flops_source = FLOPS_SOURCE


def _record_memory(result: RunResult, memory: MemoryMeasurement, job_dir: Path) -> None:
    result.memory_source = memory.source
    result.peak_bytes = memory.peak_bytes
    result.peak_reserved_bytes = memory.peak_reserved_bytes
    for field_name, value in memory.breakdown.items():
        setattr(result, field_name, value)
    result.phase_bytes = memory.phase_bytes
    result.extra.update(memory.notes)
    timeline = {"source": memory.timeline_source, "unit": "bytes", "events": memory.timeline}
    write_json_atomic(job_dir / TIMELINE_FILE, timeline)
    result.timeline_file = TIMELINE_FILE


def measure_job(
    result: RunResult, spec: ExperimentSpec, plan: CheckpointPlan, job_dir: Path
) -> None:
    """Fill `result` with every figure of one job (FLOPs, times, the memory step, saved bytes)."""
    multi_tensor = spec.imagined_device == "cuda"  # PyTorch's default optimizer path on CUDA
    result.extra.update(analytic.figures(spec, plan, multi_tensor))
    if spec.device == FAKE_DEVICE:
        prediction = predict_job(spec, plan)
        _record_flops(result, spec, plan, prediction.flops_step)
        record_prediction(result, spec, prediction)
        _record_memory(result, prediction.memory, job_dir)
        return
    _record_flops(result, spec, plan)
    work = build_workload(spec, plan, spec.device)
    result.param_count = parameter_count(work.model)

    timings = time_steps(work, spec.measure.warmup, spec.measure.repeat)
    result.loss_first_step = timings.first_loss
    result.time_source = (
        "cuda_synchronized_perf_counter" if spec.device == "cuda" else "perf_counter"
    )
    result.time_warmup = spec.measure.warmup
    result.time_repeats = spec.measure.repeat
    for key, value in timings.summary(spec.tokens_per_step).items():
        setattr(result, key, value)

    record_saved_bytes(result, timings.saved_activation_bytes)
    _record_memory(result, measure_memory(work), job_dir)


def measure_plan(
    result: RunResult, spec: ExperimentSpec, plan: CheckpointPlan, job_dir: Path
) -> None:
    result.plan = plan.to_dict()
    result.plan_summary = plan.describe()
    print(describe_job(spec, plan), flush=True)
    measure_job(result, spec, plan, job_dir)


def measure_within_budget(result: RunResult, spec: ExperimentSpec, job_dir: Path) -> None:
    """Measure the adaptive plan; while its measured peak is over the budget, tighten the
    planning budget by the overshoot and plan again (at most `strategy.max_rounds` plans).

    Planning time (profile, unit timings, solving) is recorded as `planning_s`: what adaptive
    adds to a job besides measuring its plan.
    """
    started = time.monotonic()
    planner = adaptive.BudgetPlanner(spec.strategy, spec)
    record = planner.record(time_units(spec) if spec.device != FAKE_DEVICE else {})
    result.extra["adaptive"] = record
    rounds: list[dict[str, Any]] = []
    record["rounds"] = rounds
    budget = planner.budget.bytes
    margin = 0
    for _ in range(spec.strategy.max_rounds):
        decision = planner.decide(margin)
        rounds.append(
            {
                "planning_budget_bytes": decision.planning_budget_bytes,
                "predicted_peak_bytes": decision.prediction.peak_bytes,
                "plan_layers": adaptive.describe_choices(decision.solution),
            }
        )
        if len(rounds) == 1:
            record["planning_s"] = round(time.monotonic() - started, 3)
        measure_plan(result, spec, decision.plan, job_dir)
        rounds[-1]["measured_peak_bytes"] = result.peak_bytes
        if result.peak_bytes <= budget:
            break
        margin += result.peak_bytes - budget
    record.update(
        predicted_peak_bytes=decision.prediction.peak_bytes,
        predicted_peak_at=decision.prediction.where,
        predicted_recompute_flops=decision.solution.recompute_flops,
        measured_peak_bytes=result.peak_bytes,
        measured_recompute_flops=result.flops_recompute,
        plan_layers=adaptive.describe_choices(decision.solution),
    )
    if result.peak_bytes > budget:
        raise InfeasibleError(
            f"the measured peak {format_bytes(result.peak_bytes)} ({result.memory_source}) is "
            f"still over the budget of {format_bytes(budget)} after {len(rounds)} plan(s); "
            "raise strategy.max_rounds or the budget"
        )


def measure_planned(result: RunResult, spec: ExperimentSpec, job_dir: Path) -> None:
    """Plan and measure; an adaptive plan is then held to its budget."""
    if spec.strategy.name == adaptive.STRATEGY.name:
        measure_within_budget(result, spec, job_dir)
    else:
        measure_plan(result, spec, make_plan(spec), job_dir)


def describe_job(spec: ExperimentSpec, plan: CheckpointPlan) -> str:
    return (
        f"[memexp] {spec.model.name} strategy={spec.strategy.name} seq={spec.seq_len} "
        f"batch={spec.batch_size} device={spec.device} precision={spec.precision}\n"
        f"[memexp] plan: {plan.describe()}"
    )


def describe_outcome(result: RunResult) -> str:
    if result.status != STATUS_OK:
        return f"[memexp] {result.status}: {result.message}"
    if result.device == FAKE_DEVICE:
        return describe_prediction(result)
    return (
        f"[memexp] peak {format_bytes(result.peak_bytes)} ({result.memory_source}), "
        f"saved activations {format_bytes(result.saved_activation_bytes)} ({result.saved_source}), "
        f"step {result.step_ms_median:.1f} ms median of {result.time_repeats} "
        f"[{result.step_ms_min:.1f}-{result.step_ms_max:.1f}], "
        f"recompute {result.recompute_flops_pct:.1f}% FLOPs"
    )


def _release_memory() -> None:
    """Jobs may share a process (Hydra's basic launcher): leave nothing cached for the next one."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_job(cfg: DictConfig, job_dir: Path, identity: dict[str, Any]) -> RunResult:
    """Run one job and write its record; never raises for a failure inside the job."""
    job_dir = Path(job_dir)
    keep_previous_record(job_dir)
    started = time.monotonic()
    result = RunResult(status=STATUS_ERROR, started_at=_now(), job_dir=str(job_dir), **identity)
    try:
        result.extra[CONFIG_HASH_KEY] = config_hash(cfg)
        fill_identity_from_config(result, cfg)
        spec = validate(cfg)
        _fill_identity(result, spec)
        result.environment = describe_environment(spec.device)
        if spec.auto_batch:
            spec = choose_batch(result, spec, make_plan)
        while True:
            _fill_identity(result, spec)
            try:
                measure_planned(result, spec, job_dir)
                break
            except torch.OutOfMemoryError:
                if not spec.auto_batch or spec.batch_size == 1:
                    raise
                # batch=auto on a GPU: the predicted batch did not fit after all; one smaller.
                _release_memory()
                result.extra["auto_batch_backoffs"] = result.extra.get("auto_batch_backoffs", 0) + 1
                spec = replace(spec, batch_size=spec.batch_size - 1)
        result.status = STATUS_OK
    except ConfigError as error:
        result.message, result.error_type = str(error), "ConfigError"
    except InfeasibleError as error:
        result.status, result.message = STATUS_INFEASIBLE, str(error)
    except NotApplicableError as error:
        result.status, result.message = STATUS_NOT_APPLICABLE, str(error)
    except torch.OutOfMemoryError as error:
        result.status, result.message, result.error_type = (
            STATUS_OOM,
            str(error),
            type(error).__name__,
        )
    except Exception as error:
        result.message, result.error_type = str(error) or repr(error), type(error).__name__
        result.extra["traceback"] = traceback.format_exc()
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: record it, then stop the sweep
        result.status, result.message = STATUS_INTERRUPTED, describe_interrupt(interrupt)
        raise
    finally:
        result.finished_at = _now()
        result.duration_s = round(time.monotonic() - started, 3)
        write_result(job_dir, result)
        _release_memory()
    print(describe_outcome(result), flush=True)
    return result
