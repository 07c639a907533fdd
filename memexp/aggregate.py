"""Collect `result.json` files into one table and compare every job with its baseline.

This module builds tables only: `memexp.summarize` writes them, with the figures and the page,
into a sweep folder (and is the command line, `python -m memexp.summarize`).

The table (`load_results`) has one row per job, failed jobs included with their `status`:

* every `RunResult` field under its own name (units in the name: `_bytes`, `_ms`, `_flops`,
  `_pct`), except the nested ones, which are flattened so a CSV reader needs no JSON
  (`memexp.tidy`): `plan` -> `plan_<key>`, `environment` -> `env_<key>`, `extra` -> `extra_<key>`
  (a dict inside opens into `extra_<key>_<subkey>`; a list is a table of its own,
  `memexp.tidy.list_tables`, e.g. the plan's segments and parts as `plans.csv`),
  `phase_bytes` -> `phase_<phase>_bytes`, and `overrides` -> one space-separated string;
* `result_file` (the file read) and `sweep` (the folder the job's aggregate belongs in:
  `memexp.sweepdir.sweep_of`, the run folder itself for a single run); the record's own
  `sweep_dir` is left out, `sweep` says it;
* `workload`: seq_len x batch_size (written with the sign U+00D7, e.g. `256x4`), followed by
  device, precision and attention when those vary in the table; `config`: the model and the
  workload, e.g. `small 256x4`, the label plots and tables use;
* `strategy_label`: the strategy name plus its `strategy.*` overrides (`full granularity=sublayer`),
  so two settings of one strategy stay apart;
* `<name>_mib` for every `<name>_bytes` column: bytes / 2**20, i.e. MiB, never MB;
* baseline-relative columns, computed only for `status == ok` rows against the `strategy == none`
  row with status ok of the same (sweep, model, seq_len, batch_size, device, precision,
  attention) group (the lowest job number wins when there are several), whose sweep and job
  number are `baseline_sweep` and `baseline_job_num`: a job is never compared with another
  sweep's baseline, even when several sweeps are read into one table;
  `peak_saved_pct` = 100 * (baseline peak - peak) / baseline peak, and likewise
  `forward_backward_peak_saved_pct` (from `forward_backward_peak_bytes`),
  `activation_saved_pct` (from `activations_bytes`) and `saved_activation_saved_pct` (from
  `saved_activation_bytes`); `time_overhead_pct` = 100 * (step - baseline step) / baseline step from
  `step_ms_median`; `time_within_noise`: True when the job's step times (`step_ms_min` to
  `step_ms_max`) and its baseline's overlap, so their difference is no larger than either job's own
  spread (False for the baseline job itself and without a baseline); `efficiency` =
  `peak_saved_pct` / `time_overhead_pct`, i.e. % of peak memory saved per % of step time paid.
  Efficiency is NaN when the overhead is <= 0 (a strategy that costs no time has no finite price)
  or within noise (the price is not measured), and every relative cell is NaN without a baseline
  or when the baseline's figure is missing or zero;
* `pareto_optimal`: True for ok rows that no other ok row of the same group (within one sweep)
  beats in both step time and `peak_bytes` (the memory/time frontier); False otherwise. Step
  times whose min-max ranges overlap are ties: no row is optimal or beaten on a time difference
  within noise;
* `time_machine_busy`: True when the job's steps were timed on a busy machine (`busy_machine`):
  the larger 1-minute load average (before or after the timed steps) minus the job's own intra-op
  threads is at least half the CPUs it could use, i.e. other work held cores its threads wanted.

Jobs run with `batch=auto` each run at the largest batch that fits, so strategies of one workload
land in different groups and find no baseline: their relative columns stay empty (memory saved at
different batches would compare nothing), and `memexp.analysis.auto_batch_table` compares the
batches instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memexp import sweepindex
from memexp.results import STATUS_OK, RunResult
from memexp.sweepdir import (
    RESULT_FILE,
    find_result_files,
    folders_without_record,
    read_job_overrides,
    sweep_of,
)
from memexp.text import MIB
from memexp.tidy import list_columns

BASELINE_STRATEGY = "none"
# The workload a job ran: what a reader is told two compared jobs share.
GROUP_KEYS = ("model", "seq_len", "batch_size", "device", "precision", "attention")
# Jobs compared with each other (baseline, Pareto frontier): one workload within one sweep.
COMPARED_KEYS = ("sweep", *GROUP_KEYS)

# Saved-% columns and the measured column each compares with the baseline.
SAVINGS = {
    "peak_saved_pct": "peak_bytes",
    "forward_backward_peak_saved_pct": "forward_backward_peak_bytes",
    "activation_saved_pct": "activations_bytes",
    "saved_activation_saved_pct": "saved_activation_bytes",
}
TIME_COLUMN = "step_ms_median"
TIME_RANGE = ("step_ms_min", "step_ms_max")
RELATIVE_COLUMNS = (*SAVINGS, "time_overhead_pct", "efficiency")
# Load from other work, as a fraction of the job's CPUs, at which its times are marked busy.
BUSY_LOAD_FRACTION = 0.5
_INT_FIELDS = [f.name for f in fields(RunResult) if str(f.type).startswith("int")]
_LEADING_COLUMNS = ["sweep", "job_num", "config", "strategy_label", "strategy", "status"]


# --- finding and reading records -------------------------------------------------------------


def _record_columns() -> list[str]:
    nested = {*sweepindex.NESTED_PREFIXES, "phase_bytes", sweepindex.DUPLICATED_FIELD}
    return [f.name for f in fields(RunResult) if f.name not in nested] + ["result_file", "sweep"]


def read_rows(files: Sequence[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Flattened records of `files`, and a note for each file that could not be read.

    Read through each sweep's index (`memexp.sweepindex`): a record already indexed is not
    opened again.
    """
    by_sweep: dict[Path, list[Path]] = {}
    for path in files:
        by_sweep.setdefault(sweep_of(path), []).append(path)
    rows, notes = [], []
    for sweep, paths in by_sweep.items():
        read = sweepindex.read_rows(sweep, paths)
        rows += read.rows
        notes += read.notes
    return rows, notes


def _as_integers(series: pd.Series) -> pd.Series:
    """Nullable integers so byte counts print as `600`, not `600.0`; floats if any is fractional."""
    numeric = pd.to_numeric(series, errors="coerce")
    present = numeric.dropna()
    return numeric.astype("Int64") if (present == present.round()).all() else numeric


def _records_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One scalar per cell: list-valued columns are tables of their own (`memexp.tidy`)."""
    lists = list_columns(rows)
    found = [key for row in rows for key in row if key not in lists]
    columns = [c for c in dict.fromkeys(_record_columns() + found) if c not in lists]
    frame = pd.DataFrame(rows, columns=columns)
    for column in columns:
        if column in _INT_FIELDS or (column.startswith("phase_") and column.endswith("_bytes")):
            frame[column] = _as_integers(frame[column])
    return frame.sort_values(["sweep", "job_num"], kind="stable", ignore_index=True)


# --- derived columns -------------------------------------------------------------------------


def as_float(series: pd.Series) -> pd.Series:
    """Numbers as float64, anything unreadable as NaN: one dtype for arithmetic on any column."""
    return pd.to_numeric(series, errors="coerce").astype("float64")


def add_mib_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """`<name>_mib` next to every `<name>_bytes`, in MiB (2**20 bytes) as plots and tables show."""
    mib = {
        column.removesuffix("_bytes") + "_mib": as_float(frame[column]) / MIB
        for column in frame.columns
        if column.endswith("_bytes")
    }
    return frame.assign(**mib)


def _label_value(value: Any) -> str:
    return "?" if pd.isna(value) else str(value)


def _label_text(series: pd.Series) -> pd.Series:
    """A column as label text, `?` where it is missing (`_label_value` for a whole column)."""
    return series.astype(object).map(_label_value)


def _strategy_settings(overrides: pd.Series) -> pd.Series:
    """The `strategy.*` overrides of each row without their prefix, space-separated."""
    found = overrides.fillna("").astype(str).str.findall(r"(?:^|(?<=\s))strategy\.(\S+)")
    return found.str.join(" ")


def add_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """`workload`, `config` and `strategy_label`: short names a plot axis or table row can carry."""
    varying = [k for k in ("device", "precision", "attention") if frame[k].nunique() > 1]
    if frame.empty:
        empty = pd.Series(dtype=str)
        return frame.assign(workload=empty, config=empty, strategy_label=empty)
    workloads = _label_text(frame.seq_len) + "\u00d7" + _label_text(frame.batch_size)
    for key in varying:
        workloads = workloads + " " + _label_text(frame[key])
    settings = _strategy_settings(frame.overrides)
    return frame.assign(
        workload=workloads,
        config=_label_text(frame.model) + " " + workloads,
        strategy_label=_label_text(frame.strategy) + (" " + settings).where(settings.ne(""), ""),
    )


def _baselines(frame: pd.DataFrame) -> pd.DataFrame:
    """One ok `none` row per compared group (lowest job number), figures renamed `<col>_baseline`.

    The sweep is a key, and also kept as `sweep_baseline`, so the table names which job of which
    sweep each relative figure compares with.
    """
    candidates = frame[frame.strategy.eq(BASELINE_STRATEGY) & frame.status.eq(STATUS_OK)]
    chosen = candidates.sort_values("job_num", kind="stable").drop_duplicates(list(COMPARED_KEYS))
    figures = ["job_num", *SAVINGS.values(), TIME_COLUMN, *TIME_RANGE]
    renamed = chosen[[*COMPARED_KEYS, *figures]].rename(
        columns={c: f"{c}_baseline" for c in figures}
    )
    return renamed.assign(sweep_baseline=renamed.sweep)


def add_baseline_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Saved %, overhead % and efficiency against the group's baseline (see module docstring)."""
    merged = frame.merge(
        _baselines(frame), on=list(COMPARED_KEYS), how="left", validate="many_to_one"
    )
    ok = merged.status.eq(STATUS_OK)
    relative = {}
    for column, measured in SAVINGS.items():
        base, value = as_float(merged[f"{measured}_baseline"]), as_float(merged[measured])
        relative[column] = (100.0 * (base - value) / base).where(ok & (base > 0))
    base, value = as_float(merged[f"{TIME_COLUMN}_baseline"]), as_float(merged[TIME_COLUMN])
    overhead = (100.0 * (value - base) / base).where(ok & (base > 0))
    within = _ranges_overlap(
        [as_float(merged[c]) for c in TIME_RANGE],
        [as_float(merged[f"{c}_baseline"]) for c in TIME_RANGE],
    )
    within &= overhead.notna() & merged.job_num.ne(merged.job_num_baseline)
    relative["time_overhead_pct"] = overhead
    relative["time_within_noise"] = within
    relative["efficiency"] = (relative["peak_saved_pct"] / overhead).where((overhead > 0) & ~within)
    merged = merged.rename(
        columns={"job_num_baseline": "baseline_job_num", "sweep_baseline": "baseline_sweep"}
    )
    dropped = [c for c in merged.columns if c.endswith("_baseline")]
    return merged.drop(columns=dropped).assign(**relative)


def _ranges_overlap(
    first: Sequence[pd.Series | float], second: Sequence[pd.Series | float]
) -> pd.Series:
    """Whether the ranges (low, high) overlap; False where a bound is missing (NaN compares
    False), so a job without a range is never called within noise."""
    (low, high), (other_low, other_high) = first, second
    return pd.Series((low <= other_high) & (other_low <= high), dtype=bool)


def pareto_mask(
    groups: pd.Series,
    times: pd.Series,
    memory: pd.Series,
    time_ranges: tuple[pd.Series, pd.Series] | None = None,
) -> pd.Series:
    """True where no point of the same group is at least as good in both figures and strictly
    better in one (identical points do not beat each other).

    With `time_ranges` (min, max), two times whose ranges overlap are a tie (a difference within
    noise decides nothing); else the medians decide. Ties are not transitive, so each group is
    compared pairwise, as whole arrays: groups are one workload's strategies, a few dozen at most.
    """
    beaten = np.zeros(len(times), dtype=bool)
    median, mem = times.to_numpy(float), memory.to_numpy(float)
    if time_ranges is None:
        low = high = np.full(len(times), np.nan)
    else:
        low, high = (r.to_numpy(float) for r in time_ranges)
    for rows in groups.groupby(groups, sort=False).indices.values():
        t, m, lo, hi = median[rows], mem[rows], low[rows], high[rows]
        tie = (lo[:, None] <= hi[None, :]) & (lo[None, :] <= hi[:, None])  # [j, i]: j ties i
        faster = (t[:, None] < t[None, :]) & ~tie
        slower = (t[:, None] > t[None, :]) & ~tie
        no_worse = ~slower & (m[:, None] <= m[None, :])
        better = faster | (m[:, None] < m[None, :])
        beaten[rows] = (no_worse & better).any(axis=0)
    return pd.Series(~beaten, index=times.index, dtype=bool)


def add_pareto_column(frame: pd.DataFrame) -> pd.DataFrame:
    """`pareto_optimal` per compared group (one workload in one sweep) over (step time, peak
    memory), ok rows with both figures only; overlapping step-time ranges are ties."""
    optimal = pd.Series(False, index=frame.index, dtype=bool)
    measured = frame[frame.status.eq(STATUS_OK)].dropna(subset=["peak_bytes", TIME_COLUMN])
    if not measured.empty:
        groups = measured.groupby(list(COMPARED_KEYS), dropna=False).ngroup()
        ranges = (as_float(measured[TIME_RANGE[0]]), as_float(measured[TIME_RANGE[1]]))
        mask = pareto_mask(
            groups, as_float(measured[TIME_COLUMN]), as_float(measured.peak_bytes), ranges
        )
        optimal[mask.index] = mask
    return frame.assign(pareto_optimal=optimal)


def busy_machine(frame: pd.DataFrame) -> pd.Series:
    """Rows timed on a busy machine: the larger load average around the timed steps, less the
    job's own intra-op threads, is at least `BUSY_LOAD_FRACTION` of the CPUs it could use."""
    load = pd.concat(
        [as_float(frame.time_load_before), as_float(frame.time_load_after)], axis=1
    ).max(axis=1, skipna=True)
    others = load - as_float(frame.time_threads)
    return pd.Series(others >= BUSY_LOAD_FRACTION * as_float(frame.time_cpus), dtype=bool)


def add_busy_column(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(time_machine_busy=busy_machine(frame))


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    leading = [c for c in _LEADING_COLUMNS if c in frame.columns]
    return frame[leading + [c for c in frame.columns if c not in leading]]


def build_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The full table from flattened records: labels, MiB, baseline-relative and Pareto columns."""
    frame = add_labels(add_mib_columns(_records_frame(rows)))
    # One block per dtype (`copy` consolidates): every later selection of rows takes a few
    # blocks instead of each of some hundred columns on its own.
    return _ordered(add_busy_column(add_pareto_column(add_baseline_columns(frame)))).copy()


@dataclass
class SweepTable:
    """A sweep's records read once: the rows (for the tidy tables), the table built from them
    (`build_frame`), and what the reading noticed."""

    rows: list[dict]
    frame: pd.DataFrame
    notes: list[str]


def read_sweep(sweep_dir: Path) -> SweepTable:
    """The records whose aggregate belongs in `sweep_dir` (`sweepdir.sweep_of`), as one table.

    Built once per sweep: the end-of-sweep table (memexp.callbacks) and the outputs
    (memexp.summarize.write_outputs) share it.
    """
    sweep_dir = Path(sweep_dir)
    found = find_result_files([sweep_dir])
    mine = [path for path in found if sweep_of(path) == sweep_dir.resolve()]
    rows, read_notes = read_rows(mine)
    return SweepTable(rows, build_frame(rows), read_notes)


def load_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The table of every readable `result.json` under `paths` (folders, files or globs).

    Columns are described in the module docstring. Unreadable files are skipped here;
    `read_rows` names them.
    """
    rows, _ = read_rows(find_result_files(paths))
    return build_frame(rows)


# --- what a reader should be told --------------------------------------------------------------


def first_line(text: Any, limit: int = 200) -> str:
    """A message's first line, shortened: enough to tell failures apart without a traceback."""
    line = text.strip().splitlines()[0] if isinstance(text, str) and text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def _job_name(row: pd.Series) -> str:
    return f"job {_label_value(row.job_num)} ({row.config}, {row.strategy_label})"


def failure_notes(frame: pd.DataFrame) -> list[str]:
    """One line per job whose status is not ok: these rows carry no figures, so say why."""
    notes = []
    for row in frame[frame.status.ne(STATUS_OK)].itertuples(index=False):
        message = first_line(row.message)
        notes.append(f"{_job_name(row)}: {row.status}" + (f" \u2014 {message}" if message else ""))
    return notes


def baseline_notes(frame: pd.DataFrame) -> list[str]:
    """Groups whose relative columns are empty for lack of a baseline, and groups with several.

    Groups of batch=auto jobs alone get one note for all of them (`auto_batch_notes`).
    """
    notes = []
    auto = ran_auto_batch(frame)
    for _, group in frame.groupby(list(COMPARED_KEYS), dropna=False, sort=False):
        config = group.config.iloc[0]
        nones = group[group.strategy.eq(BASELINE_STRATEGY)]
        ok_nones = nones[nones.status.eq(STATUS_OK)]
        others_ok = group.status.eq(STATUS_OK) & group.strategy.ne(BASELINE_STRATEGY)
        if ok_nones.empty and others_ok.any() and not auto[group.index].all():
            why = f"the {BASELINE_STRATEGY} job ended {', '.join(nones.status)}"
            if nones.empty:
                why = f"no strategy={BASELINE_STRATEGY} job ran"
            notes.append(f"no baseline for {config} ({why}): its relative columns are empty")
        elif len(ok_nones) > 1:
            used = int(ok_nones.job_num.min())
            notes.append(
                f"{len(ok_nones)} ok baselines for {config}: relative columns use job {used}"
            )
    return notes


def _without_baseline(frame: pd.DataFrame) -> pd.Series:
    """Ok jobs other than `none` whose relative columns are empty for want of a baseline."""
    others = frame.status.eq(STATUS_OK) & frame.strategy.ne(BASELINE_STRATEGY)
    return others & frame.baseline_job_num.isna()


def auto_batch_notes(frame: pd.DataFrame) -> list[str]:
    """One line for every batch=auto job left without a baseline: empty on purpose, not lost."""
    count = int((ran_auto_batch(frame) & _without_baseline(frame)).sum())
    if not count:
        return []
    return [
        f"batch=auto: {count} job(s) ran at a batch no ok `{BASELINE_STRATEGY}` job of their "
        "workload ran at, so their saved (%), overhead (%) and efficiency are empty (those compare "
        'at equal batch); "Largest batch that fits" in summary.md compares their batches '
        "(\u00d7 none)"
    ]


def duplicate_notes(frame: pd.DataFrame) -> list[str]:
    """Jobs that share config and strategy label: plots show only the first of them."""
    ok = frame[frame.status.eq(STATUS_OK)]
    repeated = ok[ok.duplicated(["config", "strategy_label"], keep=False)]
    return [
        f"jobs {', '.join(_label_value(n) for n in group.job_num)} share {config} and "
        f"{label}: plots show job {_label_value(group.job_num.iloc[0])}"
        for (config, label), group in repeated.groupby(["config", "strategy_label"], sort=False)
    ]


def missing_result_notes(sweep_dir: Path) -> list[str]:
    """Job folders Hydra created that hold no `result.json`: the job died before writing it."""
    notes = []
    for job_dir in folders_without_record(sweep_dir):
        overrides = read_job_overrides(job_dir)
        said = (
            "overrides unreadable" if overrides is None else " ".join(overrides) or "no overrides"
        )
        notes.append(
            f"job folder {job_dir.name} has no {RESULT_FILE} (the process died before writing "
            f"it; overrides: {said})"
        )
    return notes


def data_notes(frame: pd.DataFrame) -> list[str]:
    """What a reader must know about the table before trusting a relative number or a plot."""
    if frame.empty:
        return [f"no {RESULT_FILE} found"]
    return (
        busy_notes(frame) + baseline_notes(frame) + auto_batch_notes(frame) + duplicate_notes(frame)
    )


def busy_notes(frame: pd.DataFrame) -> list[str]:
    """One line per job timed on a busy machine: its times measure the machine as much as it."""
    busy = frame[frame.time_machine_busy]
    return [
        f"{_job_name(row)} was timed on a busy machine: load average "
        f"{row.time_load_before:.2f} before, {row.time_load_after:.2f} after its timed steps, "
        f"with {_label_value(row.time_threads)} thread(s) of its own on "
        f"{_label_value(row.time_cpus)} CPU(s); its step times are not comparable"
        for row in busy.itertuples(index=False)
    ]


def ran_auto_batch(frame: pd.DataFrame) -> pd.Series:
    """Rows of jobs that searched their batch: each records the search's budget or its answer."""
    columns = [c for c in ("extra_auto_batch_size", "extra_auto_batch_budget_bytes") if c in frame]
    return frame[columns].notna().any(axis=1) if columns else pd.Series(False, frame.index)


if __name__ == "__main__":
    # The command line moved up to the module that also draws and writes; say where, not nothing.
    sys.exit("python -m memexp.aggregate is now python -m memexp.summarize (same arguments)")
