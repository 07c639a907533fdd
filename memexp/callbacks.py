"""End-of-run Hydra callback: the sweep's summary table, its outputs and its exit status.

It reads the records from disk rather than from memory, so it gives the same answer whichever
launcher ran the jobs (in this process, in subprocesses, or on a cluster). When a job ended in
`error` it raises `SystemExit(1)` after everything is printed and written: Hydra turns a
callback's exceptions into warnings but lets SystemExit through, so the process exits 1 without
any state shared with the entry point.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from memexp.results import (
    SOURCE_FAKE_TENSORS,
    STATUS_ERROR,
    DamagedRecord,
    RunResult,
    read_result,
)
from memexp.sweepdir import RESULT_FILE, RESULTS_CSV, result_files_in
from memexp.text import aligned_table, format_mib
from memexp.wandb_sink import log_aggregate, sweep_group

if TYPE_CHECKING:
    import pandas as pd

    from memexp.aggregate import SweepTable

log = logging.getLogger(__name__)

# The process's exit status when some job ended in `error` (OOM and infeasible are answers).
ERROR_EXIT_CODE = 1
# The sweep (or run) config and whether it is a multirun, kept when it starts: Hydra's end hooks
# do not run when a sweep is interrupted, and `finish_interrupted` still has to summarize it.
_STARTED: dict[str, tuple[DictConfig, bool]] = {}


def collect_results(sweep_dir: Path) -> list[RunResult]:
    """Records of every job under `sweep_dir`, in job order; a damaged one is named and left out."""
    results = []
    for path in result_files_in(sweep_dir):
        try:
            results.append(read_result(path))
        except DamagedRecord as damaged:
            log.warning("left out: %s", damaged)
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:+.1f}"  # NaN: no baseline


def read_table(sweep_dir: Path) -> SweepTable | None:
    """The sweep's table, built once for the end table and the outputs; None (and why, logged)
    when it cannot be built: the records are safe on disk, the end table is printed without
    the relative columns."""
    # Imported here: pandas is needed once per sweep, not in every job process.
    from memexp.aggregate import read_sweep

    try:
        return read_sweep(sweep_dir)
    except Exception as error:
        log.error("aggregation failed (%s: %s); records are intact", type(error).__name__, error)
        return None


def relative_figures(
    frame: pd.DataFrame | None,
) -> dict[str, tuple[float | None, float | None, float | None]]:
    """Job folder (resolved) → (step peak saved %, fwd+bwd peak saved %, step overhead %)
    against its workload's `none` job, as results.csv has them (memexp.aggregate:
    `peak_saved_pct`, `forward_backward_peak_saved_pct`, `time_overhead_pct`)."""
    if frame is None or frame.empty:
        return {}
    return {
        str(Path(row.result_file).parent): (
            row.peak_saved_pct,
            row.forward_backward_peak_saved_pct,
            row.time_overhead_pct,
        )
        for row in frame.itertuples()
    }


def format_table(results: list[RunResult], frame: pd.DataFrame | None = None) -> str:
    """The one table printed at the end of a sweep; units and sources are in the header.

    Beside the peak and the step time: % of peak saved and % of step time added against the
    `none` job of the same workload (blank without one), read off the sweep's table `frame`,
    and below it the sweep's wall time against its training steps.
    """
    header = (
        "job",
        "model",
        "strategy",
        "seq×batch",
        "step peak MiB",
        "saved %",
        "fwd+bwd peak MiB",
        "saved %",
        "saved act MiB",
        "step ms",
        "overhead %",
        "status",
    )
    relative = relative_figures(frame)
    rows = []
    for r in results:
        key = str(Path(r.job_dir).resolve()) if r.job_dir else ""
        saved, fb_saved, overhead = relative.get(key, (None, None, None))
        rows.append(
            (
                str(r.job_num if r.job_num is not None else "-"),
                r.model or "-",
                r.strategy or "-",
                f"{r.seq_len if r.seq_len is not None else '-'}×{r.batch_size if r.batch_size is not None else '-'}",
                format_mib(r.peak_bytes),
                _pct(saved),
                format_mib(r.forward_backward_peak_bytes),
                _pct(fb_saved),
                format_mib(r.saved_activation_bytes),
                _ms(r.step_ms_median),
                _pct(overhead),
                r.status,
            )
        )
    lines = [aligned_table(header, rows)]
    sources = sorted({r.memory_source for r in results if r.memory_source})
    repeats = sorted({r.time_repeats for r in results if r.time_repeats})
    if repeats:
        timing = f"median of {', '.join(map(str, repeats))} timed steps"
    elif any(r.memory_source == SOURCE_FAKE_TENSORS for r in results):
        timing = "not measured (device=fake predicts memory and FLOPs only)"
    else:
        timing = "n/a"
    lines.append(
        f"peaks: {', '.join(sources) or 'n/a'} (step: the whole step; fwd+bwd: forward, loss and "
        f"backward); saved act: bytes saved for backward (saved-tensor hooks); step ms: {timing}; "
        "saved % (of each peak) and overhead % (of step time) against the `none` job of the "
        "same workload"
    )
    from memexp.analysis import sweep_time  # here: pandas only once the sweep has ended

    timing = sweep_time(frame) if frame is not None else None
    if timing is not None:
        lines.append(f"time: {timing.describe()}")
    failed = [r for r in results if r.status != "ok"]
    for r in failed:
        label = f"job {r.job_num}" if r.job_num is not None else "run"
        lines.append(f"{label} {r.status}: {r.message}")
    return "\n".join(lines)


def report(results: list[RunResult], where: Path, frame: pd.DataFrame | None) -> None:
    """The table on stdout: it is the command's result, not a log line of one job."""
    print(f"\n[memexp] {len(results)} job(s) in {where}")
    print(format_table(results, frame), flush=True)


def aggregate_and_log(config: DictConfig, sweep_dir: Path, table: SweepTable) -> None:
    """results.csv, plots and summary.md of the sweep's table, mirrored to W&B; problems
    become notes."""
    # Imported here: plotting libraries are only needed once per sweep, not in every job process.
    from memexp.summarize import write_outputs

    try:
        output = write_outputs(sweep_dir, table)
    except Exception as error:  # the jobs' records are safe on disk; say why and move on
        log.error("aggregation failed (%s: %s); records are intact", type(error).__name__, error)
        return
    for note in output.notes:
        log.warning("note: %s", note)
    log.info(
        "wrote %d file(s): results.csv, summary.md, plots/ in %s", len(output.written), sweep_dir
    )
    plots = [path for path in output.written if path.suffix == ".png"]
    log_aggregate(config.logger, sweep_dir, sweep_group(sweep_dir), sweep_dir / RESULTS_CSV, plots)


def exit_if_any_error(results: list[RunResult]) -> None:
    """Stop the process with `ERROR_EXIT_CODE` when a job ended in `error`; return otherwise."""
    if any(r.status == STATUS_ERROR for r in results):
        raise SystemExit(ERROR_EXIT_CODE)


def finish_sweep(config: DictConfig) -> list[RunResult]:
    """The end table, the aggregate and its W&B mirror of the sweep `config` ran."""
    sweep_dir = Path(config.hydra.sweep.dir)
    results = collect_results(sweep_dir)
    table = read_table(sweep_dir)
    report(results, sweep_dir, table.frame if table is not None else None)
    if table is not None:
        aggregate_and_log(config, sweep_dir, table)
    return results


def finish_run(config: DictConfig) -> list[RunResult]:
    """The end table of a single run, when it left a readable record."""
    run_dir = Path(config.hydra.run.dir)
    if not (run_dir / RESULT_FILE).exists():
        return []
    try:
        results = [read_result(run_dir)]
    except DamagedRecord as damaged:
        log.warning("left out: %s", damaged)
        return []
    table = read_table(run_dir)
    report(results, run_dir, table.frame if table is not None else None)
    return results


def finish_interrupted() -> None:
    """After Ctrl-C or SIGTERM: the table and the aggregate of what finished."""
    log.warning("interrupted; summarizing what finished")
    if "config" not in _STARTED:
        return
    config, multirun = _STARTED["config"]
    if multirun:
        finish_sweep(config)
    else:
        finish_run(config)


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _STARTED["config"] = (config, True)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _STARTED["config"] = (config, False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        exit_if_any_error(finish_sweep(config))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        exit_if_any_error(finish_run(config))
