"""Nested record fields as tidy data: dicts open into columns, lists become tables of their own.

A cell of `results.csv` holds one value, never JSON a reader would have to parse: a nested dict
`extra["adaptive"]["units"]["ffn"]["recompute_flops"]` is the column
`extra_adaptive_units_ffn_recompute_flops`, and a list (a plan's segments, batch=auto's probes,
adaptive's planning rounds) is a table beside the results, one row per job and item, keyed by
(`sweep`, `job_num`) like the results:

* `plans.csv`: one row per job x layer x recomputed unit (`layer`, `unit`, and for a unit run
  under one checkpoint with other layers, `segment_first`/`segment_last`);
* `<list>.csv` for every other list (`auto_batch_probes.csv`, `adaptive_rounds.csv`, ...): one row
  per item, `item` its position; a dict item opens into columns, a pair `[a, b]` into
  `value_0`, `value_1`, and a list of words inside an item is one space-separated cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from memexp.plan import LAYER

KEY_COLUMNS = ("sweep", "job_num")
PLANS_TABLE = "plans"
# A plan's lists, which `plans.csv` turns into layer x unit rows.
PLAN_SEGMENTS, PLAN_PARTS = "plan_segments", "plan_parts"
SEGMENT = "segment"  # unit name of a layer checkpointed together with its neighbours
# Stripped from a list's column name to name its table: `extra_auto_batch_probes` -> `auto_batch_probes`.
TABLE_PREFIXES = ("extra_",)


def flatten(values: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}, "c": [2]}` -> `{"<prefix>_a_b": 1, "<prefix>_c": [2]}`: dicts open into
    columns at any depth; lists are kept whole for `list_tables`."""
    flat: dict[str, Any] = {}
    for key, value in (values or {}).items():
        name = f"{prefix}_{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def is_list(value: Any) -> bool:
    return isinstance(value, list | tuple)


def list_columns(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """Columns holding a list in some row: they go to tables of their own, not into results."""
    return {key for row in rows for key, value in row.items() if is_list(value)}


def _keys(row: Mapping[str, Any]) -> dict[str, Any]:
    return {key: row.get(key) for key in KEY_COLUMNS}


def plan_rows(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One job's plan as layer x unit rows: segments' layers first, then sub-block parts."""
    out = []
    for first, end in row.get(PLAN_SEGMENTS) or ():
        unit = LAYER if end - first == 1 else SEGMENT
        for layer in range(first, end):
            bounds = {"segment_first": first, "segment_last": end - 1}
            out.append({**_keys(row), "layer": layer, "unit": unit, **bounds})
    for layer, part in row.get(PLAN_PARTS) or ():
        out.append({**_keys(row), "layer": layer, "unit": part})
    return out


def _cell(value: Any) -> Any:
    """A list inside an item (a plan's per-layer choices) as one space-separated cell."""
    return " ".join(map(str, value)) if is_list(value) else value


def _item_columns(item: Any) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return {key: _cell(value) for key, value in flatten(item).items()}
    if is_list(item):
        return {f"value_{index}": _cell(value) for index, value in enumerate(item)}
    return {"value": item}


def item_rows(rows: Iterable[Mapping[str, Any]], column: str) -> list[dict[str, Any]]:
    """One row per job and item of the list in `column`."""
    return [
        {**_keys(row), "item": index, **_item_columns(item)}
        for row in rows
        if is_list(row.get(column))
        for index, item in enumerate(row[column])
    ]


def table_name(column: str) -> str:
    for prefix in TABLE_PREFIXES:
        column = column.removeprefix(prefix)
    return column


def list_tables(rows: list[Mapping[str, Any]]) -> dict[str, pd.DataFrame]:
    """Every list of the flattened records as its own table (see the module docstring); a list
    no record holds an item of gives no table."""
    tables = {PLANS_TABLE: [line for row in rows for line in plan_rows(row)]}
    for column in sorted(list_columns(rows) - {PLAN_SEGMENTS, PLAN_PARTS}):
        tables[table_name(column)] = item_rows(rows, column)
    # Nullable dtypes: a layer number stays `2`, not `2.0`, where other rows leave it empty.
    return {name: pd.DataFrame(lines).convert_dtypes() for name, lines in tables.items() if lines}
