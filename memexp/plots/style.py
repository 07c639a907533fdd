"""What every figure shares: one style, one palette per strategy, panel grids, footers, saving.

Figures are built on matplotlib's object API (`Figure`, rendered to PNG by the Agg canvas) rather
than pyplot, so drawing inside a Hydra callback touches no global GUI state; seaborn supplies the
style and the colour-blind-safe palette, the same colour for a strategy in every figure.
"""

from __future__ import annotations

import functools
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
from matplotlib.patches import Patch
from matplotlib.transforms import blended_transform_factory

from memexp.aggregate import GROUP_KEYS, as_float
from memexp.analysis import (
    describe_memory_sources,
    describe_times,
)
from memexp.figures import (
    PlotOutcome,
)
from memexp.results import STATUS_OK

DPI = 120
PANEL_COLUMNS = 3
# The most panels one figure draws: beyond it a panel is too small to read, and drawing takes
# seconds per dozen. A sweep with more configs gets an evenly spaced subset, and says so.
MAX_PANELS = 9
# The most values of a figure's inner axis (e.g. sequence lengths beside each other in a panel).
MAX_INNER_VALUES = 5
# How a workload key reads in a panel title or a footer.
KEY_NAMES = {"seq_len": "seq", "batch_size": "batch"}
FAILED_LEGEND = "A status written instead of a bar: that job did not finish ok."


def styled(draw: Callable[..., PlotOutcome]) -> Callable[..., PlotOutcome]:
    """Apply the seaborn style for one figure only, leaving the caller's rcParams untouched."""

    @functools.wraps(draw)
    def wrapper(*args: Any, **kwargs: Any) -> PlotOutcome:
        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
            return draw(*args, **kwargs)

    return wrapper


def ok_rows(frame: pd.DataFrame, *required: str) -> pd.DataFrame:
    """Ok rows with every required figure, one per (config, strategy label): the first job wins."""
    ok = frame[frame.status.eq(STATUS_OK)].dropna(subset=list(required))
    return ok.drop_duplicates(["config", "strategy_label"])


def palette(labels: Sequence[str]) -> dict[str, Any]:
    """Colour-blind-safe colours; beyond its ten, evenly spaced hues so no two strategies share."""
    name = "colorblind" if len(labels) <= 10 else "husl"
    return dict(zip(labels, sns.color_palette(name, len(labels)), strict=True))


def strategy_handles(colors: dict[str, Any]) -> list[Patch]:
    return [Patch(color=color, label=label) for label, color in colors.items()]


def grid_shape(count: int, columns: int = PANEL_COLUMNS) -> tuple[int, int]:
    """(rows, columns) for `count` panels at most `columns` wide."""
    columns = min(columns, count)
    return -(-count // columns), columns


def capped_panels(configs: Sequence[str], cap: int = MAX_PANELS) -> tuple[list[str], str | None]:
    """At most `cap` of `configs` (in reading order), and a note naming the cut when there is one.

    The subset is evenly spaced over the reading order, first and last included, so the figure
    still spans the smallest to the largest workload; every config stays in results.csv and
    summary.md.
    """
    configs = list(configs)
    if len(configs) <= cap:
        return configs, None
    picks = np.unique(np.linspace(0, len(configs) - 1, cap).round().astype(int))
    note = (
        f"{len(picks)} of {len(configs)} configs drawn, evenly spaced from the smallest to the "
        "largest workload; every config is in results.csv and summary.md"
    )
    return [configs[i] for i in picks], note


def _spread(values: Sequence[Any], cap: int) -> list[Any]:
    """At most `cap` of `values`, evenly spaced, first and last included."""
    if len(values) <= cap:
        return list(values)
    picks = np.unique(np.linspace(0, len(values) - 1, cap).round().astype(int))
    return [values[i] for i in picks]


def _key_text(key: str, value: Any) -> str:
    return f"{KEY_NAMES.get(key, key)} {value}"


@dataclass(frozen=True)
class Facets:
    """How a figure lays out a sweep: a panel per combination of the workload keys that vary
    (`panel_keys`), the `inner` key's values beside each other inside every panel, and the keys
    every job shares said once (`shared`), so a sweep over sequence lengths is one panel with
    lengths on an axis, not a panel per length. `panels`: title → the rows of that panel."""

    panel_keys: list[str]
    panels: dict[str, pd.DataFrame]
    inner: str
    inner_values: list[Any]
    shared: str
    note: str | None

    def footer_lines(self) -> list[str]:
        lines = [f"Every panel: {self.shared}."] if self.shared else []
        return [*lines, *([f"Shown: {self.note}."] if self.note else [])]


def facets(
    frame: pd.DataFrame,
    inner: str = "seq_len",
    cap: int = MAX_PANELS,
    inner_cap: int = MAX_INNER_VALUES,
) -> Facets:
    """Panels from what varies in `frame` (beside `inner`), at most `cap` of them and at most
    `inner_cap` values of `inner`, both evenly spaced from smallest to largest; the note names
    what was left out (every job stays in results.csv and summary.md)."""
    varying = [k for k in GROUP_KEYS if k != inner and frame[k].nunique() > 1]
    shared = ", ".join(
        _key_text(k, frame[k].iloc[0]) for k in GROUP_KEYS if k != inner and k not in varying
    )
    if frame[inner].nunique() == 1:
        shared = ", ".join(filter(None, [_key_text(inner, frame[inner].iloc[0]), shared]))
    size = as_float(frame.param_count).groupby(frame.model, dropna=False).transform("max")
    ordered = frame.assign(_size=size).sort_values(["_size", *varying], kind="stable")
    groups = ordered.groupby(varying, sort=False, dropna=False) if varying else [((), ordered)]
    panels: dict[str, pd.DataFrame] = {}
    for values, rows in groups:
        values = values if isinstance(values, tuple) else (values,)
        title = ", ".join(_key_text(k, v) for k, v in zip(varying, values, strict=True))
        panels[title or "every job"] = rows.drop(columns="_size")
    titles = list(panels)
    kept = _spread(titles, cap)
    all_inner = sorted(frame[inner].dropna().unique())
    inner_values = _spread(all_inner, inner_cap)
    notes = []
    if len(kept) < len(titles):
        left_out = [t for t in titles if t not in kept]
        named = "; ".join(left_out[:6]) + ("; ..." if len(left_out) > 6 else "")
        notes.append(
            f"{len(kept)} of {len(titles)} panels ({' × '.join(KEY_NAMES.get(k, k) for k in varying)}), "
            f"evenly spaced from the smallest to the largest; left out: {named}"
        )
    if len(inner_values) < len(all_inner):
        notes.append(
            f"{len(inner_values)} of {len(all_inner)} values of {KEY_NAMES.get(inner, inner)} "
            f"({', '.join(map(str, inner_values))}), evenly spaced"
        )
    if notes:
        notes.append("every job is in results.csv and summary.md")
    kept_panels = {t: p[p[inner].isin(inner_values)] for t, p in panels.items() if t in kept}
    return Facets(varying, kept_panels, inner, inner_values, shared, "; ".join(notes) or None)


def panel_grid(fig: Figure, count: int, xlabel: str, ylabel: str) -> list[Axes]:
    """`count` axes filling the figure's grid row by row; only the outer ones carry axis labels."""
    rows, columns = grid_shape(count)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for index, ax in enumerate(axes):
        ax.set_visible(index < count)
        if index % columns == 0:
            ax.set_ylabel(ylabel)
        if index + columns >= count:  # nothing drawn below it
            ax.set_xlabel(xlabel)
    return list(axes[:count])


def footer(fig: Figure, *lines: str) -> None:
    """Sources and units under the panels, in a strip the layout keeps free so nothing overlaps."""
    size = FontProperties(size="small").get_size_in_points()
    height = (len(lines) + 1) * 1.4 * size / 72 / fig.get_figheight()
    fig.get_layout_engine().set(rect=(0, height, 1, 1 - height))
    text = "\n".join(lines)
    fig.text(0.5, 0.2 * height, text, ha="center", va="bottom", fontsize=size, color="0.3")


def memory_footer(frame: pd.DataFrame) -> str:
    return f"Memory source: {describe_memory_sources(frame)}. 1 MiB = 2^20 bytes."


def time_footer(frame: pd.DataFrame) -> str:
    return f"Step time: {describe_times(frame)}."


def save(fig: Figure, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    fig.savefig(path, dpi=DPI)
    return path


def category_axis(ax: Axes, labels: Sequence[str]) -> None:
    """Category ticks for bars; long or many labels lean, anchored at the tick, never overlap."""
    ax.set_xticks(np.arange(len(labels)), labels)
    ax.grid(axis="x", visible=False)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    if len(labels) > 4 or max(map(len, labels), default=0) > 12:
        for label in ax.get_xticklabels():
            label.set(rotation=30, horizontalalignment="right", rotation_mode="anchor")


def slot_text(ax: Axes, x: float, y: float, text: str, **kwargs: Any) -> None:
    """Text at data position `x` and at height `y` as a fraction of the axes."""
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    ax.text(x, y, text, transform=transform, ha="center", color="0.35", **kwargs)


def mark_failures(ax: Axes, failed: pd.DataFrame, x_of: Callable[[pd.Series], float]) -> None:
    """Write a failed job's status where its bar would stand, so a gap never looks like zero."""
    for _, row in failed.iterrows():
        slot_text(ax, x_of(row), 0.02, row.status, rotation=90, va="bottom", fontsize="small")


def failed_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Failed jobs whose config and strategy have no ok job: their slot would otherwise be empty."""
    keys = ["config", "strategy_label"]
    drawn = pd.MultiIndex.from_frame(frame.loc[frame.status.eq(STATUS_OK), keys])
    failed = frame[frame.status.ne(STATUS_OK)]
    failed = failed[~pd.MultiIndex.from_frame(failed[keys]).isin(drawn)]
    return failed.drop_duplicates(keys)


def bar_offsets(colors: dict[str, Any]) -> tuple[dict[str, float], float]:
    """Where each strategy's bar sits inside a category slot of width 0.8, and the bar width."""
    width = 0.8 / len(colors)
    return {label: (i - (len(colors) - 1) / 2) * width for i, label in enumerate(colors)}, width
