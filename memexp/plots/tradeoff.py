"""The memory-time trade-off: step time against peak memory, a Pareto frontier per workload;
sequence lengths share a panel (one marker each), a panel per combination of what else varies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from memexp.analysis import (
    config_order,
    strategy_order,
)
from memexp.figures import TRADEOFF_PNG, PlotOutcome
from memexp.plots.style import (
    KEY_NAMES,
    Facets,
    facets,
    footer,
    grid_shape,
    memory_footer,
    ok_rows,
    palette,
    panel_grid,
    save,
    strategy_handles,
    styled,
    time_footer,
)

MARKERS = ("o", "s", "^", "D", "v")
# Log axes read 2, 5, 10, 20, ..., not 2×10⁰: decades and their 2s and 5s, the rest unlabelled.
PLAIN = FuncFormatter(lambda value, _: f"{value:g}")
SPARSE = FuncFormatter(lambda value, _: f"{value:g}" if f"{value:.0e}"[0] in "25" else "")


def _tradeoff_point(
    ax: Axes, row: Any, color: Any, right_half: bool, marker: str, named: bool
) -> None:
    """One strategy: median time with min-max whiskers; its name beside the whisker, inward."""
    low = row.step_ms_min if pd.notna(row.step_ms_min) else row.step_ms_median
    high = row.step_ms_max if pd.notna(row.step_ms_max) else row.step_ms_median
    optimal = bool(row.pareto_optimal)
    ax.errorbar(
        row.step_ms_median,
        row.peak_mib,
        xerr=[[max(row.step_ms_median - low, 0)], [max(high - row.step_ms_median, 0)]],
        fmt=marker,
        color=color,
        markersize=8 if optimal else 6,
        markeredgecolor="black" if optimal else "none",
        capsize=2,
        zorder=2,
    )
    if not named:
        return
    ax.annotate(
        row.strategy_label,
        (low if right_half else high, row.peak_mib),
        fontsize="x-small",
        xytext=(-5 if right_half else 5, 0),
        textcoords="offset points",
        ha="right" if right_half else "left",
        va="center",
    )


def _tradeoff_axis(ax: Axes, rows: pd.DataFrame, colors: dict[str, Any], layout: Facets) -> None:
    """Points per strategy, one marker per inner value (sequence length), each workload's
    Pareto frontier dashed through the points no other one beats; strategies are named beside
    their points when the panel holds one workload, and both axes are logarithmic when it holds
    several (they lie decades apart)."""
    rows = rows.sort_values("step_ms_median")
    values = [v for v in layout.inner_values if rows[layout.inner].eq(v).any()]
    middle = (rows.step_ms_median.min() + rows.step_ms_median.max()) / 2
    for value in values:
        workload = rows[rows[layout.inner].eq(value)]
        frontier = workload[workload.pareto_optimal.astype(bool)]
        ax.plot(frontier.step_ms_median, frontier.peak_mib, "--", color="0.5", zorder=1)
        marker = MARKERS[layout.inner_values.index(value) % len(MARKERS)]
        for row in workload.itertuples(index=False):
            right = row.step_ms_median > middle
            color = colors[row.strategy_label]
            _tradeoff_point(ax, row, color, right, marker, named=len(values) == 1)
    if len(values) > 1:
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(PLAIN)
            axis.set_minor_formatter(SPARSE)
    ax.margins(x=0.2, y=0.12)
    if len(values) == 1:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))


@styled
def plot_tradeoff(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Step time vs peak memory, sequence lengths as markers in a panel per combination of the
    other workload keys that vary (`style.facets`: at most `MAX_PANELS` panels and
    `MAX_INNER_VALUES` lengths, what was left out named in the figure and the note); strategies
    on their workload's frontier have a black edge.

    Data: a row per point (config, strategy label), its times, peak MiB and `pareto_optimal`.
    """
    title = "Memory\u2013time trade-off"
    data = ok_rows(frame, "peak_mib", "step_ms_median")
    counts = data.groupby("config").strategy_label.nunique()
    configs = [c for c in config_order(data) if counts.get(c, 0) >= 2]
    if not configs:
        return PlotOutcome(
            title, note="trade-off skipped: no config has two strategies with memory and time"
        )
    data = data[data.config.isin(configs)]
    layout = facets(data)
    colors = palette(strategy_order(data))
    rows, columns = grid_shape(len(layout.panels))
    fig = Figure(figsize=(4.3 * columns + 2.5, 3.6 * rows + 1), layout="constrained")
    axes = panel_grid(fig, len(layout.panels), "step time (ms, median)", "peak memory (MiB)")
    for ax, (panel, panel_rows) in zip(axes, layout.panels.items(), strict=True):
        _tradeoff_axis(ax, panel_rows, colors, layout)
        ax.set_title(panel)
    frontier = Line2D(
        [],
        [],
        color="0.5",
        linestyle="--",
        marker="o",
        markeredgecolor="black",
        markerfacecolor="white",
        label="Pareto frontier\n(black edge: on it)",
    )
    inner_name = KEY_NAMES.get(layout.inner, layout.inner)
    markers = [
        Line2D(
            [],
            [],
            color="0.3",
            marker=MARKERS[i % len(MARKERS)],
            linestyle="",
            label=f"{inner_name} {v}",
        )
        for i, v in enumerate(layout.inner_values)
    ]
    fig.legend(
        handles=[*strategy_handles(colors), frontier, *(markers if len(markers) > 1 else [])],
        loc="outside right upper",
        title="strategy",
        frameon=False,
    )
    fig.suptitle(f"{title} (lower left is better)", fontweight="bold")
    footer(
        fig,
        memory_footer(data),
        time_footer(data),
        "Whiskers: min\u2013max step time; overlapping whiskers tie on time for the frontier.",
        *layout.footer_lines(),
    )
    shown = pd.concat(layout.panels.values()).config
    drawn = data[data.config.isin(shown)][
        ["config", "strategy_label", "step_ms_median", "step_ms_min", "step_ms_max", "peak_mib"]
    ].assign(pareto_optimal=data.pareto_optimal.astype(bool))
    path = save(fig, out_dir, TRADEOFF_PNG)
    return PlotOutcome(title, path, layout.note, drawn.reset_index(drop=True))
