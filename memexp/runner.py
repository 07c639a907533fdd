"""One job: validate, plan, time, measure, record. Whatever happens, a `result.json` is written.

A job that fails is a result too (status `error` or `oom` with its message): the exception never
escapes, so Hydra carries on with the sweep and its end-of-sweep callbacks still run.

The runner names no strategy and no device: the job's strategy executes itself
(`Strategy.execute`) with a `measure` function that asks the job's device backend
(`memexp.devices`) for a plan's figures and hands them to the record room (`memexp.record`).
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from memexp.config import ConfigError, ExperimentSpec
from memexp.configure import validate
from memexp.devices import Figures, backend_for, is_out_of_memory, release_memory
from memexp.environment import describe_environment
from memexp.estimate import at_chosen_batch, choose_batch
from memexp.interrupts import describe_interrupt
from memexp.measure.machine import intra_op_threads
from memexp.observe import enter_phase
from memexp.plan import CheckpointPlan
from memexp.record import (
    describe_job,
    describe_outcome,
    write_batch_search,
    write_figures,
    write_identity,
    write_identity_from_config,
    write_outcome,
    write_plan,
)
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
    write_result,
)
from memexp.resume import CONFIG_HASH_KEY, config_hash, keep_previous_record
from memexp.strategies import make_plan, strategy_for

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def execute_strategy(result: RunResult, spec: ExperimentSpec, job_dir: Path) -> None:
    """Let the job's strategy plan and measure. Each measurement is recorded as it comes, so a
    job that fails part-way still says which plan it was measuring."""
    backend = backend_for(spec)

    def measure(plan: CheckpointPlan) -> Figures:
        write_plan(result, plan, backend.theory(spec, plan))
        log.info(describe_job(spec, plan))
        figures = backend.measure(spec, plan)
        write_figures(result, plan, figures, job_dir)
        return figures

    enter_phase("plan")
    with intra_op_threads(spec.measure.threads):
        outcome = strategy_for(spec).execute(spec, measure)
    write_outcome(result, outcome)
    if outcome.verdict is not None:
        raise outcome.verdict


def run_job(cfg: DictConfig, job_dir: Path, identity: dict[str, Any]) -> RunResult:
    """Run one job and write its record; never raises for a failure inside the job."""
    job_dir = Path(job_dir)
    keep_previous_record(job_dir)
    started = time.monotonic()
    result = RunResult(status=STATUS_ERROR, started_at=_now(), job_dir=str(job_dir), **identity)
    try:
        result.extra[CONFIG_HASH_KEY] = config_hash(cfg)
        write_identity_from_config(result, cfg)
        spec = validate(cfg)
        write_identity(result, spec)
        result.environment = describe_environment(spec.device)
        if spec.auto_batch:
            enter_phase("batch search")
            search = choose_batch(spec, make_plan)
            write_batch_search(result, search)
            spec = at_chosen_batch(spec, search)
        while True:
            write_identity(result, spec)
            try:
                execute_strategy(result, spec, job_dir)
                break
            except Exception as error:
                if not is_out_of_memory(error) or not spec.auto_batch or spec.batch_size == 1:
                    raise
                # batch=auto on a GPU: the predicted batch did not fit after all; one smaller.
                release_memory()
                result.extra["auto_batch_backoffs"] = result.extra.get("auto_batch_backoffs", 0) + 1
                spec = replace(spec, batch_size=spec.batch_size - 1)
        result.status = STATUS_OK
    except ConfigError as error:
        result.message, result.error_type = str(error), "ConfigError"
    except InfeasibleError as error:
        result.status, result.message = STATUS_INFEASIBLE, str(error)
    except NotApplicableError as error:
        result.status, result.message = STATUS_NOT_APPLICABLE, str(error)
    except Exception as error:
        if is_out_of_memory(error):  # CUDA's or the CPU allocator's: an answer, not a failure
            result.status, result.message = STATUS_OOM, str(error)
            result.error_type = type(error).__name__
        else:
            result.message, result.error_type = str(error) or repr(error), type(error).__name__
            result.extra["traceback"] = traceback.format_exc()
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: record it, then stop the sweep
        result.status, result.message = STATUS_INTERRUPTED, describe_interrupt(interrupt)
        raise
    finally:
        enter_phase("record")
        result.finished_at = _now()
        result.duration_s = round(time.monotonic() - started, 3)
        write_result(job_dir, result)
        release_memory()
    log.info(describe_outcome(result))
    return result
