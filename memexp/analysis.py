"""What figures and the summary page read off the sweep table besides its columns.

The reading order of configs, models and strategies (the same in every figure and table), how
the memory and time figures were taken (in words, for legends and footers), and the derived
tables both show: the largest batch that fits against the `none` strategy's, and how memory
grows with sequence length. Kept apart from `memexp.aggregate`, which builds the table itself,
and below `memexp.plots` and `memexp.report`, so a figure and the page say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from memexp.aggregate import BASELINE_STRATEGY, TIME_COLUMN, as_float, ran_auto_batch
from memexp.results import SOURCE_FAKE_TENSORS, STATUS_OK
from memexp.scaling import scaling_exponents
from memexp.text import format_seconds

MEMORY_SOURCE_LABELS = {
    "cuda_allocator": "CUDA caching allocator (allocated bytes, GPU)",
    "tensor_tracker": "tensor tracker (exact bytes, CPU)",
    "fake_tensors": "fake tensors (bytes from shapes, nothing computed)",
}
# A batch=auto job's search: the workload it searched for, and the `extra` figures it recorded.
AUTO_BATCH_KEYS = ("model", "seq_len", "device", "precision", "attention")
AUTO_BATCH_EXTRAS = {
    "extra_auto_batch_size": "found_batch",
    "extra_auto_batch_budget_bytes": "budget_bytes",
    "extra_auto_batch_predicted_peak_bytes": "predicted_peak_bytes",
    "extra_auto_batch_headroom_bytes": "headroom_bytes",
    "extra_auto_batch_next_peak_bytes": "next_peak_bytes",
    "extra_auto_batch_limit_reached": "limit_reached",
    "extra_auto_batch_backoffs": "backoffs",
    "extra_auto_batch_imagines": "imagines",
}
# Sequence-length scaling: a row per configuration that ran at MIN_SEQ_LENS lengths or more,
# k fitted over its FIT_POINTS longest, for each memory figure (column: what the table calls it).
SCALING_KEYS = ("model", "strategy_label", "attention", "batch_size", "precision", "device")
SCALING_VALUES = {"peak_bytes": "peak", "saved_activation_bytes": "kept for backward"}
MIN_SEQ_LENS = 3
FIT_POINTS = 3


# --- the sweep's time against its training steps ---------------------------------------------


@dataclass(frozen=True)
class SweepTime:
    """How long the sweep's jobs ran and how much of it the training steps took.

    `wall_s`: from the first job's start to the last job's finish (records keep whole seconds;
    the command's start-up before its first job and the aggregate after the last are left out; a
    resumed sweep's span includes the pause). `steps_s`: every timed job's warm-up, timed and
    memory steps at its median step time, the work the jobs cannot avoid.
    """

    wall_s: float
    steps_s: float

    @property
    def steps_share(self) -> float | None:
        return self.steps_s / self.wall_s if self.wall_s > 0 else None

    def describe(self) -> str:
        if not self.steps_s:
            return (
                f"wall time {format_seconds(self.wall_s)} from the first job's start to the last "
                "job's finish; no step was timed"
            )
        share = self.steps_share
        share_text = f" ({share:.0%} of the wall time)" if share is not None else ""
        return (
            f"wall time {format_seconds(self.wall_s)} from the first job's start to the last "
            f"job's finish; training steps {format_seconds(self.steps_s)}{share_text}: warm-up, "
            "timed and memory steps of every job at its median step time"
        )


def sweep_time(frame: pd.DataFrame) -> SweepTime | None:
    """The sweep's `SweepTime`, None when no record says when it started and finished."""
    if frame.empty or "started_at" not in frame:
        return None
    started = pd.to_datetime(frame.started_at, utc=True, errors="coerce")
    finished = pd.to_datetime(frame.finished_at, utc=True, errors="coerce")
    if started.isna().all() or finished.isna().all():
        return None
    step_ms = as_float(frame[TIME_COLUMN])
    steps = as_float(frame.time_warmup).fillna(0) + as_float(frame.time_repeats).fillna(0) + 1
    steps_s = float((steps * step_ms).sum(min_count=1) / 1000.0) if step_ms.notna().any() else 0.0
    return SweepTime((finished.max() - started.min()).total_seconds(), steps_s)


# --- reading order and how the figures were taken -----------------------------------------------


def config_order(frame: pd.DataFrame) -> list[str]:
    """Configs from the smallest model and workload to the largest, the way a reader scans them."""
    keys = frame.assign(
        _params=as_float(frame.param_count).groupby(frame.model, dropna=False).transform("max")
    ).sort_values(["_params", "model", "seq_len", "batch_size", "config"], na_position="last")
    return list(dict.fromkeys(keys.config))


def model_order(frame: pd.DataFrame) -> list[str]:
    """Models in the order `config_order` puts their configs: smallest first."""
    model_of = frame.drop_duplicates("config").set_index("config").model
    return list(dict.fromkeys(model_of[c] for c in config_order(frame)))


def strategy_order(frame: pd.DataFrame) -> list[str]:
    """The baseline first, then the other labels alphabetically: stable colours and order."""
    labels = sorted(set(frame.strategy_label))
    return sorted(labels, key=lambda label: (label.split()[0] != BASELINE_STRATEGY, label))


def describe_memory_sources(frame: pd.DataFrame) -> str:
    """Where the memory figures of the ok rows came from, in words."""
    sources = frame.loc[frame.status.eq(STATUS_OK), "memory_source"].dropna().unique()
    return "; ".join(MEMORY_SOURCE_LABELS.get(s, str(s)) for s in sorted(sources)) or "unknown"


def _span(values: pd.Series) -> str:
    present = sorted({int(v) for v in values.dropna()})
    if not present:
        return "?"
    return str(present[0]) if len(present) == 1 else f"{present[0]}\u2013{present[-1]}"


def describe_times(frame: pd.DataFrame) -> str:
    """How the step times were taken: `median of N repeats (min-max)` plus the timer used, and
    where recorded, how many jobs became stable and the threads they ran with.

    Only timed rows count: a fake-device job predicts memory and has no measured step.
    """
    ok = frame[frame.status.eq(STATUS_OK) & frame[TIME_COLUMN].notna()]
    if ok.empty:
        return "not measured (no ok job timed a step; fake-device jobs only predict memory)"
    timers = ", ".join(sorted(ok.time_source.dropna().unique())) or "timer unknown"
    text = (
        f"median of {_span(ok.time_repeats)} repeats (min\u2013max) after "
        f"{_span(ok.time_warmup)} warm-up step(s), {timers}"
    )
    if ok.time_stable.notna().any():
        stable = int(ok.time_stable.eq(True).sum())
        text += (
            f"; repeated until IQR / median reached `measure.stable_iqr` ({stable} of {len(ok)} "
            f"job(s)) or `measure.max_time_s` ran out; {_span(ok.time_threads)} intra-op "
            "thread(s)"
        )
    return text


# --- batch=auto ---------------------------------------------------------------------------------


def auto_batch_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per batch=auto job: the batch it ran at and how many times the `none` job's batch.

    `batch` is the batch an ok job ran at (on a GPU, after any out-of-memory back-off), else the
    batch its search found: NaN when even the first batch tried did not fit, and then the record's
    `batch_size` and `peak_bytes` are that first batch and its predicted peak. `times_none` =
    batch / batch of the ok `none` job of the same sweep and (model, seq_len, device, precision,
    attention), the lowest job number winning; ok rows only.
    """
    jobs = frame[ran_auto_batch(frame)]
    extras = {
        name: as_float(jobs[column]) if column in jobs else pd.Series(float("nan"), jobs.index)
        for column, name in AUTO_BATCH_EXTRAS.items()
        if name not in ("limit_reached", "imagines")
    }
    limit = jobs.get("extra_auto_batch_limit_reached", pd.Series(False, jobs.index))
    ok = jobs.status.eq(STATUS_OK)
    table = jobs[
        ["sweep", *AUTO_BATCH_KEYS, "job_num", "strategy", "strategy_label", "status", "message"]
    ].assign(
        batch=as_float(jobs.batch_size).where(ok, extras["found_batch"]),
        peak_bytes=as_float(jobs.peak_bytes),
        batch_size=as_float(jobs.batch_size),
        limit_reached=limit.eq(True),
        imagines=jobs.get("extra_auto_batch_imagines", pd.Series(None, jobs.index, dtype=object)),
        **extras,
    )
    compared = ("sweep", *AUTO_BATCH_KEYS)
    found = table[table.strategy.eq(BASELINE_STRATEGY) & table.status.eq(STATUS_OK)]
    none = (
        found.dropna(subset=["batch"])
        .sort_values("job_num", kind="stable")
        .drop_duplicates(list(compared))[[*compared, "batch"]]
        .rename(columns={"batch": "none_batch"})
    )
    table = table.merge(none, on=list(compared), how="left", validate="many_to_one")
    table["times_none"] = (table.batch / table.none_batch).where(table.status.eq(STATUS_OK))
    return table


def predicted_memory(rows: pd.DataFrame) -> pd.Series:
    """Rows whose memory was predicted on fake tensors rather than measured on a real step."""
    return rows.memory_source.eq(SOURCE_FAKE_TENSORS)


# --- sequence-length scaling --------------------------------------------------------------------


def seq_len_exponents(frame: pd.DataFrame) -> pd.DataFrame:
    """k in memory ∝ seq_len^k per configuration (`SCALING_KEYS`) that ran at `MIN_SEQ_LENS`
    sequence lengths or more, fitted over its `FIT_POINTS` longest, for each of `SCALING_VALUES`.

    Columns: the keys, then `<value>_exponent`, `_local_exponent`, `_points`, `_seq_len_min`,
    `_seq_len_max` per value (NaN where that value was not recorded). Ok jobs only.
    """
    keys = list(SCALING_KEYS)
    ok = frame[frame.status.eq(STATUS_OK)]
    lengths = ok.groupby(keys, dropna=False).seq_len.transform("nunique")
    eligible = ok[lengths >= MIN_SEQ_LENS]
    fits = []
    for value in SCALING_VALUES:
        numeric = eligible.assign(**{value: pd.to_numeric(eligible[value]).astype(float)})
        fit = scaling_exponents(numeric, value=value, by=keys, largest=FIT_POINTS)
        fits.append(fit.drop(columns="value").set_index(keys).add_prefix(f"{value}_"))
    return pd.concat(fits, axis=1).reset_index()
