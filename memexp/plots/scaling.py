"""Scaling: memory (and step time where measured) against sequence length or batch, log-log."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from memexp.aggregate import GROUP_KEYS
from memexp.analysis import (
    model_order,
    strategy_order,
)
from memexp.figures import SCALING_PNG, PlotOutcome
from memexp.plots.style import (
    footer,
    memory_footer,
    ok_rows,
    palette,
    save,
    strategy_handles,
    styled,
    time_footer,
)

SCALING_AXES = {"seq_len": "sequence length", "batch_size": "batch size"}
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")


def _series_keys(data: pd.DataFrame, axis: str) -> list[str]:
    """Workload keys other than the model and the swept axis that vary: each gets a line style."""
    return [k for k in GROUP_KEYS if k not in ("model", axis) and data[k].nunique() > 1]


def _series_label(values: tuple, keys: list[str]) -> str:
    names = {"seq_len": "seq", "batch_size": "batch"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in zip(keys, values, strict=True))


# Rows of the scaling figure: (column, y label); a row is drawn when any job has its figure.
SCALING_PANELS = (
    ("peak_mib", "peak memory (MiB, log scale)"),
    ("saved_activation_mib", "kept for backward (MiB, log scale)"),
    ("step_ms_median", "step time (ms, log scale)"),
)


def scaling_panels(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """The rows of `SCALING_PANELS` some job has a figure for (fake-device jobs have no time)."""
    return [(column, label) for column, label in SCALING_PANELS if frame[column].notna().any()]


def _scaling_lines(axes: dict[str, Axes], rows: pd.DataFrame, axis: str, style: dict) -> None:
    """One series in every row of panels; step time gets its min-max band."""
    rows = rows.sort_values(axis)
    x = rows[axis].astype(float)
    for column, ax in axes.items():
        ax.plot(x, rows[column].astype(float), **style)
    timed = "step_ms_median" in axes
    if timed and rows.step_ms_min.notna().all() and rows.step_ms_max.notna().all():
        axes["step_ms_median"].fill_between(
            x,
            rows.step_ms_min.astype(float),
            rows.step_ms_max.astype(float),
            color=style["color"],
            alpha=0.15,
            linewidth=0,
        )


# y ticks of a log axis: 1-2-5 per decade, denser when the data spans less than a decade or so.
LOG_TICKS_WIDE = (1.0, 2.0, 5.0)
LOG_TICKS_NARROW = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0)


def _log_log_axis(ax: Axes, values: Sequence[float]) -> None:
    """Log-log with the swept values as x ticks and plain numbers on y, not powers of ten."""
    low, high = ax.dataLim.intervaly
    narrow = low > 0 and high / low < 20
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(values, [str(int(v)) for v in values])
    ax.xaxis.set_minor_locator(NullLocator())
    subs = LOG_TICKS_NARROW if narrow else LOG_TICKS_WIDE
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())


def _scaling_column(
    axes: dict[str, Axes], rows: pd.DataFrame, axis: str, colors: dict[str, Any]
) -> dict[str, Line2D]:
    """One model: a line per strategy and other varying workload key; returns legend handles."""
    keys = _series_keys(rows, axis)
    series = sorted({tuple(k) for k in rows[keys].itertuples(index=False)}) if keys else [()]
    handles = {}
    for group_key, group in rows.groupby(["strategy_label", *keys], sort=False):
        n = series.index(tuple(group_key[1:]))
        style = {"linestyle": LINE_STYLES[n % 4], "marker": MARKERS[n % 4], "markersize": 4}
        _scaling_lines(axes, group, axis, {"color": colors[group_key[0]], **style})
        if keys:
            name = _series_label(group_key[1:], keys)
            handles[name] = Line2D([], [], color="0.3", label=name, **style)
    ticks = sorted(rows[axis].astype(float).unique())
    for ax in axes.values():
        _log_log_axis(ax, ticks)
    return handles


@styled
def plot_scaling(frame: pd.DataFrame, out_dir: Path, axis: str) -> PlotOutcome:
    """Memory (and step time where measured) against `axis`, log-log, a column per model.

    Rows: peak memory; the bytes kept for backward where recorded; step time where measured
    (fake-device jobs predict memory only, so a sweep of them has no time row). Data: a row per
    point (model, strategy label, the other workload keys, `axis`) with each row's figure.
    """
    noun = SCALING_AXES[axis]
    title = f"Scaling with {noun}"
    data = ok_rows(frame, axis, "peak_mib")
    # A line needs one strategy at two values; batch=auto gives each strategy its own batch.
    series = ["model", "strategy_label", *(k for k in GROUP_KEYS if k not in ("model", axis))]
    counts = data.groupby(series, dropna=False)[axis].nunique().groupby(level="model").max()
    models = [m for m in model_order(data) if counts.get(m, 0) >= 2]
    if not models:
        many = data[axis].nunique() >= 2
        why = (
            f"no strategy of a model ran at two values of {noun}"
            if many
            else f"only one {noun} in the sweep"
        )
        return PlotOutcome(title, note=f"scaling vs {axis} skipped: {why}")
    data = data[data.model.isin(models)]
    panels = scaling_panels(data)
    colors = palette(strategy_order(data))
    fig = Figure(
        figsize=(max(7.5, 4.2 * len(models) + 2), 3.4 * len(panels) + 0.7), layout="constrained"
    )
    grid = fig.subplots(len(panels), len(models), squeeze=False)
    series_handles: dict[str, Line2D] = {}
    unit = "tokens" if axis == "seq_len" else "sequences"
    for column, model in enumerate(models):
        axes = {name: grid[row, column] for row, (name, _) in enumerate(panels)}
        series_handles |= _scaling_column(axes, data[data.model.eq(model)], axis, colors)
        grid[0, column].set_title(model)
        grid[-1, column].set_xlabel(f"{noun} ({unit}, log scale)")
    for row, (_, ylabel) in enumerate(panels):
        grid[row, 0].set_ylabel(ylabel)
    fig.legend(
        handles=strategy_handles(colors) + list(series_handles.values()),
        loc="outside right upper",
        title="strategy",
        frameon=False,
    )
    fig.suptitle(title, fontweight="bold")
    time_lines = [time_footer(data)]
    if "step_ms_median" in dict(panels):
        time_lines.append("Bands: min\u2013max step time.")
    footer(fig, memory_footer(data), " ".join(time_lines))
    drawn = data[[*series, axis, *dict(panels)]].sort_values([*series, axis])
    return PlotOutcome(
        title, save(fig, out_dir, SCALING_PNG[axis]), data=drawn.reset_index(drop=True)
    )
