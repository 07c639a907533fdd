"""Mirror a sweep's results into Weights & Biases: one W&B run per job, one more per sweep.

A job's run opens when the job starts and hears it as it runs (`JobRun`, a
`memexp.observe.JobObserver`); the sweep's run is written once the aggregate is.

W&B is a copy of the local results, never their keeper: every W&B failure (missing package,
no network, bad key, anything) becomes one warning line and the sweep carries on.

Where settings come from: W&B's own environment variables win over the `logger` config, so a
shell or CI setting applies unchanged (`WANDB_MODE=online memexp ...`):
WANDB_MODE > logger.mode, WANDB_PROJECT > logger.project, WANDB_ENTITY > logger.entity,
WANDB_DIR > logger.dir > the sweep folder.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memexp.config import LoggerConfig, WandbMode
from memexp.interrupts import INTERRUPTED_EXIT_CODE
from memexp.observe import NO_OBSERVER, JobObserver
from memexp.results import STATUS_ERROR, STATUS_INTERRUPTED, RunResult
from memexp.sweepdir import RESULT_FILE
from memexp.text import to_mib

if TYPE_CHECKING:
    import wandb

LOG = logging.getLogger(__name__)

DEFAULT_PROJECT = "memexp"
JOB_TYPE_MEASURE = "measure"
JOB_TYPE_AGGREGATE = "aggregate"

# Each job logs these once as a history row: W&B line plots only take logged numbers as their
# x axis (not config values), so this row is what lets a report draw figures against seq_len
# or batch_size.
SEQ_LEN_KEY = "seq_len"
BATCH_KEY = "batch_size"
PEAK_MIB_KEY = "peak_mib"
STEP_MS_KEY = "step_ms_median"
HEADLINE_FIGURES = (PEAK_MIB_KEY, STEP_MS_KEY)
HEADLINE_KEYS = (SEQ_LEN_KEY, BATCH_KEY, *HEADLINE_FIGURES)

TIMELINE_KEY = "memory_timeline"
# W&B keeps a custom chart's data as the table `<key>_table`.
TIMELINE_TABLE_KEY = f"{TIMELINE_KEY}_table"
PLOT_KEY_PREFIX = "plots/"
# Each timed step's history row: `step/<phase>_ms` and, where the allocator counts, its bytes.
STEP_PREFIX = "step/"
STEP_ALLOCATED_KEY = f"{STEP_PREFIX}allocated_mib"
RESULT_ARTIFACT_TYPE = "memexp-result"
# A run's exit code by the job's status: failed in W&B only for an error or an interrupt.
EXIT_CODES = {STATUS_ERROR: 1, STATUS_INTERRUPTED: INTERRUPTED_EXIT_CODE}
RESULTS_TABLE_KEY = "results"
# wandb.Image reads rasters only; vector copies of the same plots (pdf, svg) stay local.
RASTER_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp"})

_ENV_OVERRIDES = {
    "mode": "WANDB_MODE",
    "project": "WANDB_PROJECT",
    "entity": "WANDB_ENTITY",
    "dir": "WANDB_DIR",
}
_CONFIG_DEFAULTS = {"mode": "offline", "project": DEFAULT_PROJECT, "entity": None, "dir": None}
DEFAULT_INIT_TIMEOUT_S = LoggerConfig.init_timeout_s
# Once W&B could not start a run (no network: after init_timeout_s), this process stops trying:
# one warning, not one stall per job.
_GAVE_UP: dict[str, str | None] = {"reason": None}  # why, once it gave up


class NoCredentials(RuntimeError):
    """Online mode without an API key: W&B would ask at the terminal and wait forever."""


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of a sweep folder: `multirun/2024-05-01/12-00-00` -> `2024-05-01_12-00-00`.

    Readable, and derived from the folder alone, so the report CLI finds the group the jobs
    logged to.
    """
    path = Path(sweep_dir).resolve()
    return f"{path.parent.name}_{path.name}"


class JobRun(JobObserver):
    """One job's W&B run, open while the job runs: each timed step is a history row as it
    happens (W&B samples the system's metrics beside them), and the end brings the record's
    figures as summary, the headline row and memory timeline, the record and timeline files as
    an artifact, and the job's status as the run's exit code.

    Only `error` (exit code 1) and `interrupted` (130) mark the run failed: oom, infeasible and
    not_applicable are answers. A W&B failure here is one warning; the run is then dropped and
    the job goes on unheard.
    """

    def __init__(self, run: wandb.Run, what: str) -> None:
        self._run: wandb.Run | None = run
        self._what = what

    def on_step(self, phase_ms: Mapping[str, float], allocated_bytes: int | None) -> None:
        row = {f"{STEP_PREFIX}{phase}_ms": ms for phase, ms in phase_ms.items()}
        if allocated_bytes is not None:
            row[STEP_ALLOCATED_KEY] = to_mib(allocated_bytes)
        self._call(lambda run: run.log(row))

    def on_finish(self, result: RunResult, job_dir: Path) -> None:
        self._call(lambda run: _write_record(run, result, Path(job_dir)))
        run, self._run = self._run, None
        if run is not None:
            _end_run(run, EXIT_CODES.get(result.status, 0), self._what)

    def _call(self, use: Callable[[wandb.Run], Any]) -> None:
        if self._run is None:
            return
        try:
            use(self._run)
        except Exception as exc:
            run, self._run = self._run, None
            _warn(self._what, exc)
            _end_run(run, 1, self._what)


def open_job_run(
    logger_cfg: Mapping[str, Any],
    resolved_config: dict[str, Any],
    group_dir: Path,
    sweep_id: str,
    run_name: str,
    tag_names: tuple[str | None, ...] = (),
) -> JobObserver:
    """Open the W&B run of a job about to start; `NO_OBSERVER` when logging is off or W&B could
    not start one (one warning)."""
    what = f"{JOB_TYPE_MEASURE} run {run_name!r}"
    run = _start_run(
        logger_cfg,
        Path(group_dir),
        what,
        group=sweep_id,
        job_type=JOB_TYPE_MEASURE,
        name=run_name,
        tags=_tags(logger_cfg, *tag_names),
        config=resolved_config,
    )
    return NO_OBSERVER if run is None else JobRun(run, what)


def _write_record(run: wandb.Run, result: RunResult, job_dir: Path) -> None:
    """The record's figures as summary, its headline row, its timeline chart and its files."""
    summary = _job_summary(result)
    row = _headline_row(summary)
    # Only the record's own timeline: a file a previous record of this folder left is not its.
    timeline = job_dir / result.timeline_file if result.timeline_file else None
    files = [job_dir / RESULT_FILE]
    if timeline is not None and timeline.is_file():
        row[TIMELINE_KEY] = _timeline_chart(timeline)
        files.append(timeline)
    if row:
        run.log(row)
    run.summary.update(summary)
    run.log_artifact(_result_artifact(run, files))


def _result_artifact(run: wandb.Run, files: list[Path]) -> Any:
    """The record's files, as they are on disk."""
    import wandb

    artifact = wandb.Artifact(f"result-{run.id}", type=RESULT_ARTIFACT_TYPE)
    for path in files:
        artifact.add_file(str(path))
    return artifact


def log_aggregate(
    logger_cfg: Mapping[str, Any],
    sweep_dir: Path,
    sweep_id: str,
    table_csv: Path,
    plot_paths: list[Path],
) -> None:
    """Log the sweep's results table and plots as one more run in the sweep's group."""
    sweep_dir = Path(sweep_dir)

    def write(run: wandb.Run) -> int:
        import wandb

        images = {
            f"{PLOT_KEY_PREFIX}{path.stem}": wandb.Image(str(path))
            for path in map(Path, plot_paths)
            if path.suffix.lower() in RASTER_SUFFIXES
        }
        run.log({RESULTS_TABLE_KEY: _csv_table(Path(table_csv)), **images})
        return 0

    _log_run(
        logger_cfg,
        sweep_dir,
        write,
        group=sweep_id,
        job_type=JOB_TYPE_AGGREGATE,
        name=f"{sweep_id} aggregate",
        tags=_tags(logger_cfg),
        config={"sweep_dir": str(sweep_dir)},
    )


def _job_summary(result: RunResult) -> dict[str, Any]:
    """The flat RunResult fields plus a MiB twin of every byte count (`peak_bytes` -> `peak_mib`).

    Unmeasured (None) fields are left out: W&B shows a missing value, not a misleading null.
    """
    summary = {key: value for key, value in result.to_dict().items() if value is not None}
    for key, value in list(summary.items()):
        if key.endswith("_bytes"):
            mib = key.removesuffix("_bytes") + "_mib"
            if isinstance(value, dict):
                summary[mib] = {part: to_mib(count) for part, count in value.items()}
            else:
                summary[mib] = to_mib(value)
    return summary


def _headline_row(summary: dict[str, Any]) -> dict[str, Any]:
    """The workload's axes with whichever headline figures were measured; nothing when none were."""
    row = {key: summary[key] for key in HEADLINE_KEYS if key in summary}
    return row if SEQ_LEN_KEY in row and any(key in row for key in HEADLINE_FIGURES) else {}


def _timeline_chart(path: Path) -> Any:
    """The step's memory timeline as a table plus a line chart coloured by phase.

    One table instead of one history row per event: a step has thousands of events and
    logging each costs W&B most of a millisecond.
    """
    import wandb

    events = json.loads(path.read_text())["events"]
    table = wandb.Table(
        columns=["op_index", "allocated_mib", "phase"],
        data=[[op, to_mib(allocated), phase] for op, allocated, phase in events],
    )
    return wandb.plot.line(
        table, "op_index", "allocated_mib", stroke="phase", title="Allocated memory over one step"
    )


def _csv_table(path: Path) -> Any:
    import pandas as pd
    import wandb

    return wandb.Table(dataframe=pd.read_csv(path), allow_mixed_types=True)


def _tags(logger_cfg: Mapping[str, Any], *names: str | None) -> list[str]:
    configured = [str(tag) for tag in logger_cfg.get("tags") or ()]
    return list(dict.fromkeys([name for name in names if name] + configured))


def _setting(logger_cfg: Mapping[str, Any], key: str) -> Any:
    """A W&B setting: the environment variable if set, else the logger config, else the default."""
    value = os.environ.get(_ENV_OVERRIDES[key]) or logger_cfg.get(key, _CONFIG_DEFAULTS[key])
    return value.value if isinstance(value, Enum) else value


def _require_credentials(wandb_module: Any) -> None:
    """Never prompt: an online run needs a key found without asking (env, netrc, settings)."""
    if not wandb_module.login(prompt=False, verify=False):
        raise NoCredentials(
            "logger.mode=online needs an API key (WANDB_API_KEY or `wandb login`); "
            "or use logger.mode=offline"
        )


def _warn(what: str, exc: BaseException) -> None:
    reason = next(iter(str(exc).strip().splitlines()), "")
    LOG.warning(
        "W&B logging skipped for %s (local results are kept): %s: %s%s",
        what,
        type(exc).__name__,
        reason,
        "; W&B is off for the rest of this process" if _GAVE_UP["reason"] else "",
    )


def _start_run(
    logger_cfg: Mapping[str, Any], default_dir: Path, what: str, **init_kwargs: Any
) -> wandb.Run | None:
    """A new W&B run, or None: unless `logger.name` is `wandb` (`none` turns logging off), once
    W&B gave up in this process, or when it cannot start (one warning). Never prompts and never
    waits past `logger.init_timeout_s`."""
    if logger_cfg.get("name") != "wandb" or _GAVE_UP["reason"]:
        return None
    try:
        import wandb
    except Exception as exc:
        _warn(what, exc)
        return None
    try:
        wandb_dir = Path(_setting(logger_cfg, "dir") or default_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        mode = _setting(logger_cfg, "mode")
        if mode == WandbMode.online.value:
            _require_credentials(wandb)
        timeout = float(logger_cfg.get("init_timeout_s") or DEFAULT_INIT_TIMEOUT_S)
        try:
            return wandb.init(
                project=_setting(logger_cfg, "project"),
                entity=_setting(logger_cfg, "entity"),
                mode=mode,
                dir=str(wandb_dir),
                reinit="create_new",
                settings=wandb.Settings(silent=True, console="off", init_timeout=timeout),
                **init_kwargs,
            )
        except Exception as error:  # no network, a refused key: every job would stall the same
            _GAVE_UP["reason"] = f"could not start a run within {timeout:g} s: {error}"
            raise
    except Exception as exc:
        _warn(what, exc)
        wandb.teardown()
        return None


def _end_run(run: wandb.Run, exit_code: int, what: str) -> None:
    """Finish the run with `exit_code` and shut W&B down: no W&B service process is left to
    compete for the CPU while the next job sets up."""
    import wandb

    try:
        run.finish(exit_code=exit_code)
        if run.settings.mode == WandbMode.offline.value:
            LOG.info("W&B %s saved offline: wandb sync %s", what, run.settings.sync_dir)
    except Exception as exc:
        _warn(what, exc)
    finally:
        wandb.teardown()


def _log_run(
    logger_cfg: Mapping[str, Any],
    default_dir: Path,
    write: Callable[[wandb.Run], int],
    **init_kwargs: Any,
) -> None:
    """Open one W&B run, let `write` fill it and return its exit code, finish it, shut W&B down.

    Anything W&B raises becomes one warning line.
    """
    what = f"{init_kwargs['job_type']} run {init_kwargs['name']!r}"
    run = _start_run(logger_cfg, default_dir, what, **init_kwargs)
    if run is None:
        return
    exit_code = 1
    try:
        exit_code = write(run)
    except Exception as exc:
        _warn(what, exc)
    finally:
        _end_run(run, exit_code, what)
