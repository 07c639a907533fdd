"""A sweep's index: one flattened row per job in `<sweep>/index.jsonl`, so records are read once.

Reading a thousand `result.json` files and flattening each is most of what aggregating costs, and
it is the same work every time the sweep is summarized again. Each job appends its row right
after writing its record (`append_row`: one line, one `write` on a file opened for appending, so
concurrent jobs never interleave). The aggregate reads the index (`read_rows`) and only the
records the index does not hold or holds stale (the record's size or modification time changed:
a resumed job rewrote it); it then rewrites the index whole when anything was missing, stale or
damaged. The records stay the truth: a damaged or missing index costs one full read, never a row.

A row is `flatten_record` of the record (what the table is built from) plus `index_stamp`, the
record's size and modification time, and `index_record`, the record's path relative to the sweep
folder (so a copied or moved sweep keeps its index).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memexp.results import RunResult, read_result
from memexp.sweepdir import INDEX_FILE, sweep_of
from memexp.tidy import flatten

# Nested record fields and the prefix their keys get as columns.
NESTED_PREFIXES = {"plan": "plan", "environment": "env", "extra": "extra"}
# The record's own copy of the sweep folder; the table's `sweep` column says it (for single runs too).
DUPLICATED_FIELD = "sweep_dir"
STAMP_KEY = "index_stamp"
RECORD_KEY = "index_record"


def flatten_record(result: RunResult, result_file: Path) -> dict[str, Any]:
    """A record as one table row (see `memexp.aggregate`'s docstring for the columns): nested
    dicts open into columns; lists stay lists here, for `memexp.tidy.list_tables`."""
    row = result.to_dict()
    row.pop(DUPLICATED_FIELD)
    for name, prefix in NESTED_PREFIXES.items():
        row.update(flatten(row.pop(name), prefix))
    row.update({f"phase_{k}_bytes": v for k, v in (row.pop("phase_bytes") or {}).items()})
    row["overrides"] = " ".join(row["overrides"] or [])
    row["result_file"] = str(result_file)
    row["sweep"] = str(sweep_of(result_file))
    return row


def _stamp(path: Path) -> list[int]:
    """What tells a record changed since it was indexed: its size and modification time."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns]


def _relative(result_file: Path) -> str:
    return str(Path(result_file).resolve().relative_to(sweep_of(result_file).resolve()))


def index_row(result_file: Path) -> dict[str, Any]:
    """The index line of one record: its flattened row, stamp and path within the sweep."""
    result_file = Path(result_file).resolve()
    row = flatten_record(read_result(result_file), result_file)
    return {**row, STAMP_KEY: _stamp(result_file), RECORD_KEY: _relative(result_file)}


def _unstamped(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in (STAMP_KEY, RECORD_KEY)}


def _line(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, default=str, allow_nan=True) + "\n").encode()


def append_row(result_file: Path) -> Path:
    """Append the record's row to its sweep's index: one `write` of one line (O_APPEND), so rows
    of jobs finishing together never interleave. Returns the index's path."""
    result_file = Path(result_file).resolve()
    path = sweep_of(result_file) / INDEX_FILE
    line = _line(index_row(result_file))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return path


def _load_index(path: Path) -> tuple[dict[str, dict[str, Any]], bool]:
    """Rows of an index by record path, and whether it held a line that is not a row."""
    rows: dict[str, dict[str, Any]] = {}
    damaged = False
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return rows, path.exists()
    for line in text.splitlines():
        try:
            row = json.loads(line)
            rows[row[RECORD_KEY]] = row  # a later line (a rerun job) replaces an earlier one
        except (ValueError, KeyError, TypeError):
            damaged = True
    return rows, damaged


def _rewrite(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """The whole index, atomically: readers see the old index or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(b"".join(_line(row) for row in rows))
    os.replace(tmp, path)


@dataclass
class IndexRead:
    """Rows for the records asked for, and what reading them took: a note per unreadable record,
    how many rows came from the index and how many records had to be read."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    from_index: int = 0
    read: int = 0


def read_rows(sweep_dir: Path, files: Sequence[Path]) -> IndexRead:
    """The rows of `files` (records of `sweep_dir`: `sweepdir.sweep_of` of each is `sweep_dir`)
    through the sweep's index.

    A record whose stamp matches its index row is not opened; every other one is read, and the
    index is rewritten to hold exactly the rows returned when any was missing, stale or damaged.
    """
    root = Path(sweep_dir).resolve()
    path = root / INDEX_FILE
    indexed, damaged = _load_index(path)
    out, indexed_rows = IndexRead(), []
    for result_file in files:
        result_file = root / Path(result_file).resolve().relative_to(root)
        try:
            key, stamp = str(result_file.relative_to(root)), _stamp(result_file)
            row = indexed.get(key)
            if row is None or row.get(STAMP_KEY) != stamp:
                row = index_row(result_file)
                out.read += 1
            else:
                out.from_index += 1
        except (OSError, ValueError, TypeError) as error:
            out.notes.append(f"could not read {result_file}: {type(error).__name__}: {error}")
            continue
        indexed_rows.append(row)
        located = {"result_file": str(result_file), "sweep": str(root)}
        out.rows.append({**_unstamped(row), **located})
    if out.read or damaged or len(indexed) != out.from_index:
        try:
            _rewrite(path, indexed_rows)
        except OSError as error:  # a read-only sweep is still summarized, only not indexed
            out.notes.append(f"could not write {path}: {type(error).__name__}: {error}")
    return out
