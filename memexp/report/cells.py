"""Cells and pieces of summary.md: fixed decimals, code marks, byte sizes, links to figures.

Shared by the page's sections so a missing figure, a MiB and a link read the same everywhere.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from memexp.aggregate import first_line
from memexp.text import MISSING, format_bytes

EN_DASH = "\u2013"
TIMES = "\u00d7"
MINUS = "\u2212"


def number(value: Any, digits: int | None = 1) -> str:
    """Fixed decimals; `digits=None` keeps two below 10 so a small model's MiB still differ."""
    if pd.isna(value):
        return MISSING
    if digits is None:
        digits = 2 if abs(value) < 10 else 1
    return f"{float(value):,.{digits}f}"


def code(text: str) -> str:
    return f"`{text}`" if text else MISSING


def text_cell(value: Any) -> str:
    """A message's first line, or the missing mark (also for NaN, which is truthy)."""
    return first_line(value) or MISSING


def bytes_cell(value: Any) -> str:
    return MISSING if pd.isna(value) else format_bytes(int(value))


def values(rows: pd.DataFrame, column: str) -> str:
    """The distinct values of a column, in code marks; `unknown` when absent or empty."""
    present = rows[column].dropna().unique() if column in rows else []
    return ", ".join(code(str(v)) for v in sorted(map(str, present))) or "unknown"
