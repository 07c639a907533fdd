"""One job of a sweep under one guard, from config resolution to the W&B mirror.

The job's W&B run opens before the job starts and listens to it (`memexp.observe`), beside its
progress display (`memexp.progress`): the runner and the measurement never import W&B. Within a
sweep, the job's log lines carry its number (`memexp.logs`).

Whatever a job meets (a config that does not resolve, a damaged record in its folder, a failing
W&B mirror, Ctrl-C), it leaves a record and never raises into Hydra, so every launcher goes on
with the next job and the end-of-sweep table and aggregate are always written. Only an interrupt
travels on, after its record is written: it is meant to stop the sweep.
"""

from __future__ import annotations

import logging
import tempfile
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from memexp import resume, sweepindex
from memexp.config import ConfigError
from memexp.configure import require_values
from memexp.interrupts import describe_interrupt, stop_on_sigterm
from memexp.logs import job_lines
from memexp.memo import caching_in
from memexp.observe import JobObserver, Observers, observing
from memexp.progress import showing_progress
from memexp.ranks import cluster_rank
from memexp.record import describe_outcome, write_identity_from_config
from memexp.results import STATUS_ERROR, STATUS_INTERRUPTED, RunResult, read_result, write_result
from memexp.runner import run_job
from memexp.sweepdir import RESULT_FILE
from memexp.wandb_sink import open_job_run, sweep_group

log = logging.getLogger(__name__)


def record_failure(
    cfg: DictConfig, job_dir: Path, identity: dict[str, Any], failure: BaseException
) -> RunResult:
    """The record of a job that failed before or around `run_job`: what identity can be read."""
    result = RunResult(status=STATUS_ERROR, job_dir=str(job_dir), **identity)
    write_identity_from_config(result, cfg)
    if isinstance(failure, KeyboardInterrupt):
        result.status, result.message = STATUS_INTERRUPTED, describe_interrupt(failure)
    else:
        result.message = str(failure) or repr(failure)
        result.error_type = type(failure).__name__
        if not isinstance(failure, ConfigError):  # a config error is its own explanation
            result.extra["traceback"] = "".join(traceback.format_exception(failure))
    write_result(job_dir, result)
    log.info(describe_outcome(result))
    return result


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config W&B shows: resolved, or as written when it does not resolve."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    except Exception:  # the record already says why it does not resolve
        return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)  # type: ignore[return-value]


def watch(cfg: DictConfig, group_dir: Path, name: str) -> JobObserver:
    """The job's W&B run, opened as the job starts (`NO_OBSERVER` when logging is off)."""
    tags = tuple(
        OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        for key in ("model.name", "strategy.name")
    )
    return open_job_run(cfg.logger, _resolved(cfg), group_dir, sweep_group(group_dir), name, tags)


def follow_as_rank(cfg: DictConfig, identity: dict[str, Any]) -> None:
    """A rank other than 0 of a job the cluster started as several (SLURM's srun starts the
    whole job in every task): it runs the job beside rank 0, since every collective needs every
    rank, in a folder of its own that is deleted after; rank 0 writes the job's record, its
    index row and its W&B run."""
    with tempfile.TemporaryDirectory(prefix="memexp-rank-") as folder:
        run_job(cfg, Path(folder), identity)


def run_guarded(
    cfg: DictConfig, job_dir: Path, identity: dict[str, Any], group_dir: Path
) -> RunResult | None:
    """Run one job and mirror it; returns its record, or None when resume skipped it or this
    process is a rank other than 0 of a cluster-started job (`follow_as_rank`)."""
    stop_on_sigterm()
    job_num = identity.get("job_num")
    sweep_dir = identity.get("sweep_dir")
    with job_lines(job_num), caching_in(sweep_dir), showing_progress(job_num) as progress:
        return _run_observed(cfg, job_dir, identity, group_dir, progress)


def _run_observed(
    cfg: DictConfig,
    job_dir: Path,
    identity: dict[str, Any],
    group_dir: Path,
    progress: JobObserver,
) -> RunResult | None:
    """The job heard by its progress display and, once it opens, its W&B run."""
    sweep_dir = Path(identity["sweep_dir"]) if identity.get("sweep_dir") else None
    observer: JobObserver = progress
    try:
        if resume.already_measured(cfg, job_dir, sweep_dir):
            return None
        rank = cluster_rank()
        if rank is not None and rank.rank != 0:
            follow_as_rank(cfg, identity)
            return None
        observer = Observers(
            progress, watch(cfg, group_dir, " ".join(identity["overrides"]) or "defaults")
        )
        require_values(cfg)  # `model=schema`: the schema, not a preset
        OmegaConf.to_container(cfg, resolve=True)  # an interpolation that fails fails here
        with observing(observer):
            result = run_job(cfg, job_dir, identity)
    except Exception as error:  # before run_job's own guard (run_job records everything after)
        resume.keep_previous_record(job_dir)
        result = record_failure(cfg, job_dir, identity, error)
    except KeyboardInterrupt as interrupt:
        if not (Path(job_dir) / RESULT_FILE).is_file():
            record_failure(cfg, job_dir, identity, interrupt)
        observer.on_finish(read_result(job_dir), job_dir)
        raise
    index_record(job_dir)
    observer.on_finish(result, job_dir)
    return result


def index_record(job_dir: Path) -> None:
    """Add the job's record to its sweep's index; on failure the aggregate reads the record."""
    try:
        sweepindex.append_row(Path(job_dir) / RESULT_FILE)
    except (OSError, ValueError, TypeError) as error:
        log.warning("index row skipped (%s: %s)", type(error).__name__, error)
