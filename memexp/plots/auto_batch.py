"""Largest batch that fits: the batch `batch=auto` found per strategy, against `none`'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from memexp.aggregate import BASELINE_STRATEGY
from memexp.analysis import (
    AUTO_BATCH_KEYS,
    auto_batch_table,
    strategy_order,
)
from memexp.figures import AUTO_BATCH_PNG, PlotOutcome
from memexp.plots.style import (
    FAILED_LEGEND,
    bar_offsets,
    category_axis,
    footer,
    grid_shape,
    mark_failures,
    palette,
    panel_grid,
    save,
    strategy_handles,
    styled,
)
from memexp.results import STATUS_OK
from memexp.text import format_bytes


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
    offsets, width = bar_offsets(colors)
    category_axis(ax, strategies)
    for model, color in colors.items():
        found = rows[rows.model.eq(model) & rows.status.eq(STATUS_OK) & rows.batch.notna()]
        x = [strategies.index(s) + offsets[model] for s in found.strategy_label]
        bars = ax.bar(x, found.batch, width, color=color)
        labels = [_auto_batch_label(row) for row in found.itertuples(index=False)]
        ax.bar_label(bars, labels, padding=2, fontsize="x-small")
        failed = rows[rows.model.eq(model) & ~rows.index.isin(found.index)]
        mark_failures(
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


@styled
def plot_auto_batch(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """The batch `batch=auto` found per strategy, a bar per model, a panel per workload.

    Data: a row per batch=auto job (panel, model, strategy label, status), the batch drawn (NaN
    where a status is written instead) and its ratio to the `none` job's batch.
    """
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
    colors = palette(models)
    rows, columns = grid_shape(len(panels))
    panel_width = max(4.0, 0.45 * len(strategies) * len(models) + 1.5)
    fig = Figure(
        figsize=(max(7.5, panel_width * columns + 2), 4 * rows + 1.5), layout="constrained"
    )
    axes = panel_grid(fig, len(panels), "strategy", "largest batch that fits (sequences)")
    for ax, panel in zip(axes, panels, strict=True):
        _auto_batch_axis(ax, table[table.panel.eq(panel)], strategies, colors)
        ax.set_title(panel)
    fig.legend(
        handles=strategy_handles(colors), loc="outside right upper", title="model", frameon=False
    )
    fig.suptitle(f"{title} in {_budgets(table)} (batch=auto)", fontweight="bold")
    footer(fig, *_auto_batch_footer(table))
    drawn = table[
        ["panel", "model", "strategy_label", "status", "batch", "times_none", "limit_reached"]
    ]
    return PlotOutcome(title, save(fig, out_dir, AUTO_BATCH_PNG), data=drawn.reset_index(drop=True))
