"""Timed steps: when they stop, what they record about the machine, and the thread knob."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from memexp.measure.machine import available_cpus, intra_op_threads
from memexp.measure.timing import PHASES, StoppingRule, repeat_until_done, spread
from memexp.runner import run_job

RULE = StoppingRule(minimum=3, max_time_s=1.0, stable_iqr=0.1)


def scripted(step_ms: list[float]) -> Callable[[], dict[str, float]]:
    """A fake step (and so a fake clock): each call takes the next of `step_ms` milliseconds."""
    times: Iterator[float] = iter(step_ms)
    return lambda: dict.fromkeys(PHASES, next(times))


def test_iqr_and_median_are_torch_benchmarks_linear_quantiles() -> None:
    stats = spread([10.0, 12.0, 20.0, 30.0])
    assert (stats.median, stats.iqr) == (16.0, 11.0)  # p75 22.5 - p25 11.5


def test_steady_steps_stop_at_the_minimum_and_are_stable() -> None:
    samples, stable = repeat_until_done(scripted([100.0, 101.0, 102.0, 500.0]), RULE)
    assert samples["step"] == [100.0, 101.0, 102.0] and stable


def test_noisy_steps_continue_until_their_iqr_settles() -> None:
    steps = [100.0, 300.0, 100.0, 100.0, 100.0, 100.0, 999.0]
    samples, stable = repeat_until_done(scripted(steps), RULE)
    # 3 steps: IQR 100 of median 100; 4: 50 of 100; 5: 0 of 100, stable.
    assert samples["step"] == steps[:5] and stable


def test_the_time_cap_stops_steps_that_never_settle() -> None:
    steps = [100.0, 500.0, 100.0, 500.0, 100.0, 500.0]  # 1.2 s after the fourth
    samples, stable = repeat_until_done(scripted(steps), RULE)
    assert samples["step"] == steps[:4] and not stable


def test_the_minimum_holds_even_past_the_cap() -> None:
    samples, _ = repeat_until_done(scripted([2000.0, 10.0, 3000.0, 1.0]), RULE)
    assert len(samples["step"]) == 3


def test_fixed_times_exactly_its_steps() -> None:
    samples, _ = repeat_until_done(scripted([1.0, 50.0, 2.0, 3.0]), StoppingRule.fixed(2))
    assert samples["step"] == [1.0, 50.0]


def test_the_thread_knob_is_set_inside_and_restored_after() -> None:
    before = torch.get_num_threads()
    with intra_op_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with intra_op_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.slow
def test_a_record_says_the_threads_cpus_and_load_it_was_timed_under(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    before = torch.get_num_threads()
    cfg = tiny_cfg("measure.threads=1", "measure.repeat=2", "measure.max_time_s=0.1")
    result = run_job(cfg, tmp_path, {})
    assert result.status == "ok" and torch.get_num_threads() == before
    assert (result.time_threads, result.time_cpus) == (1, available_cpus())
    assert result.time_interop_threads == torch.get_num_interop_threads()
    assert result.time_load_before >= 0 and result.time_load_after >= 0
    assert result.time_repeats >= 2 and isinstance(result.time_stable, bool)
    assert result.step_ms_iqr >= 0
