"""How memory grows with sequence length: the exponent k in memory ∝ s^k, per configuration.

Naive attention keeps a·b·s² probabilities per layer, so its activation memory tends to k = 2
as s grows; fused attention and attention-core recomputation keep O(s) per layer and stay near
k = 1. A peak that includes weights and optimizer state (constant in s) shows a smaller k until
activations dominate: fit `activations_bytes` or `saved_activation_bytes` for the activations'
own exponent.

    exponents = scaling_exponents(load_results(sweep), value="saved_activation_bytes")
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

GROUP_KEYS = ("model", "strategy", "attention", "batch_size", "precision", "device")
SEQ_COLUMN = "seq_len"


def exponent(seq_lens: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(seq_len): k in value ∝ seq_len^k."""
    slope, _ = np.polyfit(np.log(np.asarray(seq_lens, float)), np.log(np.asarray(values, float)), 1)
    return float(slope)


def scaling_exponents(
    results: pd.DataFrame,
    value: str = "peak_bytes",
    by: Sequence[str] = GROUP_KEYS,
    largest: int = 3,
) -> pd.DataFrame:
    """One row per configuration with at least two sequence lengths.

    `exponent` is fitted over the `largest` longest sequences (the asymptotic regime), and
    `local_exponent` is the slope between the two longest alone. Only rows with status `ok` and
    a positive `value` count; repeated sequence lengths are averaged. Grouping keys missing from
    `results` are ignored, so a table of one device or precision needs no such column.
    """
    keys = [key for key in by if key in results.columns]
    usable = results
    if "status" in usable.columns:
        usable = usable[usable["status"] == "ok"]
    usable = usable[usable[value].notna() & (usable[value] > 0)]
    rows = []
    for group, frame in usable.groupby(keys, dropna=False, sort=True):
        by_length = frame.groupby(SEQ_COLUMN)[value].mean().sort_index()
        if len(by_length) < 2:
            continue
        tail = by_length.iloc[-largest:]
        last_two = by_length.iloc[-2:]
        rows.append(
            {
                **dict(zip(keys, group if isinstance(group, tuple) else (group,), strict=True)),
                "value": value,
                "exponent": exponent(tail.index, tail.to_numpy()),
                "local_exponent": exponent(last_two.index, last_two.to_numpy()),
                "points": len(tail),
                "seq_len_min": int(tail.index.min()),
                "seq_len_max": int(tail.index.max()),
            }
        )
    columns = [*keys, "value", "exponent", "local_exponent", "points", "seq_len_min", "seq_len_max"]
    return pd.DataFrame(rows, columns=columns)
