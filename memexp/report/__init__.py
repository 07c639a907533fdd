"""`summary.md`: one page that says what a sweep ran, on what, what it found and what went wrong.

The page in order: `sections` (header, command, environment, results), `findings` (what the data
supports: scaling, largest batch, closed form, estimated times), then plots, failed jobs and
notes; `cells` formats every figure the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from memexp.figures import PlotOutcome
from memexp.report.findings import analysis_sections
from memexp.report.sections import (
    command_section,
    environment_section,
    failures_section,
    header,
    notes_section,
    plots_section,
    results_section,
)
from memexp.sweepdir import SUMMARY_MD

__all__ = ["render_summary", "write_summary"]


def render_summary(
    sweep_dir: Path, frame: pd.DataFrame, notes: Sequence[str], figures: Sequence[PlotOutcome]
) -> str:
    """The markdown text of `summary.md` (see `write_summary`)."""
    sweep_dir = Path(sweep_dir)
    sections = [header(sweep_dir, frame), command_section(sweep_dir, frame)]
    sections.append(environment_section(frame))
    if not frame.empty:
        sections.append(results_section(frame))
        sections += analysis_sections(sweep_dir, frame, figures)
    sections += [plots_section(sweep_dir, figures), failures_section(frame)]
    sections.append(notes_section(notes))
    return "\n\n".join("\n".join(section) for section in sections) + "\n"


def write_summary(
    sweep_dir: Path, frame: pd.DataFrame, notes: Sequence[str], figures: Sequence[PlotOutcome]
) -> Path:
    """Write `summary.md` into the sweep folder; plots are linked relative to it."""
    path = Path(sweep_dir) / SUMMARY_MD
    path.write_text(render_summary(sweep_dir, frame, notes, figures))
    return path
