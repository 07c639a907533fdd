"""batch=dynamic: lengths into buckets, a batch per bucket that fits, and the batch sampler.

The arithmetic and the sampler are checked on hand-made tables (fast); the tiny model's table is
checked against independent predictions on fake tensors and, on the CPU, against the tensor
tracker's measured peaks (slow: each prediction takes a fraction of a second).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from memexp.batching import BucketBatchSampler
from memexp.buckets import (
    POW2,
    QUANTILE,
    Bucket,
    BucketBatch,
    BucketTable,
    LengthsError,
    bucket_bounds,
    make_buckets,
    read_lengths,
)
from memexp.config import ConfigError, ExperimentSpec
from memexp.estimate import predict
from memexp.results import RunResult
from memexp.runner import run_job
from memexp.strategies import make_plan
from memexp.summarize import no_figures, summarize_sweep

SpecFn = Callable[..., ExperimentSpec]

# A long tail: most sequences short, a few long (the histogram form, with a comment).
LONG_TAIL = "# length:count\n6:20\n8:40\n16:30\n30:6\n32:6\n64:4\n128\n"
LONG_TAIL_LENGTHS = [6] * 20 + [8] * 40 + [16] * 30 + [30] * 6 + [32] * 6 + [64] * 4 + [128]
# 6 MiB: the longest length fits a batch of a few, the shortest far more.
BUDGET_GB = 6 / 1024
DYNAMIC = ("batch=dynamic", "seq.len=128", f"batch.budget_gb={BUDGET_GB}")


def lengths_file(tmp_path: Path, text: str, name: str = "lengths.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- lengths and buckets --------------------------------------------------------------------


def test_lengths_read_one_a_line_and_as_a_histogram(tmp_path: Path) -> None:
    path = lengths_file(tmp_path, "12\n  7 # a comment\n\n12:3\n# only a comment\n9:1\n")
    assert read_lengths(path) == Counter({12: 4, 7: 1, 9: 1})
    assert read_lengths(lengths_file(tmp_path, LONG_TAIL)) == Counter(LONG_TAIL_LENGTHS)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("", "holds no lengths"),
        ("# nothing\n\n", "holds no lengths"),
        ("12\ntwelve\n", "line 2 holds 'twelve'"),
        ("12.5\n", "line 1 holds '12.5'"),
        ("8:x\n", "line 1 holds '8:x'"),
        ("0\n", "positive"),
        ("8:0\n", "positive"),
    ],
)
def test_a_bad_lengths_file_says_where(tmp_path: Path, text: str, said: str) -> None:
    with pytest.raises(LengthsError, match=said):
        read_lengths(lengths_file(tmp_path, text))


def test_a_missing_lengths_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(LengthsError, match="no such file"):
        read_lengths(tmp_path / "absent.txt")


def test_bucket_rules() -> None:
    counts = Counter({3: 1, 5: 2, 8: 3, 9: 1, 100: 1})
    assert bucket_bounds(counts, [], POW2, 4) == [4, 8, 16, 32, 64, 128]
    # 8 sequences in 4 quantiles: at least 2, 4, 6, 8 of them at or below each bound.
    assert bucket_bounds(counts, [], QUANTILE, 4) == [5, 8, 100]
    assert bucket_bounds(counts, [50, 10], POW2, 4) == [10, 50]


def test_buckets_pad_to_their_longest_and_the_last_reaches_the_longest_length() -> None:
    counts = Counter({3: 1, 5: 2, 8: 3, 9: 1, 100: 1})
    buckets = make_buckets(counts, [4, 10, 50], "given", "lengths.txt")
    assert buckets.buckets == (
        Bucket(shortest=3, longest=3, sequences=1, tokens=3),
        Bucket(shortest=5, longest=9, sequences=6, tokens=5 * 2 + 8 * 3 + 9),
        Bucket(shortest=100, longest=100, sequences=1, tokens=100),  # beyond the last bound
    )
    assert (buckets.sequences, buckets.tokens, buckets.longest) == (8, 146, 100)


def table_of(batches: dict[int, int], counts: Counter[int], fixed_batch: int) -> BucketTable:
    buckets = make_buckets(counts, sorted(batches), "given", "lengths.txt")
    rows = tuple(
        BucketBatch(b, batches[b.longest], predicted_peak_bytes=0) for b in buckets.buckets
    )
    return BucketTable(buckets, rows, 1, fixed_batch, 0, "fake_tensors")


def test_padding_and_tokens_per_step_against_one_fixed_batch() -> None:
    counts = Counter({10: 30, 20: 10, 100: 2})  # 300 + 200 + 200 = 700 own tokens
    table = table_of({10: 16, 20: 8, 100: 2}, counts, fixed_batch=2)
    assert [row.steps for row in table.rows] == [2, 2, 1]
    assert [row.tokens_per_step for row in table.rows] == [160, 160, 200]
    assert table.padded_tokens == 700  # every bucket holds one length: no padding
    assert table.fixed_padded_tokens == 42 * 100
    assert table.padding_saved_tokens == 4200 - 700
    assert table.fixed_padding_pct == pytest.approx(100 * 3500 / 4200)
    assert (table.padding_pct, table.padding_saved_pct) == (0.0, 100.0)
    assert (table.fixed_steps, table.steps) == (21, 5)
    assert table.tokens_per_step_gain == pytest.approx(21 / 5)
    assert table.tokens_per_step == pytest.approx(700 / 5)


# --- the sampler ----------------------------------------------------------------------------


def test_the_sampler_yields_every_index_once_within_its_buckets_batch() -> None:
    rng = random.Random(0)
    lengths = [rng.choice([3, 5, 9, 17, 40, 100]) for _ in range(500)]
    batches = {5: 64, 17: 20, 100: 3}
    for shuffle in (False, True):
        sampler = BucketBatchSampler(lengths, batches, shuffle=shuffle, seed=1)
        yielded = list(sampler)
        assert sorted(i for batch in yielded for i in batch) == list(range(len(lengths)))
        assert len(yielded) == len(sampler)
        for batch in yielded:
            limit = min(b for b in batches if b >= max(lengths[i] for i in batch))
            assert all(lengths[i] <= limit for i in batch)
            assert len(batch) <= batches[limit]
            assert min(b for b in batches if b >= min(lengths[i] for i in batch)) == limit
    assert list(BucketBatchSampler(lengths, batches, shuffle=True, seed=1)) == list(
        BucketBatchSampler(lengths, batches, shuffle=True, seed=1)
    )
    assert list(BucketBatchSampler(lengths, batches, shuffle=True, seed=2)) != yielded
    sampler = BucketBatchSampler(lengths, batches, shuffle=True, seed=1)
    sampler.set_epoch(1)
    assert list(sampler) != yielded


def test_the_sampler_refuses_a_sequence_longer_than_every_bucket_and_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="sequence 1 has length 101"):
        BucketBatchSampler([5, 101], {5: 4, 100: 1})
    with pytest.raises(ValueError, match="a batch of at least 1"):
        BucketBatchSampler([5], {5: 0})


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "overrides", "field", "said"),
    [
        (None, (), "batch.lengths", "a file of sequence lengths"),
        ("", (), "batch.lengths", "holds no lengths"),
        ("16\nsixteen\n", (), "batch.lengths", "line 2 holds 'sixteen'"),
        ("16\n129\n", (), "batch.lengths", "at most 128.*it holds 129"),
        (LONG_TAIL, ("batch.buckets=[64,32]",), "batch.buckets", "strictly increasing"),
        (LONG_TAIL, ("batch.bucket_rule=log",), "batch.bucket_rule", "pow2, quantile"),
        (LONG_TAIL, ("batch.bucket_count=0",), "batch.bucket_count", "positive"),
        (LONG_TAIL, ("batch.auto=true",), "batch.auto", "false under batch=dynamic"),
        (LONG_TAIL, ("batch.budget_gb=null", "device=cpu"), "batch.budget_gb", "dynamic"),
    ],
)
def test_bad_dynamic_batch_config_fails_early_naming_the_field(
    tiny_spec: SpecFn,
    tmp_path: Path,
    text: str | None,
    overrides: tuple[str, ...],
    field: str,
    said: str,
) -> None:
    lengths = () if text is None else (f"batch.lengths={lengths_file(tmp_path, text)}",)
    with pytest.raises(ConfigError, match=said) as raised:
        tiny_spec(*DYNAMIC, "device=fake", *lengths, *overrides)
    assert raised.value.field_name == field


def test_a_missing_lengths_file_fails_naming_the_field(tiny_spec: SpecFn, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file") as raised:
        tiny_spec(*DYNAMIC, f"batch.lengths={tmp_path / 'absent.txt'}")
    assert raised.value.field_name == "batch.lengths"


def test_a_lengths_file_outside_batch_dynamic_is_refused(tiny_spec: SpecFn, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only read under batch=dynamic") as raised:
        tiny_spec(f"batch.lengths={lengths_file(tmp_path, LONG_TAIL)}")
    assert raised.value.field_name == "batch.lengths"


def test_the_spec_holds_the_buckets(tiny_spec: SpecFn, tmp_path: Path) -> None:
    path = lengths_file(tmp_path, LONG_TAIL)
    # 107 sequences: at least 27, 54, 81 and 107 of them at or below 8, 8, 16 and 128.
    spec = tiny_spec(*DYNAMIC, f"batch.lengths={path}", "batch.bucket_rule=quantile")
    assert spec.buckets == make_buckets(
        Counter(LONG_TAIL_LENGTHS), [8, 16, 128], f"{QUANTILE} 4", str(path)
    )
    assert spec.memory_budget_bytes == int(BUDGET_GB * 2**30)
    assert spec.searches_batch and not spec.auto_batch


# --- the tiny model's table -----------------------------------------------------------------


@pytest.fixture(scope="module")
def dynamic_job(
    tmp_path_factory: pytest.TempPathFactory, compose_cfg: Callable
) -> tuple[RunResult, Path]:
    """One batch=dynamic job on the fake device, as the command line runs it."""
    folder = tmp_path_factory.mktemp("dynamic")
    path = lengths_file(folder, LONG_TAIL)
    cfg = compose_cfg("model=tiny", "logger=none", "device=fake", *DYNAMIC, f"batch.lengths={path}")
    return run_job(cfg, folder / "job", {}), folder / "job"


def peak_at(spec: ExperimentSpec, seq_len: int, batch: int) -> int:
    """An independent prediction: the step at `seq_len` x `batch` on fake tensors."""
    at = replace(spec, seq_len=seq_len, batch_size=batch)
    return predict(at, make_plan(at), at.imagined_device, counts=False).memory.peak_bytes


@pytest.mark.slow
def test_a_long_tail_gets_a_batch_per_bucket_and_saves_padding(
    dynamic_job: tuple[RunResult, Path], tiny_spec: SpecFn
) -> None:
    result, _ = dynamic_job
    assert result.status == "ok", result.message
    dynamic = result.extra["dynamic_batch"]
    buckets = dynamic["buckets"]
    assert [(b["shortest_len"], b["longest_len"], b["sequences"]) for b in buckets] == [
        (6, 8, 60),
        (16, 16, 30),
        (30, 32, 12),
        (64, 64, 4),
        (128, 128, 1),
    ]
    batches = [b["batch"] for b in buckets]
    assert batches == sorted(batches, reverse=True)  # shorter buckets, larger batches
    assert batches[0] > dynamic["fixed_batch"] > 1
    # The job's own step is the fixed batch at the longest length.
    assert (result.seq_len, result.batch_size) == (128, dynamic["fixed_batch"])
    assert result.peak_bytes == dynamic["fixed_peak_bytes"] <= dynamic["budget_bytes"]

    # Padding against one fixed batch padding everything to 128, counted from the raw lengths.
    own = sum(LONG_TAIL_LENGTHS)
    padded = 60 * 8 + 30 * 16 + 12 * 32 + 4 * 64 + 1 * 128
    assert dynamic["tokens"] == own
    assert dynamic["padding_saved_tokens"] == len(LONG_TAIL_LENGTHS) * 128 - padded
    assert dynamic["padding_pct"] == pytest.approx(100 * (1 - own / padded))
    steps = sum(math.ceil(b["sequences"] / b["batch"]) for b in buckets)
    assert dynamic["steps"] == steps
    assert dynamic["tokens_per_step_gain"] == pytest.approx(
        math.ceil(len(LONG_TAIL_LENGTHS) / dynamic["fixed_batch"]) / steps
    )

    # Each batch is the largest that fits (or holds its whole bucket), by independent predictions.
    spec = tiny_spec("device=fake", "seq.len=128")
    budget = dynamic["budget_bytes"]
    for bucket in buckets:
        assert bucket["predicted_peak_bytes"] == peak_at(
            spec, bucket["longest_len"], bucket["batch"]
        )
        assert bucket["predicted_peak_bytes"] <= budget
        if bucket["whole_bucket"]:
            assert bucket["batch"] == bucket["sequences"]
        else:
            assert peak_at(spec, bucket["longest_len"], bucket["batch"] + 1) > budget
    assert peak_at(spec, 128, dynamic["fixed_batch"] + 1) > budget


@pytest.mark.slow
def test_every_batch_the_sampler_yields_fits_the_budget(
    dynamic_job: tuple[RunResult, Path], tiny_spec: SpecFn
) -> None:
    result, _ = dynamic_job
    dynamic = result.extra["dynamic_batch"]
    batches = {b["longest_len"]: b["batch"] for b in dynamic["buckets"]}
    lengths = LONG_TAIL_LENGTHS[:]
    random.Random(0).shuffle(lengths)
    sampler = BucketBatchSampler(lengths, batches, shuffle=True, seed=0)
    yielded = list(sampler)
    assert sorted(i for batch in yielded for i in batch) == list(range(len(lengths)))
    # Each batch padded to its own longest sequence, predicted afresh (one per distinct shape).
    shapes = {(max(lengths[i] for i in batch), len(batch)) for batch in yielded}
    spec = tiny_spec("device=fake", "seq.len=128")
    for seq_len, batch in sorted(shapes):
        assert peak_at(spec, seq_len, batch) <= dynamic["budget_bytes"], (seq_len, batch)


@pytest.mark.slow
def test_the_table_is_printed_recorded_and_summarized(
    dynamic_job: tuple[RunResult, Path],
) -> None:
    result, job_dir = dynamic_job
    dynamic = result.extra["dynamic_batch"]
    assert dynamic["source"] == "fake_tensors" and dynamic["measured_source"] is None
    output = summarize_sweep(job_dir, draw=no_figures)
    buckets = pd.read_csv(job_dir / "dynamic_batch_buckets.csv")
    assert list(buckets.longest_len) == [8, 16, 32, 64, 128]
    assert list(buckets.batch) == [b["batch"] for b in dynamic["buckets"]]
    assert output.frame.extra_dynamic_batch_padding_saved_tokens.tolist() == [
        dynamic["padding_saved_tokens"]
    ]
    summary = (job_dir / "summary.md").read_text()
    assert "## Dynamic batching" in summary
    assert f"{dynamic['fixed_batch']} at 128" in summary


@pytest.mark.slow
def test_on_the_cpu_each_buckets_batch_is_measured_and_equals_the_prediction(
    tmp_path: Path, compose_cfg: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="memexp")
    path = lengths_file(tmp_path, "8:40\n32:6\n64:1\n")
    cfg = compose_cfg(
        "model=tiny", "logger=none", "device=cpu", "measure.repeat=1", "measure.max_time_s=0.01",
        *DYNAMIC[:2],
        f"batch.lengths={path}", "batch.budget_gb=0.004",
    )  # fmt: skip
    result = run_job(cfg, tmp_path / "job", {})
    assert result.status == "ok", result.message
    dynamic = result.extra["dynamic_batch"]
    assert dynamic["measured_source"] == "tensor_tracker"
    for bucket in dynamic["buckets"]:
        assert bucket["measured_peak_bytes"] == bucket["predicted_peak_bytes"]
    printed = caplog.text
    assert "peak MiB (fake_tensors)" in printed and "peak MiB (tensor_tracker)" in printed
    assert f"against one fixed batch of {dynamic['fixed_batch']} at length 64" in printed
