"""A sweep's figures as the page sees them: their file names, and what drawing one produced.

Written once, below both the drawing (`memexp.plots`) and the page (`memexp.report`), so the page
links a figure by the same name the drawer saved it under, and neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

# The PNG each figure is saved as, inside the sweep's `plots/` folder (`sweepdir.PLOTS_DIR`).
COMPARISON_PNG = "comparison.png"
SCALING_PNG = {"seq_len": "scaling_seq_len.png", "batch_size": "scaling_batch_size.png"}
TRADEOFF_PNG = "tradeoff.png"
BREAKDOWN_PNG = "breakdown.png"
TIMELINE_PNG = "timeline.png"
AUTO_BATCH_PNG = "auto_batch.png"
WORLD_SIZE_PNG = "world_size.png"


@dataclass(frozen=True)
class PlotOutcome:
    """One figure: the PNG written, or why not. A note may also accompany a written figure.

    `data` is the tidy table the figure drew, one row per bar, point or line vertex, in the
    units drawn (MiB, ms, %): what a test checks and what a reader of the PNG sees. None when
    nothing was drawn.
    """

    title: str
    path: Path | None = None
    note: str | None = None
    data: pd.DataFrame | None = None
