"""`summary.md`: one page that says what a sweep ran, on what, what it found and what went wrong.

It must read on its own, so every number carries its unit and source, every relative figure
names its baseline, times say how they were taken, and failed jobs are listed with their message
instead of vanishing from the tables.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from memexp.aggregate import BASELINE_STRATEGY, GROUP_KEYS, first_line
from memexp.analysis import (
    AUTO_BATCH_KEYS,
    FIT_POINTS,
    MEMORY_SOURCE_LABELS,
    MIN_SEQ_LENS,
    SCALING_KEYS,
    SCALING_VALUES,
    auto_batch_table,
    config_order,
    describe_memory_sources,
    describe_times,
    model_order,
    seq_len_exponents,
    strategy_order,
)
from memexp.estimate import TIME_SOURCE_ESTIMATE
from memexp.figures import AUTO_BATCH_PNG, SCALING_PNG, PlotOutcome
from memexp.results import SOURCE_FAKE_TENSORS, STATUS_INFEASIBLE, STATUS_OK
from memexp.sweepdir import MULTIRUN_YAML, SUMMARY_MD, read_sweep_overrides
from memexp.text import MIB, MISSING, format_bytes, markdown_table

EN_DASH = "\u2013"
TIMES = "\u00d7"
MINUS = "\u2212"

ANALYTIC_SAVED = "extra_analytic_saved_activation_bytes"
ANALYTIC_NOTE = "extra_analytic_saved_activation_note"
ESTIMATED_STEP = "extra_estimated_step_ms"
EQUAL_TO_ANALYTIC = "= analytic"

# --- markdown helpers ---------------------------------------------------------------------------


def _number(value: Any, digits: int | None = 1) -> str:
    """Fixed decimals; `digits=None` keeps two below 10 so a small model's MiB still differ."""
    if pd.isna(value):
        return MISSING
    if digits is None:
        digits = 2 if abs(value) < 10 else 1
    return f"{float(value):,.{digits}f}"


def _step_time(row: pd.Series) -> str:
    """`median (min-max)` in ms, the form the page's time legend promises."""
    median = _number(row.step_ms_median, None)
    if pd.isna(row.step_ms_min) or pd.isna(row.step_ms_max):
        return median
    low, high = _number(row.step_ms_min, None), _number(row.step_ms_max, None)
    return f"{median} ({low}{EN_DASH}{high})"


def _code(text: str) -> str:
    return f"`{text}`" if text else MISSING


def _text(value: Any) -> str:
    """A message's first line, or the missing mark (also for NaN, which is truthy)."""
    return first_line(value) or MISSING


def _figure(column: str, digits: int | None = 1) -> Callable[[pd.Series], str]:
    return lambda row: _number(row[column], digits)


# The results table: each header with the unit, and how one row fills that cell.
_RESULT_COLUMNS: tuple[tuple[str, Callable[[pd.Series], str]], ...] = (
    ("strategy", lambda row: row.strategy_label),
    ("status", lambda row: row.status),
    ("peak (MiB)", _figure("peak_mib", None)),
    ("peak saved (%)", _figure("peak_saved_pct")),
    ("activations (MiB)", _figure("activations_mib", None)),
    ("activations saved (%)", _figure("activation_saved_pct")),
    ("kept for backward (MiB)", _figure("saved_activation_mib", None)),
    ("kept for backward saved (%)", _figure("saved_activation_saved_pct")),
    (f"step (ms): median (min{EN_DASH}max)", _step_time),
    ("time overhead (%)", _figure("time_overhead_pct")),
    ("recompute FLOPs (%)", _figure("recompute_flops_pct")),
    ("efficiency (% saved per % time)", _figure("efficiency", 2)),
    ("Pareto-optimal", lambda row: "yes" if row.pareto_optimal else ""),
)


# --- sections -----------------------------------------------------------------------------------


def _header(sweep_dir: Path, frame: pd.DataFrame) -> list[str]:
    counts = frame.status.value_counts()
    by_status = ", ".join(f"{count} {status}" for status, count in counts.items())
    return [
        f"# Sweep summary: {sweep_dir.name}",
        "",
        f"Folder: `{sweep_dir}`. {len(frame)} job(s) with a result: {by_status or 'none'}.",
    ]


def _command_section(sweep_dir: Path, frame: pd.DataFrame) -> list[str]:
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
            lines += ["", "Hydra overrides: " + ", ".join(_code(h) for h in hydra)]
    jobs = frame.sort_values("job_num")
    rows = [(job.job_num, job.status, _code(job.overrides)) for job in jobs.itertuples()]
    lines += [
        "",
        f"<details><summary>Overrides of each job ({len(jobs)})</summary>",
        "",
        markdown_table(["job", "status", "overrides"], rows),
        "",
        "</details>",
    ]
    return lines


def _environment_section(frame: pd.DataFrame) -> list[str]:
    """Each `environment` key with its value, or every value seen when jobs disagree."""
    columns = [c for c in frame.columns if c.startswith("env_")]
    lines = ["## Environment", ""]
    if not columns:
        return [*lines, "No job recorded its environment."]
    rows = []
    for column in columns:
        values = [str(v) for v in dict.fromkeys(frame[column].dropna())]
        shown = ", ".join(values) or MISSING
        if len(values) > 1:
            shown += " (differs across jobs)"
        rows.append((column.removeprefix("env_"), shown))
    return [*lines, markdown_table(["item", "value"], rows)]


def _results_section(frame: pd.DataFrame) -> list[str]:
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


def _predicted(rows: pd.DataFrame) -> pd.Series:
    """Rows whose memory was predicted on fake tensors rather than measured on a real step."""
    return rows.memory_source.eq(SOURCE_FAKE_TENSORS)


def _workload_line(rows: pd.DataFrame) -> str:
    """The config's workload, and when its memory was predicted (fake tensors), that it was."""
    first = rows.iloc[0]
    line = ", ".join(f"{key} {_code(str(first[key]))}" for key in GROUP_KEYS) + "."
    if _predicted(rows).any():
        imagined = _values(rows, "extra_fake_imagines")
        line += (
            f" Predicted, not measured: the step ran on fake tensors (shapes only, nothing "
            f"computed), imagining {imagined}; there are no measured times."
        )
    return line


def _values(rows: pd.DataFrame, column: str) -> str:
    """The distinct values of a column, in code marks; `unknown` when absent or empty."""
    present = rows[column].dropna().unique() if column in rows else []
    return ", ".join(_code(str(v)) for v in sorted(map(str, present))) or "unknown"


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
        f"- Memory (MiB = 2^20 bytes): {describe_memory_sources(frame)}; peak allocated over one "
        "training step, its parts at the moment of the peak.",
        f"- Kept for backward: bytes autograd saves for backward, excluding parameters; source: "
        f"{_sources(frame, 'saved_source')}.",
        f"- Step time: {describe_times(frame)}{_estimates_pointer(frame)}.",
        f"- Recompute FLOPs: extra FLOPs spent recomputing, as % of a step without checkpointing; "
        f"source: {_sources(frame, 'flops_source')}.",
        f"- Relative columns compare with the ok `strategy={BASELINE_STRATEGY}` job of the same "
        f"{', '.join(GROUP_KEYS)}: saved (%) = 100 \u00b7 (baseline \u2212 value) / baseline, "
        "time overhead (%) = 100 \u00b7 (step \u2212 baseline step) / baseline step.",
        "- Efficiency: peak saved (%) divided by time overhead (%); empty when the overhead is "
        "zero or negative, where a ratio would mislead.",
        "- Pareto-optimal: no other strategy of the same config has both less peak memory and "
        "a shorter step.",
        f"- {MISSING}: not measured (failed job, or a figure this device lacks) or no baseline.",
    ]


def _plots_section(sweep_dir: Path, figures: Sequence[PlotOutcome]) -> list[str]:
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


def _failures_section(frame: pd.DataFrame) -> list[str]:
    failed = frame[frame.status.ne(STATUS_OK)].sort_values("job_num")
    lines = ["## Jobs that did not finish ok", ""]
    if frame.empty:
        return [*lines, "No job wrote a result."]
    if failed.empty:
        return [*lines, f"Every job with a result ({len(frame)}) finished ok."]
    rows = [
        (r.job_num, r.config, r.strategy_label, r.status, _text(r.error_type), _text(r.message))
        for r in failed.itertuples(index=False)
    ]
    headers = ["job", "config", "strategy", "status", "error type", "message"]
    return [*lines, markdown_table(headers, rows)]


def _notes_section(notes: Sequence[str]) -> list[str]:
    return ["## Notes", "", *([f"- {n}" for n in notes] or ["Nothing unusual."])]


# --- predictions, closed forms and scaling ------------------------------------------------------


@dataclass
class Section:
    """A section the data may or may not support: its lines, or why it is not shown."""

    title: str
    lines: list[str] = field(default_factory=list)
    why_not: str | None = None


def _figure_link(sweep_dir: Path, figures: Sequence[PlotOutcome], name: str) -> list[str]:
    """A line linking the drawn figure named `name`, or nothing when it was not drawn."""
    for figure in figures:
        if figure.path and Path(figure.path).name == name:
            link = Path(os.path.relpath(figure.path, sweep_dir)).as_posix()
            return ["", f"Figure: [{figure.title}]({link}) (also under Plots)."]
    return []


def _in_reading_order(rows: pd.DataFrame, frame: pd.DataFrame, *then: str) -> pd.DataFrame:
    """Rows by model (smallest first), then the `then` columns, then strategy (baseline first)."""
    ranks = {
        "model": {m: i for i, m in enumerate(model_order(frame))},
        "strategy_label": {s: i for i, s in enumerate(strategy_order(rows))},
    }
    return rows.sort_values(
        ["model", *then, "strategy_label"],
        key=lambda column: column.map(ranks[column.name]) if column.name in ranks else column,
        kind="stable",
    )


def _fit_range(row: pd.Series) -> str:
    """The sequence lengths k was fitted over; both figures' ranges when they differ."""
    ranges = {
        f"{int(row[f'{v}_seq_len_min'])}{EN_DASH}{int(row[f'{v}_seq_len_max'])} "
        f"({int(row[f'{v}_points'])} lengths)"
        for v in SCALING_VALUES
        if pd.notna(row[f"{v}_points"])
    }
    return " / ".join(sorted(ranges))


def _scaling_section(
    sweep_dir: Path, frame: pd.DataFrame, figures: Sequence[PlotOutcome]
) -> Section:
    title = "How memory grows with sequence length"
    fits = seq_len_exponents(frame)
    names = {"strategy_label": "strategy", "batch_size": "batch"}
    headers = [names.get(k, k) for k in SCALING_KEYS]
    ok = frame[frame.status.eq(STATUS_OK)]
    if fits.empty:
        most = ok.groupby(list(SCALING_KEYS), dropna=False).seq_len.nunique().max()
        return Section(
            title,
            why_not=f"needs {MIN_SEQ_LENS} or more sequence lengths of one configuration "
            f"({', '.join(headers)}) with ok jobs; the most in this sweep is "
            f"{0 if pd.isna(most) else int(most)}",
        )
    fitted = ok.merge(fits[list(SCALING_KEYS)], on=list(SCALING_KEYS))
    headers += [f"k of {name}" for name in SCALING_VALUES.values()] + ["fit over seq_len"]
    rows = []
    for _, row in _in_reading_order(fits, frame).iterrows():
        ks = [_number(row[f"{value}_exponent"], 2) for value in SCALING_VALUES]
        rows.append([row[k] for k in SCALING_KEYS] + ks + [_fit_range(row)])
    lines = [
        "k in memory \u221d s^k (s: sequence length) is the least-squares slope of log(memory) "
        f"against log(s) over each configuration's {FIT_POINTS} longest sequence lengths (the "
        "fit range), from ok jobs: doubling s multiplies memory by 2^k. Naive attention keeps "
        "a\u00b7b\u00b7s\u00b2 softmax probabilities per layer, so its k tends to 2 at long "
        "sequences; fused attention (`attention=sdpa`) and attention-core recomputation keep "
        "O(s) per layer and stay near 1. The peak also holds weights and optimizer state, which "
        "do not grow with s, so its k stays lower until activations dominate. Kept for "
        "backward: bytes autograd saves for backward."
        + (" Device `fake`: predicted, not measured." if _predicted(fitted).any() else ""),
        "",
        markdown_table(headers, rows),
        *_figure_link(sweep_dir, figures, SCALING_PNG["seq_len"]),
    ]
    return Section(title, lines)


def _bytes(value: Any) -> str:
    return MISSING if pd.isna(value) else format_bytes(int(value))


def _found_batch(row: pd.Series) -> str:
    """The batch, marked when the search hit its limit or a GPU backed off from the prediction."""
    if pd.isna(row.batch):
        return "none fits" if row.status == STATUS_INFEASIBLE else MISSING
    if row.limit_reached:
        return f"\u2265 {row.batch:g} (search limit)"
    if row.backoffs > 0:
        return (
            f"{row.batch:g} (predicted {row.found_batch:g}; {row.backoffs:g} out-of-memory "
            "back-off(s))"
        )
    return f"{row.batch:g}"


def _auto_batch_cells(row: pd.Series) -> list[str]:
    """strategy, status, batch, predicted peak, headroom, next batch's peak, \u00d7 none."""
    if pd.isna(row.batch) and pd.notna(row.peak_bytes):  # nothing fit: the first batch's peak
        peak = f"{_bytes(row.peak_bytes)} at batch {row.batch_size:g}"
        headroom = f"over by {_bytes(row.peak_bytes - row.budget_bytes)}"
    else:
        peak, headroom = _bytes(row.predicted_peak_bytes), _bytes(row.headroom_bytes)
    return [
        row.strategy_label,
        row.status,
        _found_batch(row),
        peak,
        headroom,
        _bytes(row.next_peak_bytes),
        _number(row.times_none, 2),
    ]


def _auto_batch_section(
    sweep_dir: Path, frame: pd.DataFrame, figures: Sequence[PlotOutcome]
) -> Section:
    title = "Largest batch that fits"
    table = auto_batch_table(frame)
    if table.empty:
        return Section(title, why_not="no job ran with `batch=auto`")
    headers = [
        "strategy",
        "status",
        "largest batch",
        "predicted peak at that batch",
        "headroom to budget",
        "batch + 1 needs",
        f"{TIMES} {BASELINE_STRATEGY}",
    ]
    lines = [
        "`batch=auto`: the largest batch whose predicted peak (fake tensors) fits the budget, "
        f"found by doubling then bisecting, so batch + 1 was tried and did not fit. {TIMES} "
        f"{BASELINE_STRATEGY} = that batch / the batch of the ok `{BASELINE_STRATEGY}` job of the "
        f"same {', '.join(AUTO_BATCH_KEYS)} ({MISSING} without one). Memory: MiB = 2^20 bytes, "
        "GiB = 2^30 bytes.",
        *_figure_link(sweep_dir, figures, AUTO_BATCH_PNG),
    ]
    ordered = _in_reading_order(table, frame, "seq_len", "device", "precision", "attention")
    for key, rows in ordered.groupby(list(AUTO_BATCH_KEYS), dropna=False, sort=False):
        model, seq_len, device, precision, attention = key
        lines += [
            "",
            f"### {model} \u00b7 seq {seq_len} \u00b7 {device} \u00b7 {precision} \u00b7 "
            f"{attention}",
            "",
            f"Budget {', '.join(map(_bytes, rows.budget_bytes.dropna().unique())) or MISSING} "
            "(`batch.budget_gb`, else `device.memory_gb`); peaks predicted on fake tensors "
            f"imagining {_values(rows, 'imagines')}.",
            "",
            markdown_table(headers, (_auto_batch_cells(row) for _, row in rows.iterrows())),
        ]
    return Section(title, lines)


def _difference(row: pd.Series) -> str:
    """`= analytic` when the run's bytes equal the closed form, else the signed difference."""
    saved, analytic = row.saved_activation_bytes, row.get(ANALYTIC_SAVED)
    if pd.isna(analytic):
        return f"no closed form: {_text(row.get(ANALYTIC_NOTE))}"
    if pd.isna(saved):
        return MISSING
    difference = int(saved) - int(analytic)
    if difference == 0:
        return EQUAL_TO_ANALYTIC
    return f"{difference:+,} B ({100 * difference / int(analytic):+.2f} %)".replace("-", MINUS)


def _saved_vs_closed_form_section(frame: pd.DataFrame) -> Section:
    title = "Kept for backward: measured or predicted, beside the closed form"
    if ANALYTIC_SAVED not in frame:
        return Section(title, why_not="no job recorded `extra.analytic_saved_activation_bytes`")
    ok = frame[frame.status.eq(STATUS_OK)]
    ok = ok[ok.saved_activation_bytes.notna() | ok[ANALYTIC_SAVED].notna()]
    if ok.empty:
        return Section(title, why_not="no ok job recorded bytes kept for backward")
    lines = [
        "Bytes autograd keeps for backward after the forward and loss (parameters excluded): "
        "measured on a real step or predicted on fake tensors (both counted by saved-tensor "
        "hooks), beside the closed form of docs/memory_model.md "
        f"(`extra.analytic_saved_activation_bytes`; fp32, no op-level policy). "
        f"`{EQUAL_TO_ANALYTIC}`: equal to the byte; otherwise run \u2212 closed form in bytes.",
    ]
    predicted = _predicted(ok)
    kinds = (
        ("measured", ok[~predicted], "Measured on a real step"),
        ("predicted", ok[predicted], "Predicted on fake tensors (nothing computed)"),
    )
    for kind, rows, heading in kinds:
        if rows.empty:
            continue
        sources = "; ".join(
            MEMORY_SOURCE_LABELS.get(s, s) for s in sorted(rows.memory_source.dropna().unique())
        )
        headers = ["config", "strategy", f"{kind} (MiB)", "closed form (MiB)"]
        headers.append(f"{kind} \u2212 closed form")
        cells = [
            [
                row.config,
                row.strategy_label,
                _number(row.saved_activation_bytes / MIB, None),
                _number(row[ANALYTIC_SAVED] / MIB, None),
                _difference(row),
            ]
            for _, row in _in_reading_order(rows, frame, "seq_len", "batch_size").iterrows()
        ]
        lines += [
            "",
            f"### {heading}",
            "",
            f"Memory source: {sources or 'unknown'}.",
            "",
            markdown_table(headers, cells),
        ]
    return Section(title, lines)


def _estimate_ms(value: float) -> str:
    """Three significant digits below 10 ms: a small model's step is microseconds at a GPU's peak."""
    return _number(value, 1) if value >= 10 else f"{value:.3g}"


def _estimated_time_section(frame: pd.DataFrame) -> Section:
    title = "Estimated step time (fake device)"
    ok = frame[frame.status.eq(STATUS_OK)]
    estimated = ok[ok[ESTIMATED_STEP].notna()] if ESTIMATED_STEP in ok else ok.iloc[:0]
    if estimated.empty:
        fake = _predicted(ok).any()
        why = (
            "the fake-device jobs had no `device.peak_tflops` (TFLOP/s of the imagined device), "
            "so no step time was estimated; they measure none"
            if fake
            else "no fake-device job: every step time in this summary is measured"
        )
        return Section(title, why_not=why)

    def assumed(row: pd.Series) -> str:
        utilization, peak = (
            row.get("extra_estimate_utilization"),
            row.get("extra_estimate_peak_tflops"),
        )
        if pd.isna(utilization) or pd.isna(peak):
            return "FLOPs (utilization not recorded)"
        return f"FLOPs at {utilization:.0%} of {peak:g} TFLOP/s"

    headers = [
        "config",
        "strategy",
        "step (ms), estimated",
        "estimated from",
        "tokens/s, estimated",
    ]
    cells = [
        [
            row.config,
            row.strategy_label,
            _estimate_ms(row[ESTIMATED_STEP]),
            assumed(row),
            _number(row.get("extra_estimated_tokens_per_s"), 0),
        ]
        for _, row in _in_reading_order(estimated, frame, "seq_len", "batch_size").iterrows()
    ]
    lines = [
        "Not measured: the step's counted FLOPs (matrix products and attention, recomputation "
        "included) divided by the assumed utilization of the imagined device's peak "
        f"(`time_source: {TIME_SOURCE_ESTIMATE}`). Only those FLOPs are counted, so this is a lower "
        "bound at that utilization. Measured step times appear only in Results.",
        "",
        markdown_table(headers, cells),
    ]
    return Section(title, lines)


def _analysis_sections(
    sweep_dir: Path, frame: pd.DataFrame, figures: Sequence[PlotOutcome]
) -> list[list[str]]:
    """The sections the sweep's data supports, then one list of those it does not, with why."""
    sections = [
        _scaling_section(sweep_dir, frame, figures),
        _auto_batch_section(sweep_dir, frame, figures),
        _saved_vs_closed_form_section(frame),
        _estimated_time_section(frame),
    ]
    shown = [[f"## {s.title}", "", *s.lines] for s in sections if s.lines]
    skipped = [f"- {s.title}: {s.why_not}." for s in sections if not s.lines]
    return shown + ([["## Sections not shown", "", *skipped]] if skipped else [])


# --- the page -----------------------------------------------------------------------------------


def render_summary(
    sweep_dir: Path, frame: pd.DataFrame, notes: Sequence[str], figures: Sequence[PlotOutcome]
) -> str:
    """The markdown text of `summary.md` (see `write_summary`)."""
    sweep_dir = Path(sweep_dir)
    sections = [_header(sweep_dir, frame), _command_section(sweep_dir, frame)]
    sections.append(_environment_section(frame))
    if not frame.empty:
        sections.append(_results_section(frame))
        sections += _analysis_sections(sweep_dir, frame, figures)
    sections += [_plots_section(sweep_dir, figures), _failures_section(frame)]
    sections.append(_notes_section(notes))
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def write_summary(
    sweep_dir: Path, frame: pd.DataFrame, notes: Sequence[str], figures: Sequence[PlotOutcome]
) -> Path:
    """Write `summary.md` into the sweep folder; plots are linked relative to it."""
    path = Path(sweep_dir) / SUMMARY_MD
    path.write_text(render_summary(sweep_dir, frame, notes, figures))
    return path
