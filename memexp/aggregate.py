"""Collect a sweep's `result.json` files into one table and compare every job with its baseline.

    python -m memexp.aggregate PATH... [--out FILE]

PATH is a sweep folder, a parent folder holding many sweeps, a job folder, a `result.json`, or a
glob of any of these (quoted globs are expanded here). Every sweep found gets `results.csv`,
`plots/*.png` and `summary.md`; `--out` also writes one CSV holding all jobs found.

The table (`load_results`) has one row per job, failed jobs included with their `status`:

* every `RunResult` field under its own name (units in the name: `_bytes`, `_ms`, `_flops`,
  `_pct`), except the nested ones, which are flattened so a CSV reader needs no JSON:
  `plan` -> `plan_<key>`, `environment` -> `env_<key>`, `extra` -> `extra_<key>` (values that
  are themselves lists or dicts stay JSON strings), `phase_bytes` -> `phase_<phase>_bytes`, and
  `overrides` -> one space-separated string;
* `result_file` (the file read) and `sweep` (the folder holding the job folder);
* `workload`: seq_len x batch_size (written with the sign U+00D7, e.g. `256x4`), followed by
  device, precision and attention when those vary in the table; `config`: the model and the
  workload, e.g. `small 256x4`, the label plots and tables use;
* `strategy_label`: the strategy name plus its `strategy.*` overrides (`full granularity=sublayer`),
  so two settings of one strategy stay apart;
* `<name>_mib` for every `<name>_bytes` column: bytes / 2**20, i.e. MiB, never MB;
* baseline-relative columns, computed only for `status == ok` rows against the `strategy == none`
  row with status ok of the same (model, seq_len, batch_size, device, precision, attention) group
  (the lowest job number wins when there are several), whose job number is `baseline_job_num`:
  `peak_saved_pct` = 100 * (baseline peak - peak) / baseline peak, and likewise
  `activation_saved_pct` (from `activations_bytes`) and `saved_activation_saved_pct` (from
  `saved_activation_bytes`); `time_overhead_pct` = 100 * (step - baseline step) / baseline step from
  `step_ms_median`; `efficiency` = `peak_saved_pct` / `time_overhead_pct`, i.e. % of peak memory
  saved per % of step time paid. Efficiency is NaN when the overhead is <= 0 (a strategy that costs
  no time has no finite price), and every relative cell is NaN without a baseline or when the
  baseline's figure is missing or zero;
* `pareto_optimal`: True for ok rows that no other ok row of the same group beats in both
  `step_ms_median` and `peak_bytes` (the memory/time frontier); False otherwise.

Jobs run with `batch=auto` each run at the largest batch that fits, so strategies of one workload
land in different groups and find no baseline: their relative columns stay empty (memory saved at
different batches would compare nothing), and `auto_batch_table` compares the batches instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd

from memexp.results import STATUS_OK, RunResult, read_result
from memexp.sweepdir import (
    PLOTS_DIR,
    RESULT_FILE,
    RESULTS_CSV,
    find_result_files,
    job_folders,
    read_job_overrides,
    sweep_of,
)
from memexp.text import MIB

BASELINE_STRATEGY = "none"
GROUP_KEYS = ("model", "seq_len", "batch_size", "device", "precision", "attention")

# Nested record fields and the prefix their keys get as columns.
NESTED_PREFIXES = {"plan": "plan", "environment": "env", "extra": "extra"}
# Saved-% columns and the measured column each compares with the baseline.
SAVINGS = {
    "peak_saved_pct": "peak_bytes",
    "activation_saved_pct": "activations_bytes",
    "saved_activation_saved_pct": "saved_activation_bytes",
}
TIME_COLUMN = "step_ms_median"
RELATIVE_COLUMNS = (*SAVINGS, "time_overhead_pct", "efficiency")
MEMORY_SOURCE_LABELS = {
    "cuda_allocator": "CUDA caching allocator (allocated bytes, GPU)",
    "tensor_tracker": "tensor tracker (exact bytes, CPU)",
    "fake_tensors": "fake tensors (bytes from shapes, nothing computed)",
}
# A batch=auto job's search: the workload it searched for, and the `extra` figures it recorded.
AUTO_BATCH_KEYS = ("model", "seq_len", "device", "precision", "attention")
AUTO_BATCH_EXTRAS = {
    "extra_auto_batch_size": "found_batch",
    "extra_auto_batch_budget_bytes": "budget_bytes",
    "extra_auto_batch_predicted_peak_bytes": "predicted_peak_bytes",
    "extra_auto_batch_headroom_bytes": "headroom_bytes",
    "extra_auto_batch_next_peak_bytes": "next_peak_bytes",
    "extra_auto_batch_limit_reached": "limit_reached",
    "extra_auto_batch_backoffs": "backoffs",
    "extra_auto_batch_imagines": "imagines",
}
_INT_FIELDS = [f.name for f in fields(RunResult) if str(f.type).startswith("int")]
_LEADING_COLUMNS = ["sweep", "job_num", "config", "strategy_label", "strategy", "status"]


@dataclass
class AggregateOutput:
    """What `aggregate_sweep` produced: the table, the files it wrote, what a reader should know."""

    frame: pd.DataFrame
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- finding and reading records -------------------------------------------------------------


def _flatten(values: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    """One column per key; lists and dicts stay JSON so every cell is a scalar."""
    flat = {}
    for key, value in (values or {}).items():
        scalar = value is None or isinstance(value, str | int | float | bool)
        flat[f"{prefix}_{key}"] = (
            value if scalar else json.dumps(value, sort_keys=True, default=str)
        )
    return flat


def _row(result: RunResult, result_file: Path) -> dict[str, Any]:
    row = result.to_dict()
    for name, prefix in NESTED_PREFIXES.items():
        row.update(_flatten(row.pop(name), prefix))
    row.update({f"phase_{k}_bytes": v for k, v in (row.pop("phase_bytes") or {}).items()})
    row["overrides"] = " ".join(row["overrides"] or [])
    row["result_file"] = str(result_file)
    row["sweep"] = str(sweep_of(result_file))
    return row


def _record_columns() -> list[str]:
    nested = {*NESTED_PREFIXES, "phase_bytes"}
    return [f.name for f in fields(RunResult) if f.name not in nested] + ["result_file", "sweep"]


def _read_rows(files: Sequence[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    rows, notes = [], []
    for path in files:
        try:
            rows.append(_row(read_result(path), path))
        except (OSError, ValueError, TypeError) as error:
            notes.append(f"could not read {path}: {type(error).__name__}: {error}")
    return rows, notes


def _as_integers(series: pd.Series) -> pd.Series:
    """Nullable integers so byte counts print as `600`, not `600.0`; floats if any is fractional."""
    numeric = pd.to_numeric(series, errors="coerce")
    present = numeric.dropna()
    return numeric.astype("Int64") if (present == present.round()).all() else numeric


def _records_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    columns = list(dict.fromkeys(_record_columns() + [key for row in rows for key in row]))
    frame = pd.DataFrame(rows, columns=columns)
    for column in columns:
        if column in _INT_FIELDS or (column.startswith("phase_") and column.endswith("_bytes")):
            frame[column] = _as_integers(frame[column])
    return frame.sort_values(["sweep", "job_num"], kind="stable", ignore_index=True)


# --- derived columns -------------------------------------------------------------------------


def _number(series: pd.Series) -> pd.Series:
    return pd.to_numeric(series, errors="coerce").astype("float64")


def add_mib_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """`<name>_mib` next to every `<name>_bytes`, in MiB (2**20 bytes) as plots and tables show."""
    mib = {
        column.removesuffix("_bytes") + "_mib": _number(frame[column]) / MIB
        for column in frame.columns
        if column.endswith("_bytes")
    }
    return frame.assign(**mib)


def _label_value(value: Any) -> str:
    return "?" if pd.isna(value) else str(value)


def add_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """`workload`, `config` and `strategy_label`: short names a plot axis or table row can carry."""
    varying = [k for k in ("device", "precision", "attention") if frame[k].nunique() > 1]

    def workload(row: pd.Series) -> str:
        shape = f"{_label_value(row.seq_len)}\u00d7{_label_value(row.batch_size)}"
        return " ".join([shape, *(_label_value(row[k]) for k in varying)])

    def strategy_label(row: pd.Series) -> str:
        settings = [
            o.removeprefix("strategy.") for o in row.overrides.split() if o.startswith("strategy.")
        ]
        return " ".join([_label_value(row.strategy), *settings])

    if frame.empty:
        empty = pd.Series(dtype=str)
        return frame.assign(workload=empty, config=empty, strategy_label=empty)
    workloads = frame.apply(workload, axis=1)
    return frame.assign(
        workload=workloads,
        config=frame.model.map(_label_value) + " " + workloads,
        strategy_label=frame.apply(strategy_label, axis=1),
    )


def _baselines(frame: pd.DataFrame) -> pd.DataFrame:
    """One ok `none` row per group (lowest job number), its figures renamed `<col>_baseline`."""
    candidates = frame[frame.strategy.eq(BASELINE_STRATEGY) & frame.status.eq(STATUS_OK)]
    chosen = candidates.sort_values("job_num", kind="stable").drop_duplicates(list(GROUP_KEYS))
    figures = ["job_num", *SAVINGS.values(), TIME_COLUMN]
    return chosen[[*GROUP_KEYS, *figures]].rename(columns={c: f"{c}_baseline" for c in figures})


def add_baseline_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Saved %, overhead % and efficiency against the group's baseline (see module docstring)."""
    merged = frame.merge(_baselines(frame), on=list(GROUP_KEYS), how="left", validate="many_to_one")
    ok = merged.status.eq(STATUS_OK)
    relative = {}
    for column, measured in SAVINGS.items():
        base, value = _number(merged[f"{measured}_baseline"]), _number(merged[measured])
        relative[column] = (100.0 * (base - value) / base).where(ok & (base > 0))
    base, value = _number(merged[f"{TIME_COLUMN}_baseline"]), _number(merged[TIME_COLUMN])
    overhead = (100.0 * (value - base) / base).where(ok & (base > 0))
    relative["time_overhead_pct"] = overhead
    relative["efficiency"] = (relative["peak_saved_pct"] / overhead).where(overhead > 0)
    merged = merged.rename(columns={"job_num_baseline": "baseline_job_num"})
    dropped = [c for c in merged.columns if c.endswith("_baseline")]
    return merged.drop(columns=dropped).assign(**relative)


def _pareto_mask(times: pd.Series, memory: pd.Series) -> pd.Series:
    """True where no other point is at least as good in both and strictly better in one."""

    def dominated(i: Any) -> bool:
        no_worse = (times <= times[i]) & (memory <= memory[i])
        better = (times < times[i]) | (memory < memory[i])
        return bool((no_worse & better).any())

    return pd.Series([not dominated(i) for i in times.index], index=times.index, dtype=bool)


def add_pareto_column(frame: pd.DataFrame) -> pd.DataFrame:
    """`pareto_optimal` per group over (step time, peak memory), ok rows with both figures only."""
    optimal = pd.Series(False, index=frame.index, dtype=bool)
    measured = frame[frame.status.eq(STATUS_OK)].dropna(subset=["peak_bytes", TIME_COLUMN])
    for _, group in measured.groupby(list(GROUP_KEYS), dropna=False):
        mask = _pareto_mask(_number(group[TIME_COLUMN]), _number(group.peak_bytes))
        optimal[mask.index] = mask
    return frame.assign(pareto_optimal=optimal)


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    leading = [c for c in _LEADING_COLUMNS if c in frame.columns]
    return frame[leading + [c for c in frame.columns if c not in leading]]


def build_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The full table from flattened records: labels, MiB, baseline-relative and Pareto columns."""
    frame = add_labels(add_mib_columns(_records_frame(rows)))
    return _ordered(add_pareto_column(add_baseline_columns(frame)))


def load_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """The table of every readable `result.json` under `paths` (folders, files or globs).

    Columns are described in the module docstring. Unreadable files are skipped here;
    `aggregate_sweep` names them in its notes.
    """
    rows, _ = _read_rows(find_result_files(paths))
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
    for _, group in frame.groupby(list(GROUP_KEYS), dropna=False, sort=False):
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
    for job_dir in job_folders(sweep_dir):
        if (job_dir / RESULT_FILE).is_file():
            continue
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
    return baseline_notes(frame) + auto_batch_notes(frame) + duplicate_notes(frame)


# --- labels shared by plots and report ----------------------------------------------------------


def config_order(frame: pd.DataFrame) -> list[str]:
    """Configs from the smallest model and workload to the largest, the way a reader scans them."""
    keys = frame.assign(
        _params=_number(frame.param_count).groupby(frame.model, dropna=False).transform("max")
    ).sort_values(["_params", "model", "seq_len", "batch_size", "config"], na_position="last")
    return list(dict.fromkeys(keys.config))


def model_order(frame: pd.DataFrame) -> list[str]:
    """Models in the order `config_order` puts their configs: smallest first."""
    model_of = frame.drop_duplicates("config").set_index("config").model
    return list(dict.fromkeys(model_of[c] for c in config_order(frame)))


def strategy_order(frame: pd.DataFrame) -> list[str]:
    """The baseline first, then the other labels alphabetically: stable colours and order."""
    labels = sorted(set(frame.strategy_label))
    return sorted(labels, key=lambda label: (label.split()[0] != BASELINE_STRATEGY, label))


def describe_memory_sources(frame: pd.DataFrame) -> str:
    """Where the memory figures of the ok rows came from, in words."""
    sources = frame.loc[frame.status.eq(STATUS_OK), "memory_source"].dropna().unique()
    return "; ".join(MEMORY_SOURCE_LABELS.get(s, str(s)) for s in sorted(sources)) or "unknown"


def _span(values: pd.Series) -> str:
    present = sorted({int(v) for v in values.dropna()})
    if not present:
        return "?"
    return str(present[0]) if len(present) == 1 else f"{present[0]}\u2013{present[-1]}"


def describe_times(frame: pd.DataFrame) -> str:
    """How the step times were taken: `median of N repeats (min-max)` plus the timer used.

    Only timed rows count: a fake-device job predicts memory and has no measured step.
    """
    ok = frame[frame.status.eq(STATUS_OK) & frame[TIME_COLUMN].notna()]
    if ok.empty:
        return "not measured (no ok job timed a step; fake-device jobs only predict memory)"
    timers = ", ".join(sorted(ok.time_source.dropna().unique())) or "timer unknown"
    return (
        f"median of {_span(ok.time_repeats)} repeats (min\u2013max) after "
        f"{_span(ok.time_warmup)} warm-up step(s), {timers}"
    )


# --- batch=auto ---------------------------------------------------------------------------------


def ran_auto_batch(frame: pd.DataFrame) -> pd.Series:
    """Rows of jobs that searched their batch: each records the search's budget or its answer."""
    columns = [c for c in ("extra_auto_batch_size", "extra_auto_batch_budget_bytes") if c in frame]
    return frame[columns].notna().any(axis=1) if columns else pd.Series(False, frame.index)


def auto_batch_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per batch=auto job: the batch it ran at and how many times the `none` job's batch.

    `batch` is the batch an ok job ran at (on a GPU, after any out-of-memory back-off), else the
    batch its search found: NaN when even the first batch tried did not fit, and then the record's
    `batch_size` and `peak_bytes` are that first batch and its predicted peak. `times_none` = batch / batch of the ok `none` job of the same
    (model, seq_len, device, precision, attention), the lowest job number winning; ok rows only.
    """
    jobs = frame[ran_auto_batch(frame)]
    extras = {
        name: _number(jobs[column]) if column in jobs else pd.Series(float("nan"), jobs.index)
        for column, name in AUTO_BATCH_EXTRAS.items()
        if name not in ("limit_reached", "imagines")
    }
    limit = jobs.get("extra_auto_batch_limit_reached", pd.Series(False, jobs.index))
    ok = jobs.status.eq(STATUS_OK)
    table = jobs[
        [*AUTO_BATCH_KEYS, "job_num", "strategy", "strategy_label", "status", "message"]
    ].assign(
        batch=_number(jobs.batch_size).where(ok, extras["found_batch"]),
        peak_bytes=_number(jobs.peak_bytes),
        batch_size=_number(jobs.batch_size),
        limit_reached=limit.eq(True),
        imagines=jobs.get("extra_auto_batch_imagines", pd.Series(None, jobs.index, dtype=object)),
        **extras,
    )
    found = table[table.strategy.eq(BASELINE_STRATEGY) & table.status.eq(STATUS_OK)]
    none = (
        found.dropna(subset=["batch"])
        .sort_values("job_num", kind="stable")
        .drop_duplicates(list(AUTO_BATCH_KEYS))[[*AUTO_BATCH_KEYS, "batch"]]
        .rename(columns={"batch": "none_batch"})
    )
    table = table.merge(none, on=list(AUTO_BATCH_KEYS), how="left", validate="many_to_one")
    table["times_none"] = (table.batch / table.none_batch).where(table.status.eq(STATUS_OK))
    return table


# --- whole sweeps -------------------------------------------------------------------------------


def aggregate_sweep(sweep_dir: Path) -> AggregateOutput:
    """Write `results.csv`, `plots/*.png` and `summary.md` into one sweep folder.

    Meant for the end of a Hydra multirun, so odd data (no baseline, failed jobs, one job, no job)
    becomes notes in the output rather than an exception that would hide the sweep's results.
    """
    from memexp import plots, report

    sweep_dir = Path(sweep_dir)
    rows, read_notes = _read_rows(find_result_files([sweep_dir]))
    frame = build_frame(rows)
    # Failed jobs get their own table in the summary; these notes are everything else.
    notes = read_notes + missing_result_notes(sweep_dir) + data_notes(frame)
    csv_path = sweep_dir / RESULTS_CSV
    frame.to_csv(csv_path, index=False)
    figures = plots.draw_all(frame, sweep_dir / PLOTS_DIR)
    summary = report.write_summary(sweep_dir, frame, notes, figures)
    written = [csv_path, *(f.path for f in figures if f.path), summary]
    figure_notes = [f.note for f in figures if f.note]
    return AggregateOutput(frame, written, failure_notes(frame) + notes + figure_notes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m memexp.aggregate",
        description="Aggregate sweeps: results.csv, plots/ and summary.md in every sweep folder.",
    )
    parser.add_argument("paths", nargs="+", help="sweep folders, parents of sweeps, or globs")
    parser.add_argument("--out", type=Path, help="also write every job found into this CSV")
    args = parser.parse_args(argv)

    files = find_result_files(args.paths)
    if not files:
        print(f"no {RESULT_FILE} under {' '.join(args.paths)}", file=sys.stderr)
        return 1
    for sweep in sorted({sweep_of(f) for f in files}):
        output = aggregate_sweep(sweep)
        ok = int(output.frame.status.eq(STATUS_OK).sum())
        print(f"{sweep}: {len(output.frame)} jobs ({ok} ok), wrote {len(output.written)} files")
        for note in output.notes:
            print(f"  note: {note}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        load_results(files).to_csv(args.out, index=False)
        print(f"all {len(files)} jobs: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
