"""Write a sweep's outputs: `results.csv`, `plots/*.png` and `summary.md`; the command line.

Beside `results.csv`: `results.parquet` (the same table, typed; when pyarrow is installed) and
one tidy table per list in the records (`plans.csv`, ...: `memexp.tidy`).

    python -m memexp.summarize PATH... [--out FILE] [--timeline model=small,seq=256 ...]

PATH is a sweep folder, a parent folder holding many sweeps, a job folder, a `result.json`, or a
glob of any of these (quoted globs are expanded here). Every sweep found gets `results.csv`,
`plots/*.png` and `summary.md` (a single run's folder gets its own, beside its `result.json`);
`--out` also writes one CSV holding all jobs found; `--timeline` names the workloads the
memory-over-one-step figure draws.

Records are read through each sweep's `index.jsonl` (`memexp.sweepindex`), so summarizing again,
during a sweep or after it, reads only the records that are new since.

The one place that draws and writes: `memexp.aggregate` builds the table, `memexp.plots` draws
it, `memexp.report` writes the page. The figure drawer is a parameter, so a caller that wants
only the table and the page (a test, a quick look) passes one that draws nothing.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memexp import plots
from memexp.aggregate import (
    SweepTable,
    data_notes,
    failure_notes,
    load_results,
    missing_result_notes,
    read_sweep,
)
from memexp.figures import PlotOutcome
from memexp.logs import log_to_stderr
from memexp.plots.timeline import DEFAULT_TIMELINES
from memexp.report import write_summary
from memexp.results import STATUS_OK
from memexp.sweepdir import (
    PLOTS_DIR,
    RESULT_FILE,
    RESULTS_CSV,
    RESULTS_PARQUET,
    find_result_files,
    sweep_of,
    table_csv,
)
from memexp.tidy import list_tables

log = logging.getLogger(__name__)

# Draws every figure the table supports into a folder and says what it drew or why not.
Drawer = Callable[[pd.DataFrame, Path], list[PlotOutcome]]


@dataclass
class SweepOutput:
    """What `summarize_sweep` produced: the table, the files it wrote, what a reader should know."""

    frame: pd.DataFrame
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def no_figures(frame: pd.DataFrame, out_dir: Path) -> list[PlotOutcome]:
    """A drawer that draws nothing: the table and the page without the seconds plotting takes."""
    return []


def write_parquet(frame: pd.DataFrame, path: Path) -> bool:
    """The table with its types kept, when pyarrow (`memexp[parquet]`) is installed."""
    if importlib.util.find_spec("pyarrow") is None:
        return False
    frame.to_parquet(path, index=False)
    return True


def write_tables(sweep_dir: Path, frame: pd.DataFrame, rows: list[dict]) -> list[Path]:
    """`results.csv` (and `results.parquet`), and each list of the records as a tidy table."""
    csv_path = sweep_dir / RESULTS_CSV
    frame.to_csv(csv_path, index=False)
    written = [csv_path]
    if write_parquet(frame, sweep_dir / RESULTS_PARQUET):
        written.append(sweep_dir / RESULTS_PARQUET)
    for name, table in list_tables(rows).items():
        path = sweep_dir / table_csv(name)
        table.to_csv(path, index=False)
        written.append(path)
    return written


def summarize_sweep(sweep_dir: Path, draw: Drawer = plots.draw_all) -> SweepOutput:
    """Read the sweep, then write `results.csv`, the figures `draw` makes into `plots/`, and
    `summary.md` (`write_outputs`)."""
    return write_outputs(sweep_dir, read_sweep(sweep_dir), draw)


def write_outputs(sweep_dir: Path, table: SweepTable, draw: Drawer = plots.draw_all) -> SweepOutput:
    """Write `results.csv`, the figures `draw` makes into `plots/`, and `summary.md` of `table`.

    Meant for the end of a Hydra multirun, so odd data (no baseline, failed jobs, one job, no job)
    becomes notes in the output rather than an exception that would hide the sweep's results.
    """
    sweep_dir = Path(sweep_dir)
    frame, rows = table.frame, table.rows
    # Failed jobs get their own table in the summary; these notes are everything else.
    notes = table.notes + missing_result_notes(sweep_dir) + data_notes(frame)
    tables = write_tables(sweep_dir, frame, rows)
    figures = draw(frame, sweep_dir / PLOTS_DIR)
    summary = write_summary(sweep_dir, frame, notes, figures)
    written = [*tables, *(f.path for f in figures if f.path), summary]
    figure_notes = [f.note for f in figures if f.note]
    return SweepOutput(frame, written, failure_notes(frame) + notes + figure_notes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memexp.summarize",
        description="Aggregate sweeps: results.csv, plots/ and summary.md in every sweep folder.",
    )
    parser.add_argument("paths", nargs="+", help="sweep folders, parents of sweeps, or globs")
    parser.add_argument("--out", type=Path, help="also write every job found into this CSV")
    parser.add_argument(
        "--timeline",
        action="append",
        default=[],
        type=plots.parse_selection,
        metavar="KEY=VALUE,...",
        help="workloads the memory-over-one-step figure draws, e.g. model=small,seq=256 "
        "(repeatable; keys: model, seq, batch, device, precision, attention, config); "
        f"default: {DEFAULT_TIMELINES} configs evenly spaced from smallest to largest",
    )
    args = parser.parse_args(argv)
    log_to_stderr()
    draw = functools.partial(plots.draw_all, timelines=args.timeline)

    files = find_result_files(args.paths)
    if not files:
        log.error("no %s under %s", RESULT_FILE, " ".join(args.paths))
        return 1
    for sweep in sorted({sweep_of(f) for f in files}):
        output = summarize_sweep(sweep, draw)
        ok = int(output.frame.status.eq(STATUS_OK).sum())
        print(f"{sweep}: {len(output.frame)} jobs ({ok} ok), wrote {len(output.written)} files")
        for note in output.notes:
            log.warning("note: %s", note)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        load_results(files).to_csv(args.out, index=False)
        print(f"all {len(files)} jobs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
