"""One job: validate, plan, time, measure, record. Whatever happens, a `result.json` is written.

A job that fails is a result too (status `error` or `oom` with its message): the exception never
escapes, so Hydra carries on with the sweep and its end-of-sweep callbacks still run.
"""

from __future__ import annotations

import gc
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from memexp.config import ConfigError, ExperimentSpec, validate
from memexp.environment import describe_environment
from memexp.measure.flops import FLOPS_SOURCE, step_flops
from memexp.measure.memory import MemoryMeasurement, measure_memory
from memexp.measure.saved import SAVED_SOURCE
from memexp.measure.timing import time_steps
from memexp.model import parameter_count
from memexp.plan import CheckpointPlan
from memexp.results import (
    STATUS_ERROR,
    STATUS_OK,
    STATUS_OOM,
    RunResult,
    write_json_atomic,
    write_result,
)
from memexp.strategies import make_plan
from memexp.training import build_workload

TIMELINE_FILE = "timeline.json"
MIB = 2**20


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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


def _record_flops(result: RunResult, spec: ExperimentSpec, plan: CheckpointPlan) -> None:
    with_plan = step_flops(spec, plan)
    without = step_flops(spec, CheckpointPlan.nothing(spec.model.layers))
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

    result.saved_activation_bytes = timings.saved_activation_bytes
    result.saved_source = SAVED_SOURCE
    _record_memory(result, measure_memory(work), job_dir)


def describe_job(spec: ExperimentSpec, plan: CheckpointPlan) -> str:
    return (
        f"[memexp] {spec.model.name} strategy={spec.strategy.name} seq={spec.seq_len} "
        f"batch={spec.batch_size} device={spec.device} precision={spec.precision}\n"
        f"[memexp] plan: {plan.describe()}"
    )


def describe_outcome(result: RunResult) -> str:
    if result.status != STATUS_OK:
        return f"[memexp] {result.status}: {result.message}"
    return (
        f"[memexp] peak {result.peak_bytes / MIB:.1f} MiB ({result.memory_source}), "
        f"saved activations {result.saved_activation_bytes / MIB:.1f} MiB ({result.saved_source}), "
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
    started = time.monotonic()
    result = RunResult(status=STATUS_ERROR, started_at=_now(), job_dir=str(job_dir), **identity)
    try:
        spec = validate(cfg)
        _fill_identity(result, spec)
        result.environment = describe_environment(spec.device)
        plan = make_plan(spec)
        result.plan = plan.to_dict()
        result.plan_summary = plan.describe()
        print(describe_job(spec, plan), flush=True)
        measure_job(result, spec, plan, job_dir)
        result.status = STATUS_OK
    except ConfigError as error:
        result.message, result.error_type = str(error), "ConfigError"
    except torch.OutOfMemoryError as error:
        result.status, result.message, result.error_type = (
            STATUS_OOM,
            str(error),
            type(error).__name__,
        )
    except Exception as error:
        result.message, result.error_type = str(error) or repr(error), type(error).__name__
        result.extra["traceback"] = traceback.format_exc()
    finally:
        result.finished_at = _now()
        result.duration_s = round(time.monotonic() - started, 3)
        write_result(job_dir, result)
        _release_memory()
    print(describe_outcome(result), flush=True)
    return result
