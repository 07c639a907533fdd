"""The sections every summary.md has: header, command, environment, results, plots, failures, notes.

They must read on their own, so every number carries its unit and source, every relative figure
names its baseline, times say how they were taken, and failed jobs are listed with their message
instead of vanishing from the tables.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from memexp.aggregate import BASELINE_STRATEGY, BUSY_LOAD_FRACTION, GROUP_KEYS, TIME_COLUMN
from memexp.analysis import (
    config_order,
    describe_memory_sources,
    describe_times,
    predicted_memory,
    strategy_order,
    sweep_time,
)
from memexp.figures import PlotOutcome
from memexp.report.cells import (
    EN_DASH,
    code,
    number,
    text_cell,
    values,
)
from memexp.report.findings import ESTIMATED_STEP
from memexp.results import STATUS_OK
from memexp.sweepdir import (
    MULTIRUN_YAML,
    RESULT_FILE,
    folders_without_record,
    read_sweep_overrides,
)
from memexp.text import MISSING, markdown_table

WITHIN_NOISE = "within noise"
BUSY_MARK = "busy machine"


def _step_time(row: pd.Series) -> str:
    """`median (min-max)` in ms, the form the page's time legend promises; marked when timed on
    a busy machine."""
    median = number(row.step_ms_median, None)
    busy = f"; {BUSY_MARK}" if row.time_machine_busy else ""
    if pd.isna(row.step_ms_min) or pd.isna(row.step_ms_max):
        return median + busy
    low, high = number(row.step_ms_min, None), number(row.step_ms_max, None)
    return f"{median} ({low}{EN_DASH}{high}){busy}"


def _time_overhead(row: pd.Series) -> str:
    """The overhead %, or `within noise` where the two jobs' step-time ranges overlap."""
    return WITHIN_NOISE if row.time_within_noise else number(row.time_overhead_pct)


def _figure(column: str, digits: int | None = 1) -> Callable[[pd.Series], str]:
    return lambda row: number(row[column], digits)


# The results table: each header with the unit, and how one row fills that cell.
_RESULT_COLUMNS: tuple[tuple[str, Callable[[pd.Series], str]], ...] = (
    ("strategy", lambda row: row.strategy_label),
    ("status", lambda row: row.status),
    ("step peak (MiB)", _figure("peak_mib", None)),
    ("step peak saved (%)", _figure("peak_saved_pct")),
    ("fwd+bwd peak (MiB)", _figure("forward_backward_peak_mib", None)),
    ("fwd+bwd peak saved (%)", _figure("forward_backward_peak_saved_pct")),
    ("activations (MiB)", _figure("activations_mib", None)),
    ("activations saved (%)", _figure("activation_saved_pct")),
    ("kept for backward (MiB)", _figure("saved_activation_mib", None)),
    ("kept for backward saved (%)", _figure("saved_activation_saved_pct")),
    (f"step (ms): median (min{EN_DASH}max)", _step_time),
    ("time overhead (%)", _time_overhead),
    ("recompute FLOPs (%)", _figure("recompute_flops_pct")),
    ("efficiency (% saved per % time)", _figure("efficiency", 2)),
    ("Pareto-optimal", lambda row: "yes" if row.pareto_optimal else ""),
)


def header(sweep_dir: Path, frame: pd.DataFrame) -> list[str]:
    counts = frame.status.value_counts()
    by_status = ", ".join(f"{count} {status}" for status, count in counts.items())
    lines = [
        f"# Sweep summary: {sweep_dir.name}",
        "",
        f"Folder: `{sweep_dir}`. {len(frame)} job(s) with a result: {by_status or 'none'}.",
        *_time_line(frame),
        *_busy_headline(frame),
    ]
    pending = len(folders_without_record(sweep_dir))
    if pending:
        lines += [
            "",
            f"**Partial summary:** {pending} job folder(s) hold no `{RESULT_FILE}` yet (still "
            "running, or the process died before writing it; see Notes). Summarize again when "
            "the sweep has ended: records already read are taken from the sweep's index.",
        ]
    return lines


def _time_line(frame: pd.DataFrame) -> list[str]:
    """The sweep's wall time and the share of it its training steps took (`analysis.SweepTime`)."""
    timing = sweep_time(frame)
    return [] if timing is None else ["", f"Time: {timing.describe()}."]


def _busy_headline(frame: pd.DataFrame) -> list[str]:
    """A warning above everything when any job was timed on a busy machine."""
    busy = int(frame.time_machine_busy.sum()) if "time_machine_busy" in frame else 0
    if not busy:
        return []
    timed = int(frame[TIME_COLUMN].notna().sum())
    return [
        "",
        f"**Warning: {busy} of {timed} timed job(s) ran on a busy machine** (other load held "
        f"at least {BUSY_LOAD_FRACTION:.0%} of the CPUs; marked `{BUSY_MARK}`, listed under "
        "Notes): their step times, overheads and Pareto marks may say more about the machine "
        "than the strategy. Rerun when it is idle, or with `measure.threads=1`.",
    ]


def command_section(sweep_dir: Path, frame: pd.DataFrame) -> list[str]:
    lines = ["## Command", ""]
    overrides = read_sweep_overrides(sweep_dir)
    if overrides is None:
        lines.append(f"No readable `{MULTIRUN_YAML}` here; the per-job overrides are below.")
    else:
        task, hydra = overrides
        command = " ".join(["python -m memexp -m", *map(shlex.quote, task)])
        lines += [
            f"Reconstructed from `{MULTIRUN_YAML}` (`hydra.overrides.task`):",
            "",
            "```",
            command,
            "```",
        ]
        if hydra:
            lines += ["", "Hydra overrides: " + ", ".join(code(h) for h in hydra)]
    jobs = frame.sort_values("job_num")
    rows = [(job.job_num, job.status, code(job.overrides)) for job in jobs.itertuples()]
    lines += [
        "",
        f"<details><summary>Overrides of each job ({len(jobs)})</summary>",
        "",
        markdown_table(["job", "status", "overrides"], rows),
        "",
        "</details>",
    ]
    return lines


def environment_section(frame: pd.DataFrame) -> list[str]:
    """Each `environment` key with its value, or every value seen when jobs disagree."""
    columns = [c for c in frame.columns if c.startswith("env_")]
    lines = ["## Environment", ""]
    if not columns:
        return [*lines, "No job recorded its environment."]
    rows = []
    for column in columns:
        seen = [str(v) for v in dict.fromkeys(frame[column].dropna())]
        shown = ", ".join(seen) or MISSING
        if len(seen) > 1:
            shown += " (differs across jobs)"
        rows.append((column.removeprefix("env_"), shown))
    return [*lines, markdown_table(["item", "value"], rows)]


def results_section(frame: pd.DataFrame) -> list[str]:
    """One table per config, strategies in the plots' order, failed jobs kept with their status."""
    headers = [header for header, _ in _RESULT_COLUMNS]
    lines = ["## Results", "", *_legend(frame)]
    for config in config_order(frame):
        rows = frame[frame.config.eq(config)]
        order = {label: i for i, label in enumerate(strategy_order(rows))}
        rows = rows.sort_values("strategy_label", key=lambda s: s.map(order), kind="stable")
        lines += ["", f"### {config}", "", _workload_line(rows), ""]
        cells = ([fill(row) for _, fill in _RESULT_COLUMNS] for _, row in rows.iterrows())
        lines.append(markdown_table(headers, cells))
    return lines


def _workload_line(rows: pd.DataFrame) -> str:
    """The config's workload, and when its memory was predicted (fake tensors), that it was."""
    first = rows.iloc[0]
    line = ", ".join(f"{key} {code(str(first[key]))}" for key in GROUP_KEYS) + "."
    if predicted_memory(rows).any():
        imagined = values(rows, "extra_fake_imagines")
        line += (
            f" Predicted, not measured: the step ran on fake tensors (shapes only, nothing "
            f"computed), imagining {imagined}; there are no measured times."
        )
    return line


def _sources(frame: pd.DataFrame, column: str) -> str:
    ok = frame[frame.status.eq(STATUS_OK)]
    return ", ".join(sorted(map(str, ok[column].dropna().unique()))) or "not recorded"


def _estimates_pointer(frame: pd.DataFrame) -> str:
    """Where fake-device step-time estimates went, since they are never in the measured columns."""
    if ESTIMATED_STEP not in frame or frame[ESTIMATED_STEP].isna().all():
        return ""
    return '; fake-device estimates from FLOPs are under "Estimated step time", not here'


def _legend(frame: pd.DataFrame) -> list[str]:
    """What every column means and where its numbers come from, once, above the tables."""
    return [
        f"- Memory (MiB = 2^20 bytes): {describe_memory_sources(frame)}; step peak: allocated "
        "over one whole training step (optimizer step included), its parts at the moment of "
        "the peak; fwd+bwd peak: over forward, loss and backward only, where checkpointing "
        "acts.",
        f"- Kept for backward: bytes autograd saves for backward, excluding parameters; source: "
        f"{_sources(frame, 'saved_source')}.",
        f"- Step time: {describe_times(frame)}{_estimates_pointer(frame)}.",
        f"- Recompute FLOPs: extra FLOPs spent recomputing, as % of a step without checkpointing; "
        f"source: {_sources(frame, 'flops_source')}.",
        f"- Relative columns compare with the ok `strategy={BASELINE_STRATEGY}` job of the same "
        f"{', '.join(GROUP_KEYS)}: saved (%) = 100 \u00b7 (baseline \u2212 value) / baseline, "
        "time overhead (%) = 100 \u00b7 (step \u2212 baseline step) / baseline step; "
        f"`{WITHIN_NOISE}` where the job's and the baseline's step times (min\u2013max) overlap, "
        "so the difference is no larger than their own spread.",
        "- Efficiency: step peak saved (%) divided by time overhead (%); empty when the overhead "
        "is zero, negative or within noise, where a ratio would mislead.",
        "- Pareto-optimal: no other strategy of the same config has both less peak memory and "
        "a shorter step; step times whose min\u2013max ranges overlap count as equal.",
        f"- `{BUSY_MARK}`: the 1-minute load average around the timed steps, less the job's own "
        f"threads, was at least {BUSY_LOAD_FRACTION:.0%} of its CPUs.",
        f"- {MISSING}: not measured (failed job, or a figure this device lacks) or no baseline.",
    ]


def plots_section(sweep_dir: Path, figures: Sequence[PlotOutcome]) -> list[str]:
    lines = ["## Plots"]
    for figure in (f for f in figures if f.path):
        link = Path(os.path.relpath(figure.path, sweep_dir)).as_posix()
        lines += ["", f"### {figure.title}", "", f"![{figure.title}]({link})"]
        if figure.note:
            lines += ["", f"Note: {figure.note}"]
    skipped = [f for f in figures if not f.path]
    if skipped:
        lines += ["", "### Not drawn", ""] + [f"- {f.title}: {f.note}" for f in skipped]
    return lines


def failures_section(frame: pd.DataFrame) -> list[str]:
    failed = frame[frame.status.ne(STATUS_OK)].sort_values("job_num")
    lines = ["## Jobs that did not finish ok", ""]
    if frame.empty:
        return [*lines, "No job wrote a result."]
    if failed.empty:
        return [*lines, f"Every job with a result ({len(frame)}) finished ok."]
    rows = [
        (
            r.job_num,
            r.config,
            r.strategy_label,
            r.status,
            text_cell(r.error_type),
            text_cell(r.message),
        )
        for r in failed.itertuples(index=False)
    ]
    headers = ["job", "config", "strategy", "status", "error type", "message"]
    return [*lines, markdown_table(headers, rows)]


def notes_section(notes: Sequence[str]) -> list[str]:
    return ["## Notes", "", *([f"- {n}" for n in notes] or ["Nothing unusual."])]
