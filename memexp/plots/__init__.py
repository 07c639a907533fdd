"""The figures of one sweep, drawn from the table `memexp.aggregate.load_results` builds.

One module per figure. Each `plot_*` function takes that table and a folder and returns a
`PlotOutcome` (`memexp.figures`): the PNG it wrote with the tidy data it drew, or a one-line note
saying why the sweep's data cannot support the figure (one sequence
length gives no scaling curve; that is not an error). Only ok rows are drawn, one per config and
strategy label. Memory is in MiB (2**20 bytes), times in ms with min-max bars or bands, and every
figure names its memory source in a footer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from memexp.figures import PlotOutcome
from memexp.plots.auto_batch import plot_auto_batch
from memexp.plots.breakdown import plot_breakdown
from memexp.plots.comparison import comparison_panels, plot_comparison
from memexp.plots.scaling import plot_scaling, scaling_panels
from memexp.plots.timeline import Selection, parse_selection, plot_timeline, read_timeline
from memexp.plots.tradeoff import plot_tradeoff
from memexp.plots.world_size import plot_world_size

__all__ = [
    "PlotOutcome",
    "Selection",
    "comparison_panels",
    "draw_all",
    "figures",
    "parse_selection",
    "plot_auto_batch",
    "plot_breakdown",
    "plot_comparison",
    "plot_scaling",
    "plot_timeline",
    "plot_tradeoff",
    "plot_world_size",
    "read_timeline",
    "scaling_panels",
]

TIMELINE_FIGURE = "memory over one step"


def figures(
    timelines: Sequence[Selection] = (),
) -> tuple[tuple[str, Callable[[pd.DataFrame, Path], PlotOutcome]], ...]:
    """Every figure, in the order summary.md shows them, each bound to its options: the timeline
    draws the workloads `timelines` names (`plot_timeline`'s `select`), or its default few."""
    return (
        ("comparison", plot_comparison),
        ("scaling vs seq_len", functools.partial(plot_scaling, axis="seq_len")),
        ("scaling vs batch_size", functools.partial(plot_scaling, axis="batch_size")),
        ("memory-time trade-off", plot_tradeoff),
        ("memory breakdown", plot_breakdown),
        (TIMELINE_FIGURE, functools.partial(plot_timeline, select=timelines)),
        ("largest batch that fits", plot_auto_batch),
        ("per-rank peak against world size", plot_world_size),
    )


def draw_all(
    frame: pd.DataFrame, out_dir: Path, timelines: Sequence[Selection] = ()
) -> list[PlotOutcome]:
    """Every figure the data supports, into `out_dir`; the timeline figure draws the workloads
    `timelines` names (`plot_timeline`'s `select`), or its default few.

    A figure that fails on data no one foresaw becomes a note instead of an exception: this runs at
    the end of a sweep, and one bad figure must not cost the table and the other figures.
    Figures of an earlier aggregation are removed first (they are derived, not measured), so a
    figure the data no longer supports does not linger beside the new ones.
    """
    for stale in Path(out_dir).glob("*.png"):
        stale.unlink()
    outcomes = []
    for name, draw in figures(timelines):
        try:
            outcomes.append(draw(frame, Path(out_dir)))
        except Exception as error:
            outcomes.append(
                PlotOutcome(name, note=f"{name} failed: {type(error).__name__}: {error}")
            )
    return outcomes
