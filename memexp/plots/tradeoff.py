"""The memory-time trade-off: step time against peak memory per config, the Pareto frontier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from memexp.analysis import (
    config_order,
    strategy_order,
)
from memexp.figures import TRADEOFF_PNG, PlotOutcome
from memexp.plots.style import (
    capped_panels,
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


def _tradeoff_point(ax: Axes, row: Any, color: Any, right_half: bool) -> None:
    """One strategy: median time with min-max whiskers; its name beside the whisker, inward."""
    low = row.step_ms_min if pd.notna(row.step_ms_min) else row.step_ms_median
    high = row.step_ms_max if pd.notna(row.step_ms_max) else row.step_ms_median
    optimal = bool(row.pareto_optimal)
    ax.errorbar(
        row.step_ms_median,
        row.peak_mib,
        xerr=[[max(row.step_ms_median - low, 0)], [max(high - row.step_ms_median, 0)]],
        fmt="o",
        color=color,
        markersize=8 if optimal else 6,
        markeredgecolor="black" if optimal else "none",
        capsize=2,
        zorder=2,
    )
    ax.annotate(
        row.strategy_label,
        (low if right_half else high, row.peak_mib),
        fontsize="x-small",
        xytext=(-5 if right_half else 5, 0),
        textcoords="offset points",
        ha="right" if right_half else "left",
        va="center",
    )


def _tradeoff_axis(ax: Axes, rows: pd.DataFrame, colors: dict[str, Any]) -> None:
    """Points per strategy, the Pareto frontier dashed through the points no other one beats."""
    rows = rows.sort_values("step_ms_median")
    frontier = rows[rows.pareto_optimal.astype(bool)]
    ax.plot(frontier.step_ms_median, frontier.peak_mib, "--", color="0.5", zorder=1)
    middle = (rows.step_ms_median.min() + rows.step_ms_median.max()) / 2
    for row in rows.itertuples(index=False):
        _tradeoff_point(ax, row, colors[row.strategy_label], row.step_ms_median > middle)
    ax.margins(x=0.2, y=0.12)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5))


@styled
def plot_tradeoff(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Step time vs peak memory per config (at most `MAX_PANELS` panels, the cut named in the
    figure and the note); strategies on the frontier have a black edge.

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
    configs, cut = capped_panels(configs)
    colors = palette(strategy_order(data))
    rows, columns = grid_shape(len(configs))
    fig = Figure(figsize=(4.3 * columns + 2.5, 3.6 * rows + 1), layout="constrained")
    axes = panel_grid(fig, len(configs), "step time (ms, median)", "peak memory (MiB)")
    for ax, config in zip(axes, configs, strict=True):
        _tradeoff_axis(ax, data[data.config.eq(config)], colors)
        ax.set_title(config)
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
    fig.legend(
        handles=[*strategy_handles(colors), frontier],
        loc="outside right upper",
        title="strategy",
        frameon=False,
    )
    fig.suptitle(f"{title} (lower left is better)", fontweight="bold")
    shown = [f"Shown: {cut}."] if cut else []
    footer(
        fig,
        memory_footer(data),
        time_footer(data),
        "Whiskers: min\u2013max step time; overlapping whiskers tie on time for the frontier.",
        *shown,
    )
    drawn = data[data.config.isin(configs)][
        ["config", "strategy_label", "step_ms_median", "step_ms_min", "step_ms_max", "peak_mib"]
    ].assign(pareto_optimal=data.pareto_optimal.astype(bool))
    return PlotOutcome(title, save(fig, out_dir, TRADEOFF_PNG), cut, drawn.reset_index(drop=True))
