"""Where the memory goes at the peak: its parts stacked per strategy, a panel per config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from memexp.analysis import (
    config_order,
    strategy_order,
)
from memexp.figures import BREAKDOWN_PNG, PlotOutcome
from memexp.plots.style import (
    FAILED_LEGEND,
    capped_panels,
    category_axis,
    failed_rows,
    footer,
    grid_shape,
    mark_failures,
    memory_footer,
    ok_rows,
    panel_grid,
    save,
    styled,
)

# Breakdown of the peak: (column, legend label), bottom of the stack first.
COMPONENTS = (
    ("params_mib", "parameters"),
    ("grads_mib", "gradients"),
    ("optimizer_state_mib", "optimizer state"),
    ("activations_mib", "activations"),
    ("temporaries_mib", "temporaries"),
    ("other_mib", "other"),
)


def _breakdown_axis(ax: Axes, rows: pd.DataFrame, colors: list[Any]) -> None:
    """One config: a stacked bar per strategy, a black tick at the measured peak, failures named."""
    labels = strategy_order(rows)
    data = ok_rows(rows, "peak_mib").set_index("strategy_label").reindex(labels)
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for (column, _), color in zip(COMPONENTS, colors, strict=True):
        values = data[column].astype(float).fillna(0).to_numpy()
        ax.bar(x, values, 0.7, bottom=bottom, color=color)
        bottom += values
    peaks = data.peak_mib.astype(float)
    ax.scatter(x, peaks, marker="_", s=500, color="black", zorder=3)
    category_axis(ax, labels)
    # Explicit headroom: a thin top segment pins autoscaling exactly at the peak tick.
    ax.set_ylim(0, 1.06 * max(bottom.max(), peaks.max(skipna=True)))
    mark_failures(ax, failed_rows(rows), lambda row: labels.index(row.strategy_label))


@styled
def plot_breakdown(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Stacked parts of the peak per strategy, one panel per config (at most `MAX_PANELS`, the
    cut named in the figure and the note), the measured peak as a tick.

    Data: a row per bar (config, strategy label) with each part and the peak in MiB.
    """
    title = "Where the memory goes at the peak"
    parts = [c for c, _ in COMPONENTS]
    measured = ok_rows(frame, "peak_mib")
    configs = config_order(measured[measured[parts].notna().any(axis=1)])
    if not configs:
        return PlotOutcome(
            title, note="memory breakdown skipped: no ok job recorded parts of its peak"
        )
    configs, cut = capped_panels(configs)
    colors = sns.color_palette("Set2", len(COMPONENTS))
    rows, columns = grid_shape(len(configs))
    panel_width = max(4.0, 0.6 * frame.strategy_label.nunique() + 1.5)
    fig = Figure(figsize=(panel_width * columns + 2, 4 * rows + 1), layout="constrained")
    axes = panel_grid(fig, len(configs), "strategy", "memory at the peak (MiB)")
    for ax, config in zip(axes, configs, strict=True):
        _breakdown_axis(ax, frame[frame.config.eq(config)], colors)
        ax.set_title(config)
    handles = [Patch(color=c, label=name) for (_, name), c in zip(COMPONENTS, colors, strict=True)]
    peak = Line2D([], [], color="black", marker="_", linestyle="", markersize=14, label="peak")
    fig.legend(handles=[peak, *handles[::-1]], loc="outside right upper", frameon=False)
    fig.suptitle(title, fontweight="bold")
    footer(fig, memory_footer(frame), FAILED_LEGEND, *([f"Shown: {cut}."] if cut else []))
    drawn = measured[measured.config.isin(configs)][
        ["config", "strategy_label", *parts, "peak_mib"]
    ]
    path = save(fig, out_dir, BREAKDOWN_PNG)
    return PlotOutcome(title, path, cut, drawn.reset_index(drop=True))
