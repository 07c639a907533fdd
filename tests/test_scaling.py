"""Sequence-length exponents: known on synthetic sweeps, and as the derivation says on real shapes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from memexp import analytic
from memexp.config import ExperimentSpec
from memexp.scaling import exponent, scaling_exponents
from memexp.strategies import make_plan

SpecFn = Callable[..., ExperimentSpec]
SEQ_LENS = [128, 256, 512, 1024, 2048]


def synthetic(k: float, c: float = 3.5e4, **identity: object) -> pd.DataFrame:
    return pd.DataFrame(
        [{**identity, "seq_len": s, "peak_bytes": c * s**k, "status": "ok"} for s in SEQ_LENS]
    )


@pytest.mark.parametrize("k", [0.5, 1.0, 1.7, 2.0])
def test_power_law_exponent_is_recovered(k: float) -> None:
    table = synthetic(k, model="m", strategy="none", attention="naive")
    (row,) = scaling_exponents(table).to_dict("records")
    assert row["exponent"] == pytest.approx(k, abs=1e-9)
    assert row["local_exponent"] == pytest.approx(k, abs=1e-9)
    assert (row["points"], row["seq_len_min"], row["seq_len_max"]) == (3, 512, 2048)


def test_one_exponent_per_configuration_and_failed_jobs_ignored() -> None:
    naive = synthetic(1.7, model="m", strategy="none", attention="naive")
    fused = synthetic(1.0, model="m", strategy="none", attention="sdpa")
    failed = pd.DataFrame(
        [{"model": "m", "strategy": "none", "attention": "sdpa", "seq_len": 4096,
          "peak_bytes": None, "status": "oom"}]
    )  # fmt: skip
    table = scaling_exponents(pd.concat([naive, fused, failed]))
    by_attention = dict(zip(table["attention"], table["exponent"], strict=True))
    assert by_attention == pytest.approx({"naive": 1.7, "sdpa": 1.0}, abs=1e-9)
    assert list(table["seq_len_max"]) == [2048, 2048]


def test_largest_lengths_decide_the_fit() -> None:
    """A constant plus a quadratic: the fit over the longest lengths approaches 2."""
    rows = [{"seq_len": s, "peak_bytes": 1e9 + 10.0 * s**2, "model": "m"} for s in SEQ_LENS]
    table = pd.DataFrame(rows)
    wide, narrow = (
        scaling_exponents(table, largest=n).iloc[0]["exponent"] for n in (len(SEQ_LENS), 2)
    )
    assert wide < narrow < 2


def test_a_single_length_gives_no_row() -> None:
    table = synthetic(1.0, model="m").head(1)
    assert scaling_exponents(table).empty


def test_exponent_of_two_points() -> None:
    assert exponent([100, 400], [5.0, 80.0]) == pytest.approx(2.0)


def test_closed_form_activations_tend_to_two_for_naive_and_stay_near_one_when_fused(
    tiny_spec: SpecFn,
) -> None:
    """The derivation's own saved bytes at medium's shape over s = 1k…16k."""
    rows = []
    for attention in ("naive", "sdpa"):
        for s in (1024, 2048, 4096, 8192, 16384):
            spec = tiny_spec(
                "model=medium", f"model.max_seq_len={s}", f"seq.len={s}",
                f"model.attention={attention}",
            )  # fmt: skip
            saved = analytic.saved_activation_bytes(spec, make_plan(spec))
            rows.append({"attention": attention, "seq_len": s, "saved_activation_bytes": saved})
    table = scaling_exponents(pd.DataFrame(rows), value="saved_activation_bytes")
    k = dict(zip(table["attention"], table["exponent"], strict=True))
    assert 1.85 < k["naive"] < 2.0
    assert k["sdpa"] == pytest.approx(1.0, abs=1e-3)
    assert np.isfinite(list(k.values())).all()
