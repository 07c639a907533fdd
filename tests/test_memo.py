"""A workload's strategy-independent figures are computed once per sweep and read back exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from memexp import estimate, memo, planner
from memexp.config import ExperimentSpec
from memexp.estimate import NO_CHECKPOINT_FLOPS, step_flops_without_checkpointing
from memexp.memo import caching_in, workload_key
from memexp.planner import STEP_PROFILE, profile_from_data, profile_step, profile_to_data
from memexp.sweepdir import CACHE_DIR, cache_file


def _never(*args: object) -> object:
    raise AssertionError("computed again: the sweep's cached figure was not used")


def test_a_later_job_of_the_sweep_reads_the_flops_the_first_counted(
    tiny_spec: Callable[..., ExperimentSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, later = tiny_spec("strategy=none"), tiny_spec("strategy=full")
    monkeypatch.setattr(estimate, "_count_without_checkpointing", lambda spec: 1_234_567)
    with caching_in(tmp_path):
        assert step_flops_without_checkpointing(first) == 1_234_567
        monkeypatch.setattr(estimate, "_count_without_checkpointing", _never)
        assert step_flops_without_checkpointing(later) == 1_234_567
    [kept] = (tmp_path / CACHE_DIR).iterdir()
    assert kept == cache_file(tmp_path, NO_CHECKPOINT_FLOPS, workload_key(first))


@pytest.mark.slow
def test_the_planners_profile_is_kept_and_read_back_equal(
    tiny_spec: Callable[..., ExperimentSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tiny_spec("strategy=adaptive")
    with caching_in(tmp_path):
        profile = profile_step(spec)
        monkeypatch.setattr(planner, "_profile_step", _never)
        assert profile_step(tiny_spec("strategy=adaptive", "strategy.budget_mb=1")) == profile
    assert profile_from_data(profile_to_data(profile)) == profile
    assert cache_file(tmp_path, STEP_PROFILE, workload_key(spec)).is_file()


def test_the_key_changes_with_the_workload_never_with_the_strategy_or_timing(
    tiny_spec: Callable[..., ExperimentSpec],
) -> None:
    key = workload_key(tiny_spec())
    assert workload_key(tiny_spec("strategy=sqrt", "measure.repeat=7")) == key
    for override in ("seq.len=8", "batch.size=3", "precision=bf16", "model.heads=2", "device=fake"):
        assert workload_key(tiny_spec(override)) != key, override


def test_the_key_changes_with_the_code_that_computes_the_figures(
    tiny_spec: Callable[..., ExperimentSpec], monkeypatch: pytest.MonkeyPatch
) -> None:
    key = workload_key(tiny_spec())
    monkeypatch.setattr(memo, "code_fingerprint", lambda: "another torch or memexp")
    assert workload_key(tiny_spec()) != key


def test_an_unreadable_cache_file_is_computed_again_and_rewritten(
    tiny_spec: Callable[..., ExperimentSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tiny_spec()
    monkeypatch.setattr(estimate, "_count_without_checkpointing", lambda spec: 42)
    path = cache_file(tmp_path, NO_CHECKPOINT_FLOPS, workload_key(spec))
    path.parent.mkdir()
    path.write_text('{"figure": "flops_no_ch')  # a job killed mid-write by hand
    with caching_in(tmp_path):
        assert step_flops_without_checkpointing(spec) == 42
    assert path.read_text() == f'{{\n  "figure": "{NO_CHECKPOINT_FLOPS}",\n  "value": 42\n}}\n'


def test_outside_a_sweep_nothing_is_kept(
    tiny_spec: Callable[..., ExperimentSpec], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(estimate, "_count_without_checkpointing", lambda spec: 7)
    assert step_flops_without_checkpointing(tiny_spec()) == 7
    assert list(tmp_path.iterdir()) == []
