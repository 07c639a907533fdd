"""Per-rank peak against world size: what each GPU holds as the ranks grow, per sharding mode."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from memexp.config import PARALLEL_NONE
from memexp.figures import WORLD_SIZE_PNG, PlotOutcome
from memexp.plots.style import (
    footer,
    grid_shape,
    memory_footer,
    palette,
    panel_grid,
    save,
    styled,
)
from memexp.results import STATUS_OK
from memexp.text import MIB

# One line style per strategy (the colour is the sharding mode's).
LINE_STYLES = ("-", "--", ":", "-.")
DEVICE_MEMORY = "extra_device_memory_bytes"


def world_size_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The ok jobs of the sweep's sharded runs: one row a (workload, mode, strategy, world size),
    the per-rank peak in MiB; one-device jobs join as world size 1 of their own `none` line."""
    ok = frame[frame.status.eq(STATUS_OK) & frame.peak_bytes.notna()]
    if not ok.parallel.ne(PARALLEL_NONE).any():
        return pd.DataFrame()
    table = ok.assign(
        panel=ok.model.astype(str)
        + " "
        + ok.seq_len.astype(str)
        + "\u00d7"
        + ok.batch_size.astype(str),
        peak_mib=ok.peak_bytes.astype(float) / MIB,
        world_size=ok.world_size.astype(int),
    )
    keys = ["panel", "parallel", "strategy_label", "world_size"]
    columns = [*keys, "peak_mib"]
    if DEVICE_MEMORY in table:
        columns.append(DEVICE_MEMORY)
    return table.drop_duplicates(keys)[columns].sort_values(keys, ignore_index=True)


@styled
def plot_world_size(frame: pd.DataFrame, out_dir: Path) -> PlotOutcome:
    """Per-rank step peak (MiB) against the world size (log scale), a line per sharding mode
    (colour) and strategy (line style), a panel per model and workload; the imagined device's
    memory as a horizontal line where the jobs name one.

    Data: a row per point drawn (panel, parallel, strategy label, world size, peak MiB).
    """
    title = "Per-rank peak against world size"
    table = world_size_table(frame)
    if table.empty:
        return PlotOutcome(
            title, note="world size skipped: no job ran with parallel other than none"
        )
    panels = list(dict.fromkeys(table.panel))
    modes = list(dict.fromkeys(table.parallel))
    strategies = list(dict.fromkeys(table.strategy_label))
    colors = palette(modes)
    styles = {s: LINE_STYLES[i % len(LINE_STYLES)] for i, s in enumerate(strategies)}
    rows, columns = grid_shape(len(panels))
    fig = Figure(figsize=(max(7.5, 5.5 * columns + 2), 4 * rows + 1.5), layout="constrained")
    axes = panel_grid(fig, len(panels), "world size (ranks)", "per-rank step peak (MiB)")
    for ax, panel in zip(axes, panels, strict=True):
        rows_of_panel = table[table.panel.eq(panel)]
        for (mode, strategy), line in rows_of_panel.groupby(
            ["parallel", "strategy_label"], sort=False
        ):
            ax.plot(
                line.world_size,
                line.peak_mib,
                marker="o",
                color=colors[mode],
                linestyle=styles[strategy],
                label=f"{mode} \u00b7 {strategy}",
            )
        if DEVICE_MEMORY in rows_of_panel and rows_of_panel[DEVICE_MEMORY].notna().any():
            memory = float(rows_of_panel[DEVICE_MEMORY].max()) / MIB
            ax.axhline(memory, color="0.4", linewidth=1)
            ax.annotate(
                "one GPU's memory",
                (0.01, memory),
                xycoords=("axes fraction", "data"),
                fontsize="x-small",
                color="0.3",
                va="bottom",
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(rows_of_panel.world_size.unique()))
        ax.get_xaxis().set_major_formatter("{x:g}")
        ax.set_ylim(bottom=0)
        ax.set_title(panel)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside right upper", title="mode \u00b7 strategy", frameon=False
    )
    fig.suptitle(title, fontweight="bold")
    footer(
        fig,
        memory_footer(frame[frame.status.eq(STATUS_OK)]),
        "Every figure is one rank's (rank 0, the heaviest); batch.size is per rank.",
    )
    drawn = table.drop(columns=[DEVICE_MEMORY], errors="ignore")
    return PlotOutcome(title, save(fig, out_dir, WORLD_SIZE_PNG), data=drawn)
