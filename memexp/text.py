"""Units and text, written once: byte units, byte formatting and markdown tables.

Every figure a person reads (the end-of-sweep table, summary.md, plot labels, W&B summaries) is
formatted here, so a MiB is 2**20 bytes everywhere and a table escapes its cells the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

MIB = 2**20
GIB = 2**30
MISSING = "\u2014"  # what a table shows for a figure that was not measured


def to_mib(count: int | None, digits: int = 3) -> float | None:
    """Bytes as MiB (2**20 bytes), rounded; None stays None."""
    return None if count is None else round(count / MIB, digits)


def format_bytes(count: int | None) -> str:
    """MiB below a GiB, GiB above: a tiny model's peak and a 7B model's both stay readable."""
    if count is None:
        return MISSING
    return f"{count / GIB:,.2f} GiB" if abs(count) >= GIB else f"{count / MIB:,.2f} MiB"


def format_mib(count: int | None) -> str:
    """MiB with one decimal, or three below 10 MiB so tiny models don't all read 0.0."""
    if count is None:
        return "-"
    mib = count / MIB
    return f"{mib:,.1f}" if abs(mib) >= 10 else f"{mib:.3f}"


def format_seconds(seconds: float) -> str:
    """`4.2 s` below a minute, `5 min 11 s` from one, `1 h 02 min` from an hour."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured table; pipes and line breaks inside cells are escaped, not lost."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def aligned_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table for a terminal: right-aligned columns under a dashed rule."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
