"""The end-of-sweep table: absolute figures with saved % and overhead % against `none`, and the
sweep's wall time against its training steps, read off the one table the sweep builds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from memexp.aggregate import read_sweep
from memexp.analysis import SweepTime, sweep_time
from memexp.callbacks import format_table
from memexp.results import STATUS_OK, RunResult, write_result
from memexp.text import MIB


def _job(
    sweep: Path, num: int, strategy: str, peak_mib: int, step_ms: float, seconds: int = 0
) -> RunResult:
    """A timed job (1 warm-up, 3 timed steps) that started `seconds` after the sweep, and took 4 s."""
    job_dir = sweep / str(num)
    job_dir.mkdir(parents=True)
    result = RunResult(
        status=STATUS_OK,
        job_dir=str(job_dir),
        job_num=num,
        model="tiny",
        strategy=strategy,
        attention="sdpa",
        seq_len=16,
        batch_size=2,
        device="cpu",
        precision="fp32",
        peak_bytes=peak_mib * MIB,
        forward_backward_peak_bytes=peak_mib * MIB // 2,
        step_ms_median=step_ms,
        time_warmup=1,
        time_repeats=3,
        started_at=f"2026-01-01T00:00:{seconds:02d}+00:00",
        finished_at=f"2026-01-01T00:00:{seconds + 4:02d}+00:00",
    )
    write_result(job_dir, result)
    return result


def test_the_table_shows_saved_and_overhead_percent_beside_the_figures(tmp_path: Path) -> None:
    results = [
        _job(tmp_path, 0, "none", peak_mib=100, step_ms=10.0),
        _job(tmp_path, 1, "full", peak_mib=60, step_ms=13.0),
    ]
    table = format_table(results, read_sweep(tmp_path).frame)
    assert re.search(
        r"^\s*0\s+tiny\s+none\s+16×2\s+100\.0\s+\+0\.0\s+50\.0\s+\+0\.0\s+-\s+10\.0\s+\+0\.0\s+ok$",
        table,
        re.M,
    )
    assert re.search(
        r"^\s*1\s+tiny\s+full\s+16×2\s+60\.0\s+\+40\.0\s+30\.0\s+\+40\.0\s+-\s+13\.0\s+\+30\.0\s+ok$",
        table,
        re.M,
    )


def test_without_a_none_job_the_percentages_stay_blank(tmp_path: Path) -> None:
    results = [_job(tmp_path, 0, "full", peak_mib=60, step_ms=13.0)]
    table = format_table(results, read_sweep(tmp_path).frame)
    assert re.search(
        r"^\s*0\s+tiny\s+full\s+16×2\s+60\.0\s+-\s+30\.0\s+-\s+-\s+13\.0\s+-\s+ok$", table, re.M
    )


def test_the_sweeps_wall_time_is_set_against_its_training_steps(tmp_path: Path) -> None:
    results = [
        _job(tmp_path, 0, "none", peak_mib=100, step_ms=100.0, seconds=0),
        _job(tmp_path, 1, "full", peak_mib=60, step_ms=300.0, seconds=5),
    ]
    frame = read_sweep(tmp_path).frame
    timing = sweep_time(frame)
    # 9 s from the first start to the last finish; 5 steps a job (1 warm-up, 3 timed, 1 memory).
    assert timing == SweepTime(wall_s=9.0, steps_s=5 * 0.1 + 5 * 0.3)
    assert timing.steps_share == pytest.approx(2.0 / 9.0)
    assert format_table(results, frame).splitlines()[-1] == (
        "time: wall time 9.0 s from the first job's start to the last job's finish; training "
        "steps 2.0 s (22% of the wall time): warm-up, timed and memory steps of every job at its "
        "median step time"
    )


def test_a_sweep_without_timed_steps_says_so(tmp_path: Path) -> None:
    _job(tmp_path, 0, "none", peak_mib=100, step_ms=100.0)
    frame = read_sweep(tmp_path).frame.assign(step_ms_median=None)
    assert sweep_time(frame).describe().endswith("no step was timed")
