"""Where the memory goes at the peak: its parts stacked per strategy, side by side for each
sequence length, a panel per combination of what else varies (model, batch, ...)."""

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
    KEY_NAMES,
    MAX_INNER_VALUES,
    Facets,
    category_axis,
    facets,
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
# The bars one panel holds (strategies × sequence lengths): past it, lengths give way first (to
# one per panel), so a sweep of many strategies still draws bars a reader can tell apart.
MAX_PANEL_BARS = 24
COMPONENTS = (
    ("params_mib", "parameters"),
    ("grads_mib", "gradients"),
    ("optimizer_state_mib", "optimizer state"),
    ("activations_mib", "activations"),
    ("temporaries_mib", "temporaries"),
    ("other_mib", "other"),
)


def _slots(rows: pd.DataFrame, layout: Facets) -> list[tuple[Any, str]]:
    """(inner value, strategy label) of every bar in a panel, grouped by the inner value."""
    present = [v for v in layout.inner_values if rows[layout.inner].eq(v).any()]
    return [(value, label) for value in present for label in strategy_order(rows)]


def _slot_label(slot: tuple[Any, str], layout: Facets, grouped: bool) -> str:
    value, label = slot
    return f"{label}\n{KEY_NAMES.get(layout.inner, layout.inner)} {value}" if grouped else label


def _breakdown_axis(ax: Axes, rows: pd.DataFrame, colors: list[Any], layout: Facets) -> None:
    """One panel: a stacked bar per strategy and inner value, a black tick at the measured peak,
    failures named."""
    slots = _slots(rows, layout)
    grouped = len({value for value, _ in slots}) > 1
    keys = [layout.inner, "strategy_label"]
    data = ok_rows(rows, "peak_mib").set_index(keys).reindex(slots)
    x = np.arange(len(slots))
    bottom = np.zeros(len(slots))
    for (column, _), color in zip(COMPONENTS, colors, strict=True):
        values = data[column].astype(float).fillna(0).to_numpy()
        ax.bar(x, values, 0.7, bottom=bottom, color=color)
        bottom += values
    peaks = data.peak_mib.astype(float)
    ax.scatter(x, peaks, marker="_", s=500, color="black", zorder=3)
    category_axis(ax, [_slot_label(slot, layout, grouped) for slot in slots])
    # Explicit headroom: a thin top segment pins autoscaling exactly at the peak tick.
    ax.set_ylim(0, 1.06 * max(bottom.max(), peaks.max(skipna=True)))
    failed = failed_rows(rows)
    failed = failed[failed[layout.inner].isin(layout.inner_values)]
    mark_failures(ax, failed, lambda row: slots.index((row[layout.inner], row.strategy_label)))


@styled
def plot_breakdown(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Stacked parts of the peak per strategy and sequence length, a panel per combination of
    the other workload keys that vary (`style.facets`: at most `MAX_PANELS` panels and
    `MAX_INNER_VALUES` lengths, fewer where the strategies would fill a panel past
    `MAX_PANEL_BARS`; what was left out named in the figure and the note), the measured peak
    as a tick.

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
    drawn_rows = frame[frame.config.isin(configs)]
    strategies = max(drawn_rows.strategy_label.nunique(), 1)
    lengths = max(1, min(MAX_INNER_VALUES, MAX_PANEL_BARS // strategies))
    layout = facets(drawn_rows, inner_cap=lengths)
    colors = sns.color_palette("Set2", len(COMPONENTS))
    rows, columns = grid_shape(len(layout.panels))
    bars = max(len(_slots(p, layout)) for p in layout.panels.values())
    panel_width = max(4.0, 0.6 * bars + 1.5)
    fig = Figure(figsize=(panel_width * columns + 2, 4 * rows + 1), layout="constrained")
    axes = panel_grid(fig, len(layout.panels), "strategy", "memory at the peak (MiB)")
    for ax, (panel, panel_rows) in zip(axes, layout.panels.items(), strict=True):
        _breakdown_axis(ax, panel_rows, colors, layout)
        ax.set_title(panel)
    handles = [Patch(color=c, label=name) for (_, name), c in zip(COMPONENTS, colors, strict=True)]
    peak = Line2D([], [], color="black", marker="_", linestyle="", markersize=14, label="peak")
    fig.legend(handles=[peak, *handles[::-1]], loc="outside right upper", frameon=False)
    fig.suptitle(title, fontweight="bold")
    footer(fig, memory_footer(frame), FAILED_LEGEND, *layout.footer_lines())
    shown = pd.concat(layout.panels.values()).config
    drawn = measured[measured.config.isin(shown)][["config", "strategy_label", *parts, "peak_mib"]]
    path = save(fig, out_dir, BREAKDOWN_PNG)
    return PlotOutcome(title, path, layout.note, drawn.reset_index(drop=True))
