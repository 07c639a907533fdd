"""Strategies compared: step and fwd+bwd peaks (MiB) and their saved %, step ms and overhead %,
a column of panels per model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from memexp.aggregate import BASELINE_STRATEGY
from memexp.analysis import (
    config_order,
    model_order,
    strategy_order,
)
from memexp.figures import COMPARISON_PNG, PlotOutcome
from memexp.plots.style import (
    FAILED_LEGEND,
    bar_offsets,
    capped_panels,
    category_axis,
    failed_rows,
    footer,
    mark_failures,
    memory_footer,
    ok_rows,
    palette,
    save,
    slot_text,
    strategy_handles,
    styled,
    time_footer,
)
from memexp.results import STATUS_OK

# --- 1. comparison ------------------------------------------------------------------------------

_COMPARISON_PANELS = (
    ("peak_mib", "step peak (MiB)"),
    ("peak_saved_pct", f"step peak saved\nvs {BASELINE_STRATEGY} (%)"),
    ("forward_backward_peak_mib", "fwd+bwd peak (MiB)"),
    ("forward_backward_peak_saved_pct", f"fwd+bwd peak saved\nvs {BASELINE_STRATEGY} (%)"),
    ("step_ms_median", "step time (ms)"),
    ("time_overhead_pct", f"step-time overhead\nvs {BASELINE_STRATEGY} (%)"),
)


def _grouped_bars(
    ax: Axes, data: pd.DataFrame, workloads: list[str], colors: dict[str, Any], column: str
) -> None:
    """Bars at each workload, one per strategy; step time gets min-max whiskers."""
    offsets, width = bar_offsets(colors)
    for label, color in colors.items():
        rows = data[data.strategy_label.eq(label)].set_index("workload").reindex(workloads)
        values = rows[column].astype(float)
        yerr = None
        if column == "step_ms_median":
            low = (values - rows.step_ms_min.astype(float)).clip(lower=0)
            high = (rows.step_ms_max.astype(float) - values).clip(lower=0)
            yerr = np.vstack([low.fillna(0), high.fillna(0)])
        x = np.arange(len(workloads)) + offsets[label]
        ax.bar(x, values, width, color=color, yerr=yerr, capsize=2, error_kw={"elinewidth": 0.8})


def comparison_panels(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """The panels some job has a figure for: a fake-device sweep has no step time, and a
    relative panel needs a strategy other than the baseline compared with it."""
    ok = frame[frame.status.eq(STATUS_OK)]
    compared = ok[ok.strategy.ne(BASELINE_STRATEGY)]
    return [
        (column, label)
        for column, label in _COMPARISON_PANELS
        if (compared if column.endswith("_pct") else ok)[column].notna().any()
    ]


def _comparison_column(
    axes: Sequence[Axes],
    model_rows: pd.DataFrame,
    colors: dict[str, Any],
    panels: Sequence[tuple[str, str]],
) -> None:
    """One model's panels; its workloads on x, failed jobs marked by their status."""
    workloads = list(dict.fromkeys(model_rows.sort_values(["seq_len", "batch_size"]).workload))
    data = ok_rows(model_rows, "peak_mib")
    offsets, _ = bar_offsets(colors)
    for ax, (column, _) in zip(axes, panels, strict=True):
        category_axis(ax, workloads)
        _grouped_bars(ax, data, workloads, colors, column)
        if column.endswith("_pct"):
            if data[column].notna().any():
                ax.axhline(0, color="0.2", linewidth=0.8)
            _mark_missing_baselines(ax, data, workloads, column)
        mark_failures(
            ax,
            failed_rows(model_rows),
            lambda row: workloads.index(row.workload) + offsets[row.strategy_label],
        )


def _mark_missing_baselines(
    ax: Axes, data: pd.DataFrame, workloads: list[str], column: str
) -> None:
    """Say so where a workload's ok jobs have no relative figure: its baseline is missing."""
    measured = data.groupby("workload")[column].count()
    for x, workload in enumerate(workloads):
        if workload in measured.index and measured[workload] == 0:
            slot_text(
                ax,
                x,
                0.5,
                f"no ok {BASELINE_STRATEGY}\nbaseline",
                va="center",
                bbox={"facecolor": "white", "edgecolor": "none"},
            )
    if not measured.any():
        ax.set_yticks([])  # nothing to measure against: no scale to read


@styled
def plot_comparison(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Step and fwd+bwd peaks (MiB) and saved %, step ms and overhead % per config and strategy,
    a column per model; at most `MAX_PANELS` configs (an evenly spaced subset, named in the
    figure and the note).

    Panels no job has a figure for are left out (see `comparison_panels`). Data: a row per bar
    slot (model, workload, strategy label) with the figure of each panel drawn.
    """
    title = "Strategies compared"
    if ok_rows(frame, "peak_mib").empty:
        return PlotOutcome(title, note="comparison skipped: no job finished ok with a peak memory")
    panels = comparison_panels(frame)
    shown, cut = capped_panels(config_order(frame))
    frame = frame[frame.config.isin(shown)]
    models, colors = model_order(frame), palette(strategy_order(frame))
    slots = [frame[frame.model.eq(m)].workload.nunique() for m in models]
    # Room for every bar of every workload, plus the axis labels and the legend.
    width = 2.5 + sum(max(2.2, n * (0.3 * len(colors) + 0.3)) for n in slots)
    height = 2.2 * len(panels) + 1.5
    fig = Figure(figsize=(min(40, max(7.5, width)), height), layout="constrained")
    grid = fig.subplots(len(panels), len(models), squeeze=False, sharex="col", width_ratios=slots)
    for column, model in enumerate(models):
        _comparison_column(grid[:, column], frame[frame.model.eq(model)], colors, panels)
        grid[0, column].set_title(model)
        grid[-1, column].set_xlabel("seq_len \u00d7 batch (tokens \u00d7 sequences)")
    for ax, (_, ylabel) in zip(grid[:, 0], panels, strict=True):
        ax.set_ylabel(ylabel)
    fig.legend(
        handles=strategy_handles(colors),
        loc="outside right upper",
        title="strategy",
        frameon=False,
    )
    fig.suptitle(title, fontweight="bold")
    timed = "step_ms_median" in dict(panels)
    whiskers = " Whiskers: min\u2013max step time." if timed else ""
    shown_line = [f"Shown: {cut}."] if cut else []
    scopes = "Step peak: the whole training step; fwd+bwd peak: forward, loss and backward."
    footer(
        fig,
        memory_footer(frame),
        scopes,
        time_footer(frame) + whiskers,
        FAILED_LEGEND,
        *shown_line,
    )
    drawn = ok_rows(frame, "peak_mib")[["model", "workload", "strategy_label", *dict(panels)]]
    path = save(fig, out_dir, COMPARISON_PNG)
    return PlotOutcome(title, path, cut, drawn.reset_index(drop=True))
