"""The figures of one sweep, drawn from the table `memexp.aggregate.load_results` builds.

Each `plot_*` function takes that table and a folder and returns a `PlotOutcome`: the PNG it
wrote, or a one-line note saying why the sweep's data cannot support the figure (one sequence
length gives no scaling curve; that is not an error). Only ok rows are drawn, one per config and
strategy label. Memory is in MiB (2**20 bytes), times in ms with min-max bars or bands, and every
figure names its memory source in a footer.

Figures are built on matplotlib's object API (`Figure`, rendered to PNG by the Agg canvas) rather
than pyplot, so drawing inside a Hydra callback touches no global GUI state; seaborn supplies the
style and the colour-blind-safe palette, the same colour for a strategy in every figure.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator
from matplotlib.transforms import blended_transform_factory

from memexp.aggregate import (
    AUTO_BATCH_KEYS,
    BASELINE_STRATEGY,
    GROUP_KEYS,
    MEMORY_SOURCE_LABELS,
    auto_batch_table,
    config_order,
    describe_memory_sources,
    describe_times,
    model_order,
    strategy_order,
)
from memexp.results import STATUS_OK
from memexp.text import MIB, format_bytes

DPI = 120
PANEL_COLUMNS = 3
# Breakdown of the peak: (column, legend label), bottom of the stack first.
COMPONENTS = (
    ("params_mib", "parameters"),
    ("grads_mib", "gradients"),
    ("optimizer_state_mib", "optimizer state"),
    ("activations_mib", "activations"),
    ("temporaries_mib", "temporaries"),
    ("other_mib", "other"),
)
SCALING_AXES = {"seq_len": "sequence length", "batch_size": "batch size"}
PHASE_MARKERS = {"backward": "v", "optimizer": "s"}  # drawn where each phase starts
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D")
FAILED_LEGEND = "A status written instead of a bar: that job did not finish ok."


@dataclass(frozen=True)
class PlotOutcome:
    """One figure: the PNG written, or why not. A note may also accompany a written figure."""

    title: str
    path: Path | None = None
    note: str | None = None


# --- shared helpers -----------------------------------------------------------------------------


def _styled(draw: Callable[..., PlotOutcome]) -> Callable[..., PlotOutcome]:
    """Apply the seaborn style for one figure only, leaving the caller's rcParams untouched."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> PlotOutcome:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
            return draw(*args, **kwargs)

    return wrapper


def _ok_rows(frame: pd.DataFrame, *required: str) -> pd.DataFrame:
    """Ok rows with every required figure, one per (config, strategy label): the first job wins."""
    ok = frame[frame.status.eq(STATUS_OK)].dropna(subset=list(required))
    return ok.drop_duplicates(["config", "strategy_label"])


def _palette(labels: Sequence[str]) -> dict[str, Any]:
    """Colour-blind-safe colours; beyond its ten, evenly spaced hues so no two strategies share."""
    name = "colorblind" if len(labels) <= 10 else "husl"
    return dict(zip(labels, sns.color_palette(name, len(labels)), strict=True))


def _strategy_handles(colors: dict[str, Any]) -> list[Patch]:
    return [Patch(color=color, label=label) for label, color in colors.items()]


def _grid_shape(count: int, columns: int = PANEL_COLUMNS) -> tuple[int, int]:
    """(rows, columns) for `count` panels at most `columns` wide."""
    columns = min(columns, count)
    return -(-count // columns), columns


def _panels(fig: Figure, count: int, xlabel: str, ylabel: str) -> list[Axes]:
    """`count` axes filling the figure's grid row by row; only the outer ones carry axis labels."""
    rows, columns = _grid_shape(count)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for index, ax in enumerate(axes):
        ax.set_visible(index < count)
        if index % columns == 0:
            ax.set_ylabel(ylabel)
        if index + columns >= count:  # nothing drawn below it
            ax.set_xlabel(xlabel)
    return list(axes[:count])


def _footer(fig: Figure, *lines: str) -> None:
    """Sources and units under the panels, in a strip the layout keeps free so nothing overlaps."""
    size = FontProperties(size="small").get_size_in_points()
    height = (len(lines) + 1) * 1.4 * size / 72 / fig.get_figheight()
    fig.get_layout_engine().set(rect=(0, height, 1, 1 - height))
    text = "\n".join(lines)
    fig.text(0.5, 0.2 * height, text, ha="center", va="bottom", fontsize=size, color="0.3")


def _memory_footer(frame: pd.DataFrame) -> str:
    return f"Memory source: {describe_memory_sources(frame)}. 1 MiB = 2^20 bytes."


def _time_footer(frame: pd.DataFrame) -> str:
    return f"Step time: {describe_times(frame)}."


def _save(fig: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=DPI)
    return path


def _category_axis(ax: Axes, labels: Sequence[str]) -> None:
    """Category ticks for bars; long or many labels lean, anchored at the tick, never overlap."""
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.grid(axis="x", visible=False)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    if len(labels) > 4 or max(map(len, labels), default=0) > 12:
        for label in ax.get_xticklabels():
            label.set(rotation=30, horizontalalignment="right", rotation_mode="anchor")


def _slot_text(ax: Axes, x: float, y: float, text: str, **kwargs: Any) -> None:
    """Text at data position `x` and at height `y` as a fraction of the axes."""
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    ax.text(x, y, text, transform=transform, ha="center", color="0.35", **kwargs)


def _mark_failures(ax: Axes, failed: pd.DataFrame, x_of: Callable[[pd.Series], float]) -> None:
    """Write a failed job's status where its bar would stand, so a gap never looks like zero."""
    for _, row in failed.iterrows():
        _slot_text(ax, x_of(row), 0.02, row.status, rotation=90, va="bottom", fontsize="small")


def _failed_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Failed jobs whose config and strategy have no ok job: their slot would otherwise be empty."""
    keys = ["config", "strategy_label"]
    drawn = pd.MultiIndex.from_frame(frame.loc[frame.status.eq(STATUS_OK), keys])
    failed = frame[frame.status.ne(STATUS_OK)]
    failed = failed[~pd.MultiIndex.from_frame(failed[keys]).isin(drawn)]
    return failed.drop_duplicates(keys)


# --- 1. comparison ------------------------------------------------------------------------------

_COMPARISON_PANELS = (
    ("peak_mib", "peak memory (MiB)"),
    ("peak_saved_pct", f"peak memory saved\nvs {BASELINE_STRATEGY} (%)"),
    ("step_ms_median", "step time (ms)"),
    ("time_overhead_pct", f"step-time overhead\nvs {BASELINE_STRATEGY} (%)"),
)


def _bar_offsets(colors: dict[str, Any]) -> tuple[dict[str, float], float]:
    """Where each strategy's bar sits inside a category slot of width 0.8, and the bar width."""
    width = 0.8 / len(colors)
    return {label: (i - (len(colors) - 1) / 2) * width for i, label in enumerate(colors)}, width


def _grouped_bars(
    ax: Axes, data: pd.DataFrame, workloads: list[str], colors: dict[str, Any], column: str
) -> None:
    """Bars at each workload, one per strategy; step time gets min-max whiskers."""
    offsets, width = _bar_offsets(colors)
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
    data = _ok_rows(model_rows, "peak_mib")
    offsets, _ = _bar_offsets(colors)
    for ax, (column, _) in zip(axes, panels, strict=True):
        _category_axis(ax, workloads)
        _grouped_bars(ax, data, workloads, colors, column)
        if column.endswith("_pct"):
            if data[column].notna().any():
                ax.axhline(0, color="0.2", linewidth=0.8)
            _mark_missing_baselines(ax, data, workloads, column)
        _mark_failures(
            ax,
            _failed_rows(model_rows),
            lambda row: workloads.index(row.workload) + offsets[row.strategy_label],
        )


def _mark_missing_baselines(
    ax: Axes, data: pd.DataFrame, workloads: list[str], column: str
) -> None:
    """Say so where a workload's ok jobs have no relative figure: its baseline is missing."""
    measured = data.groupby("workload")[column].count()
    for x, workload in enumerate(workloads):
        if workload in measured.index and measured[workload] == 0:
            _slot_text(
                ax,
                x,
                0.5,
                f"no ok {BASELINE_STRATEGY}\nbaseline",
                va="center",
                bbox={"facecolor": "white", "edgecolor": "none"},
            )
    if not measured.any():
        ax.set_yticks([])  # nothing to measure against: no scale to read


@_styled
def plot_comparison(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Peak MiB, saved %, step ms and overhead % per config and strategy, a column per model.

    Panels no job has a figure for are left out (see `comparison_panels`).
    """
    title = "Strategies compared"
    if _ok_rows(frame, "peak_mib").empty:
        return PlotOutcome(title, note="comparison skipped: no job finished ok with a peak memory")
    panels = comparison_panels(frame)
    models, colors = model_order(frame), _palette(strategy_order(frame))
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
        handles=_strategy_handles(colors),
        loc="outside right upper",
        title="strategy",
        frameon=False,
    )
    fig.suptitle(title, fontweight="bold")
    timed = "step_ms_median" in dict(panels)
    whiskers = " Whiskers: min\u2013max step time." if timed else ""
    _footer(fig, _memory_footer(frame), _time_footer(frame) + whiskers, FAILED_LEGEND)
    return PlotOutcome(title, _save(fig, out_dir, "comparison.png"))


# --- 2. scaling ---------------------------------------------------------------------------------


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


@_styled
def plot_scaling(frame: pd.DataFrame, out_dir: Path, axis: str) -> PlotOutcome:
    """Memory (and step time where measured) against `axis`, log-log, a column per model.

    Rows: peak memory; the bytes kept for backward where recorded; step time where measured
    (fake-device jobs predict memory only, so a sweep of them has no time row).
    """
    noun = SCALING_AXES[axis]
    title = f"Scaling with {noun}"
    data = _ok_rows(frame, axis, "peak_mib")
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
    colors = _palette(strategy_order(data))
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
        handles=_strategy_handles(colors) + list(series_handles.values()),
        loc="outside right upper",
        title="strategy",
        frameon=False,
    )
    fig.suptitle(title, fontweight="bold")
    time_lines = [_time_footer(data)]
    if "step_ms_median" in dict(panels):
        time_lines.append("Bands: min\u2013max step time.")
    _footer(fig, _memory_footer(data), " ".join(time_lines))
    return PlotOutcome(title, _save(fig, out_dir, f"scaling_{axis}.png"))


# --- 3. memory-time trade-off -------------------------------------------------------------------


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


@_styled
def plot_tradeoff(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Step time vs peak memory per config; strategies on the frontier have a black edge."""
    title = "Memory\u2013time trade-off"
    data = _ok_rows(frame, "peak_mib", "step_ms_median")
    counts = data.groupby("config").strategy_label.nunique()
    configs = [c for c in config_order(data) if counts.get(c, 0) >= 2]
    if not configs:
        return PlotOutcome(
            title, note="trade-off skipped: no config has two strategies with memory and time"
        )
    colors = _palette(strategy_order(data))
    rows, columns = _grid_shape(len(configs))
    fig = Figure(figsize=(4.3 * columns + 2.5, 3.6 * rows + 1), layout="constrained")
    axes = _panels(fig, len(configs), "step time (ms, median)", "peak memory (MiB)")
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
        handles=[*_strategy_handles(colors), frontier],
        loc="outside right upper",
        title="strategy",
        frameon=False,
    )
    fig.suptitle(f"{title} (lower left is better)", fontweight="bold")
    _footer(fig, _memory_footer(data), _time_footer(data), "Whiskers: min\u2013max step time.")
    return PlotOutcome(title, _save(fig, out_dir, "tradeoff.png"))


# --- 4. where the memory goes -------------------------------------------------------------------


def _breakdown_axis(ax: Axes, rows: pd.DataFrame, colors: list[Any]) -> None:
    """One config: a stacked bar per strategy, a black tick at the measured peak, failures named."""
    labels = strategy_order(rows)
    data = _ok_rows(rows, "peak_mib").set_index("strategy_label").reindex(labels)
    x = np.arange(len(labels))
    bottom = np.zeros(len(labels))
    for (column, _), color in zip(COMPONENTS, colors, strict=True):
        values = data[column].astype(float).fillna(0).to_numpy()
        ax.bar(x, values, 0.7, bottom=bottom, color=color)
        bottom += values
    peaks = data.peak_mib.astype(float)
    ax.scatter(x, peaks, marker="_", s=500, color="black", zorder=3)
    _category_axis(ax, labels)
    # Explicit headroom: a thin top segment pins autoscaling exactly at the peak tick.
    ax.set_ylim(0, 1.06 * max(bottom.max(), peaks.max(skipna=True)))
    _mark_failures(ax, _failed_rows(rows), lambda row: labels.index(row.strategy_label))


@_styled
def plot_breakdown(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Stacked parts of the peak per strategy, one panel per config, the measured peak as a tick."""
    title = "Where the memory goes at the peak"
    parts = [c for c, _ in COMPONENTS]
    measured = _ok_rows(frame, "peak_mib")
    configs = config_order(measured[measured[parts].notna().any(axis=1)])
    if not configs:
        return PlotOutcome(
            title, note="memory breakdown skipped: no ok job recorded parts of its peak"
        )
    colors = sns.color_palette("Set2", len(COMPONENTS))
    rows, columns = _grid_shape(len(configs))
    panel_width = max(4.0, 0.6 * frame.strategy_label.nunique() + 1.5)
    fig = Figure(figsize=(panel_width * columns + 2, 4 * rows + 1), layout="constrained")
    axes = _panels(fig, len(configs), "strategy", "memory at the peak (MiB)")
    for ax, config in zip(axes, configs, strict=True):
        _breakdown_axis(ax, frame[frame.config.eq(config)], colors)
        ax.set_title(config)
    handles = [Patch(color=c, label=name) for (_, name), c in zip(COMPONENTS, colors, strict=True)]
    peak = Line2D([], [], color="black", marker="_", linestyle="", markersize=14, label="peak")
    fig.legend(handles=[peak, *handles[::-1]], loc="outside right upper", frameon=False)
    fig.suptitle(title, fontweight="bold")
    _footer(fig, _memory_footer(frame), FAILED_LEGEND)
    return PlotOutcome(title, _save(fig, out_dir, "breakdown.png"))


# --- 5. memory over one step --------------------------------------------------------------------


def read_timeline(path: Path) -> tuple[str | None, pd.DataFrame]:
    """A `timeline.json` as (source, events with op_index, allocated_bytes, phase)."""
    data = json.loads(Path(path).read_text())
    events = pd.DataFrame(data["events"], columns=["op_index", "allocated_bytes", "phase"])
    return data.get("source"), events


def _load_timelines(data: pd.DataFrame) -> tuple[dict[int, tuple], list[str]]:
    """Timelines by row index; unreadable ones become problems to report, not exceptions."""
    loaded, problems = {}, []
    for index, row in data.iterrows():
        path = Path(row.result_file).parent / row.timeline_file
        try:
            source, events = read_timeline(path)
        except (OSError, ValueError, KeyError, TypeError) as error:
            problems.append(f"job {row.job_num}: {type(error).__name__}")
            continue
        if not events.empty:
            loaded[index] = (source, events)
    return loaded, problems


def _timeline_line(ax: Axes, events: pd.DataFrame, color: Any) -> None:
    """Allocated MiB against the fraction of the step, with a marker where each phase starts."""
    ops = events.op_index.astype(float)
    span = ops.max() - ops.min()
    x = (ops - ops.min()) / span if span > 0 else ops * 0
    y = events.allocated_bytes.astype(float) / MIB
    ax.plot(x, y, color=color, linewidth=1.3, drawstyle="steps-post")
    starts = events.phase.ne(events.phase.shift())
    for phase, marker in PHASE_MARKERS.items():
        at = starts & events.phase.eq(phase)
        ax.plot(x[at], y[at], marker, color=color, markeredgecolor="black", markersize=7)


@_styled
def plot_timeline(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Allocated memory through one training step, one line per strategy, one panel per config."""
    title = "Memory over one training step"
    data = _ok_rows(frame, "timeline_file")
    loaded, problems = _load_timelines(data)
    problem_note = f"timelines unreadable: {', '.join(problems)}" if problems else None
    if not loaded:
        why = problem_note or "no ok job wrote timeline.json"
        return PlotOutcome(title, note=f"memory over one step skipped: {why}")
    data = data.loc[list(loaded)]
    configs, colors = config_order(data), _palette(strategy_order(data))
    rows, columns = _grid_shape(len(configs))
    fig = Figure(figsize=(5 * columns + 2.5, 3.6 * rows + 1), layout="constrained")
    xlabel = "fraction of the training step (op index / last op index)"
    axes = _panels(fig, len(configs), xlabel, "allocated memory (MiB)")
    for ax, config in zip(axes, configs, strict=True):
        for index, row in data[data.config.eq(config)].iterrows():
            _timeline_line(ax, loaded[index][1], colors[row.strategy_label])
        ax.set_title(config)
        ax.set_xlim(0, 1)
    phase_handles = [
        Line2D(
            [],
            [],
            marker=m,
            color="0.5",
            markeredgecolor="black",
            linestyle="",
            label=f"{phase} starts",
        )
        for phase, m in PHASE_MARKERS.items()
    ]
    fig.legend(
        handles=_strategy_handles(colors) + phase_handles,
        loc="outside right upper",
        title="strategy",
        frameon=False,
    )
    fig.suptitle(f"{title} (forward, then backward, then optimizer)", fontweight="bold")
    sources = sorted({str(source) for source, _ in loaded.values()})
    names = "; ".join(MEMORY_SOURCE_LABELS.get(s, s) for s in sources)
    _footer(fig, f"Timeline source: {names}. 1 MiB = 2^20 bytes.")
    return PlotOutcome(title, _save(fig, out_dir, "timeline.png"), problem_note)


# --- 6. largest batch that fits (batch=auto) ----------------------------------------------------


def _auto_batch_panel_title(row: pd.Series) -> str:
    return " \u00b7 ".join([f"seq {row.seq_len}", *(str(row[k]) for k in AUTO_BATCH_KEYS[2:])])


def _auto_batch_label(row: Any) -> str:
    """The batch on top of its bar, and below it how many times the `none` batch it is."""
    text = f"\u2265{row.batch:g}" if row.limit_reached else f"{row.batch:g}"
    if row.strategy != BASELINE_STRATEGY and pd.notna(row.times_none):
        text += f"\n\u00d7{row.times_none:.2f}"
    return text


def _auto_batch_axis(
    ax: Axes, rows: pd.DataFrame, strategies: list[str], colors: dict[str, Any]
) -> None:
    """Bars of the batch each strategy found, a bar per model; a status where none was found."""
    offsets, width = _bar_offsets(colors)
    _category_axis(ax, strategies)
    for model, color in colors.items():
        found = rows[rows.model.eq(model) & rows.status.eq(STATUS_OK) & rows.batch.notna()]
        x = [strategies.index(s) + offsets[model] for s in found.strategy_label]
        bars = ax.bar(x, found.batch, width, color=color)
        labels = [_auto_batch_label(row) for row in found.itertuples(index=False)]
        ax.bar_label(bars, labels, padding=2, fontsize="x-small")
        failed = rows[rows.model.eq(model) & ~rows.index.isin(found.index)]
        _mark_failures(
            ax, failed, lambda row: strategies.index(row.strategy_label) + offsets[row.model]
        )
    ax.set_ylim(0, 1.2 * max(rows.batch.max(skipna=True), 1))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _budgets(table: pd.DataFrame) -> str:
    return ", ".join(format_bytes(b) for b in sorted(table.budget_bytes.dropna().unique()))


def _auto_batch_footer(table: pd.DataFrame) -> list[str]:
    imagined = ", ".join(sorted(table.imagines.dropna().unique())) or "the job's device"
    lines = [
        f"Batch: the largest whose predicted peak (fake tensors, imagining {imagined}) fits the "
        f"budget ({_budgets(table) or 'unknown'}).",
        f"\u00d7: that batch / the {BASELINE_STRATEGY} strategy's batch, same model and workload.",
    ]
    if table.limit_reached.any():
        lines.append("\u2265: every batch up to the search's limit fit.")
    return [*lines, FAILED_LEGEND]


@_styled
def plot_auto_batch(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """The batch `batch=auto` found per strategy, a bar per model, a panel per workload."""
    title = "Largest batch that fits"
    table = auto_batch_table(frame)
    if table.empty:
        return PlotOutcome(title, note="largest batch skipped: no job ran with batch=auto")
    table = table.assign(
        panel=table.apply(_auto_batch_panel_title, axis=1),
        strategy_label=table.strategy_label.astype(str),
    )
    panels = list(dict.fromkeys(table.sort_values(["seq_len", "panel"]).panel))
    strategies = strategy_order(table)
    models = list(dict.fromkeys(table.sort_values("model").model))
    colors = _palette(models)
    rows, columns = _grid_shape(len(panels))
    panel_width = max(4.0, 0.45 * len(strategies) * len(models) + 1.5)
    fig = Figure(
        figsize=(max(7.5, panel_width * columns + 2), 4 * rows + 1.5), layout="constrained"
    )
    axes = _panels(fig, len(panels), "strategy", "largest batch that fits (sequences)")
    for ax, panel in zip(axes, panels, strict=True):
        _auto_batch_axis(ax, table[table.panel.eq(panel)], strategies, colors)
        ax.set_title(panel)
    fig.legend(
        handles=_strategy_handles(colors), loc="outside right upper", title="model", frameon=False
    )
    fig.suptitle(f"{title} in {_budgets(table)} (batch=auto)", fontweight="bold")
    _footer(fig, *_auto_batch_footer(table))
    return PlotOutcome(title, _save(fig, out_dir, "auto_batch.png"))


# --- all of them --------------------------------------------------------------------------------

FIGURES: tuple[tuple[str, Callable[[pd.DataFrame, Path], PlotOutcome]], ...] = (
    ("comparison", plot_comparison),
    ("scaling vs seq_len", functools.partial(plot_scaling, axis="seq_len")),
    ("scaling vs batch_size", functools.partial(plot_scaling, axis="batch_size")),
    ("memory-time trade-off", plot_tradeoff),
    ("memory breakdown", plot_breakdown),
    ("memory over one step", plot_timeline),
    ("largest batch that fits", plot_auto_batch),
)


def draw_all(frame: pd.DataFrame, out_dir: Path) -> list[PlotOutcome]:
    """Every figure the data supports, into `out_dir`.

    A figure that fails on data no one foresaw becomes a note instead of an exception: this runs at
    the end of a sweep, and one bad figure must not cost the table and the other figures.
    Figures of an earlier aggregation are removed first (they are derived, not measured), so a
    figure the data no longer supports does not linger beside the new ones.
    """
    for stale in Path(out_dir).glob("*.png"):
        stale.unlink()
    outcomes = []
    for name, draw in FIGURES:
        try:
            outcomes.append(draw(frame, Path(out_dir)))
        except Exception as error:
            outcomes.append(
                PlotOutcome(name, note=f"{name} failed: {type(error).__name__}: {error}")
            )
    return outcomes
