"""The sections a sweep's data may support: scaling with sequence length, the largest batch that
fits, dynamic batching's buckets, bytes kept for backward beside the closed form, and estimated
step times (fake device).

Each returns a `Section`: its lines, or why the data does not support it, so the page can list the
sections it left out instead of leaving a reader to wonder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from memexp.aggregate import BASELINE_STRATEGY, as_float
from memexp.analysis import (
    AUTO_BATCH_KEYS,
    FIT_POINTS,
    MEMORY_SOURCE_LABELS,
    MIN_SEQ_LENS,
    SCALING_KEYS,
    SCALING_VALUES,
    auto_batch_table,
    model_order,
    predicted_memory,
    seq_len_exponents,
    strategy_order,
)
from memexp.estimate import TIME_SOURCE_ESTIMATE
from memexp.figures import AUTO_BATCH_PNG, SCALING_PNG, PlotOutcome
from memexp.report.cells import (
    EN_DASH,
    MINUS,
    TIMES,
    bytes_cell,
    code,
    number,
    text_cell,
    values,
)
from memexp.results import STATUS_INFEASIBLE, STATUS_OK
from memexp.sweepdir import table_csv
from memexp.text import MIB, MISSING, markdown_table

ANALYTIC_SAVED = "extra_analytic_saved_activation_bytes"
ANALYTIC_NOTE = "extra_analytic_saved_activation_note"
ESTIMATED_STEP = "extra_estimated_step_ms"
# batch=dynamic's figures (`extra.dynamic_batch`) and its per-bucket list's table.
DYNAMIC_BATCH = "extra_dynamic_batch_"
DYNAMIC_BATCH_BUCKETS = "dynamic_batch_buckets"
EQUAL_TO_ANALYTIC = "= analytic"


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
        ks = [number(row[f"{value}_exponent"], 2) for value in SCALING_VALUES]
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
        + (" Device `fake`: predicted, not measured." if predicted_memory(fitted).any() else ""),
        "",
        markdown_table(headers, rows),
        *_figure_link(sweep_dir, figures, SCALING_PNG["seq_len"]),
    ]
    return Section(title, lines)


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
        peak = f"{bytes_cell(row.peak_bytes)} at batch {row.batch_size:g}"
        headroom = f"over by {bytes_cell(row.peak_bytes - row.budget_bytes)}"
    else:
        peak, headroom = bytes_cell(row.predicted_peak_bytes), bytes_cell(row.headroom_bytes)
    return [
        row.strategy_label,
        row.status,
        _found_batch(row),
        peak,
        headroom,
        bytes_cell(row.next_peak_bytes),
        number(row.times_none, 2),
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
            f"Budget {', '.join(map(bytes_cell, rows.budget_bytes.dropna().unique())) or MISSING} "
            "(`batch.budget_gb`, else `device.memory_gb`); peaks predicted on fake tensors "
            f"imagining {values(rows, 'imagines')}.",
            "",
            markdown_table(headers, (_auto_batch_cells(row) for _, row in rows.iterrows())),
        ]
    return Section(title, lines)


def _dynamic_batch_cells(row: pd.Series) -> list[str]:
    """strategy, status, lengths, budget, buckets, fixed batch, padding, steps, tokens/step."""

    def figure(name: str) -> object:
        return row.get(f"{DYNAMIC_BATCH}{name}")

    arrow = " → "
    return [
        row.strategy_label,
        row.status,
        f"{code(str(figure('lengths_file')))} ({number(figure('sequences'), 0)} sequences, "
        f"buckets by {figure('bucket_rule')})",
        bytes_cell(figure("budget_bytes")),
        number(figure("bucket_count"), 0),
        f"{number(figure('fixed_batch'), 0)} at {number(figure('longest_len'), 0)}",
        f"{number(figure('fixed_padding_pct'))}{arrow}{number(figure('padding_pct'))}",
        f"{number(figure('padding_saved_tokens'), 0)} ({number(figure('padding_saved_pct'))} %)",
        f"{number(figure('fixed_steps'), 0)}{arrow}{number(figure('steps'), 0)}",
        f"{number(figure('tokens_per_step_gain'), 2)}",
    ]


def _dynamic_batch_section(frame: pd.DataFrame) -> Section:
    title = "Dynamic batching"
    budget = f"{DYNAMIC_BATCH}budget_bytes"
    jobs = frame[frame[budget].notna()] if budget in frame else frame.iloc[:0]
    if jobs.empty:
        return Section(title, why_not="no job ran with `batch=dynamic`")
    headers = [
        "strategy",
        "status",
        "lengths",
        "budget",
        "buckets",
        "fixed batch at length",
        "padding % fixed → buckets",
        "padding tokens saved",
        "steps per pass fixed → buckets",
        f"own tokens/step {TIMES}",
    ]
    lines = [
        "`batch=dynamic`: the lengths cut into buckets; each bucket pads to its longest "
        "sequence and runs the largest batch whose predicted peak (fake tensors) fits the "
        "budget (at most the bucket's sequences), against one fixed batch (the largest that "
        "fits at the longest length) padding every sequence to the longest. Padding %: padding "
        "tokens / tokens carried; saved: padding tokens the buckets avoid (% of the fixed "
        f"batch's padding); own tokens/step {TIMES}: the sequences' own tokens per step, "
        "buckets over fixed batch, over one pass. Per bucket (lengths, batch, tokens per step, "
        "padding, predicted and, on a real device, measured peak bytes): "
        f"`{table_csv(DYNAMIC_BATCH_BUCKETS)}`.",
    ]
    for model, rows in _in_reading_order(jobs, frame).groupby("model", sort=False):
        lines += [
            "",
            f"### {model}",
            "",
            markdown_table(headers, (_dynamic_batch_cells(row) for _, row in rows.iterrows())),
        ]
    return Section(title, lines)


def _difference(row: pd.Series) -> str:
    """`= analytic` when the run's bytes equal the closed form, else the signed difference."""
    saved, analytic = row.saved_activation_bytes, row.get(ANALYTIC_SAVED)
    if pd.isna(analytic):
        return f"no closed form: {text_cell(row.get(ANALYTIC_NOTE))}"
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
    predicted = predicted_memory(ok)
    kinds = (
        ("measured", ok[~predicted], "Measured on a real step"),
        ("predicted", ok[predicted], "Predicted on fake tensors (nothing computed)"),
    )
    for kind, rows, heading in kinds:
        if rows.empty:
            continue
        # A sweep with no closed form anywhere (bf16 only) holds None there, not NaN.
        rows = rows.assign(**{ANALYTIC_SAVED: as_float(rows[ANALYTIC_SAVED])})
        sources = "; ".join(
            MEMORY_SOURCE_LABELS.get(s, s) for s in sorted(rows.memory_source.dropna().unique())
        )
        headers = ["config", "strategy", f"{kind} (MiB)", "closed form (MiB)"]
        headers.append(f"{kind} \u2212 closed form")
        cells = [
            [
                row.config,
                row.strategy_label,
                number(row.saved_activation_bytes / MIB, None),
                number(row[ANALYTIC_SAVED] / MIB, None),
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
    return number(value, 1) if value >= 10 else f"{value:.3g}"


def _estimated_time_section(frame: pd.DataFrame) -> Section:
    title = "Estimated step time (fake device)"
    ok = frame[frame.status.eq(STATUS_OK)]
    estimated = ok[ok[ESTIMATED_STEP].notna()] if ESTIMATED_STEP in ok else ok.iloc[:0]
    if estimated.empty:
        fake = predicted_memory(ok).any()
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
            number(row.get("extra_estimated_tokens_per_s"), 0),
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


def analysis_sections(
    sweep_dir: Path, frame: pd.DataFrame, figures: Sequence[PlotOutcome]
) -> list[list[str]]:
    """The sections the sweep's data supports, then one list of those it does not, with why."""
    sections = [
        _scaling_section(sweep_dir, frame, figures),
        _auto_batch_section(sweep_dir, frame, figures),
        _dynamic_batch_section(frame),
        _saved_vs_closed_form_section(frame),
        _estimated_time_section(frame),
    ]
    shown = [[f"## {s.title}", "", *s.lines] for s in sections if s.lines]
    skipped = [f"- {s.title}: {s.why_not}." for s in sections if not s.lines]
    return shown + ([["## Sections not shown", "", *skipped]] if skipped else [])
