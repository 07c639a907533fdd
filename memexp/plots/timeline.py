"""Memory over one training step: allocated MiB through forward, backward and optimizer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from memexp.analysis import (
    MEMORY_SOURCE_LABELS,
    config_order,
    strategy_order,
)
from memexp.figures import TIMELINE_PNG, PlotOutcome
from memexp.plots.style import (
    capped_panels,
    footer,
    grid_shape,
    ok_rows,
    palette,
    panel_grid,
    save,
    strategy_handles,
    styled,
)
from memexp.text import MIB

PHASE_MARKERS = {"backward": "v", "optimizer": "s"}  # drawn where each phase starts
# Configs drawn when the user names none: enough to compare, few enough to read.
DEFAULT_TIMELINES = 4
# What a user may name a workload by (`--timeline model=small,seq=256`): the table's columns.
SELECTION_KEYS = {
    "model": "model",
    "seq": "seq_len",
    "seq_len": "seq_len",
    "batch": "batch_size",
    "batch_size": "batch_size",
    "device": "device",
    "precision": "precision",
    "attention": "attention",
    "config": "config",
}

# A workload a user names: column -> value as written (e.g. {"model": "small", "seq_len": "256"}).
Selection = dict[str, str]


def parse_selection(text: str) -> Selection:
    """`model=small,seq=256` as {"model": "small", "seq_len": "256"}; ValueError names a bad key."""
    selection = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in SELECTION_KEYS:
            raise ValueError(
                f"{part!r}: expected KEY=VALUE with KEY one of {sorted(SELECTION_KEYS)}"
            )
        selection[SELECTION_KEYS[key.strip()]] = value.strip()
    return selection


def selected_configs(
    data: pd.DataFrame, selections: Sequence[Selection]
) -> tuple[list[str], str | None]:
    """The configs to draw, in reading order, and a note saying how they were chosen.

    Named workloads when there are selections (every config matching any of them); otherwise
    `DEFAULT_TIMELINES` configs evenly spaced over the reading order when there are more.
    """
    configs = config_order(data)
    if not selections:
        return capped_panels(configs, DEFAULT_TIMELINES)
    text = data.astype({c: str for c in {k for s in selections for k in s}})
    chosen = set()
    for selection in selections:
        match = pd.Series(True, index=data.index)
        for column, value in selection.items():
            match &= text[column].eq(value)
        chosen |= set(data.config[match])
    named = "; ".join(",".join(f"{k}={v}" for k, v in s.items()) for s in selections)
    shown = [c for c in configs if c in chosen]
    return shown, f"{len(shown)} of {len(configs)} configs drawn, as named: {named}"


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


def timeline_points(events: pd.DataFrame) -> pd.DataFrame:
    """A timeline as drawn: `fraction` of the step (op index / last op index), `allocated_mib`,
    `phase`, and `phase_starts` where a phase's marker goes."""
    ops = events.op_index.astype(float)
    span = ops.max() - ops.min()
    return pd.DataFrame(
        {
            "fraction": (ops - ops.min()) / span if span > 0 else ops * 0,
            "allocated_mib": events.allocated_bytes.astype(float) / MIB,
            "phase": events.phase,
            "phase_starts": events.phase.ne(events.phase.shift()),
        }
    )


def _timeline_line(ax: Axes, points: pd.DataFrame, color: Any) -> None:
    """Allocated MiB against the fraction of the step, with a marker where each phase starts."""
    x, y = points.fraction, points.allocated_mib
    ax.plot(x, y, color=color, linewidth=1.3, drawstyle="steps-post")
    for phase, marker in PHASE_MARKERS.items():
        at = points.phase_starts & points.phase.eq(phase)
        ax.plot(x[at], y[at], marker, color=color, markeredgecolor="black", markersize=7)


@styled
def plot_timeline(
    frame: pd.DataFrame, out_dir: Path, select: Sequence[Selection] = ()
) -> PlotOutcome:
    """Allocated memory through one training step, one line per strategy, one panel per config:
    the configs `select` names, or by default `DEFAULT_TIMELINES` of them (`selected_configs`).

    Data: every vertex drawn (config, strategy label, `timeline_points`' columns).
    """
    title = "Memory over one training step"
    data = ok_rows(frame, "timeline_file")
    if data.empty:
        return PlotOutcome(
            title, note="memory over one step skipped: no ok job wrote timeline.json"
        )
    shown, cut = selected_configs(data, select)
    data = data[data.config.isin(shown)]
    loaded, problems = _load_timelines(data)
    problem_note = f"timelines unreadable: {', '.join(problems)}" if problems else None
    if not loaded:
        why = problem_note or f"no config matches: {cut}"
        return PlotOutcome(title, note=f"memory over one step skipped: {why}")
    data = data.loc[list(loaded)]
    configs, colors = config_order(data), palette(strategy_order(data))
    rows, columns = grid_shape(len(configs))
    fig = Figure(figsize=(5 * columns + 2.5, 3.6 * rows + 1), layout="constrained")
    xlabel = "fraction of the training step (op index / last op index)"
    axes = panel_grid(fig, len(configs), xlabel, "allocated memory (MiB)")
    drawn = []
    for ax, config in zip(axes, configs, strict=True):
        for index, row in data[data.config.eq(config)].iterrows():
            points = timeline_points(loaded[index][1])
            _timeline_line(ax, points, colors[row.strategy_label])
            drawn.append(points.assign(config=config, strategy_label=row.strategy_label))
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
        handles=strategy_handles(colors) + phase_handles,
        loc="outside right upper",
        title="strategy",
        frameon=False,
    )
    fig.suptitle(f"{title} (forward, then backward, then optimizer)", fontweight="bold")
    sources = sorted({str(source) for source, _ in loaded.values()})
    names = "; ".join(MEMORY_SOURCE_LABELS.get(s, s) for s in sources)
    shown_line = [f"Shown: {cut}."] if cut else []
    footer(fig, f"Timeline source: {names}. 1 MiB = 2^20 bytes.", *shown_line)
    columns = ["config", "strategy_label", "fraction", "allocated_mib", "phase", "phase_starts"]
    table = pd.concat(drawn, ignore_index=True)[columns]
    note = "; ".join(filter(None, [cut, problem_note])) or None
    return PlotOutcome(title, save(fig, out_dir, TIMELINE_PNG), note, table)
