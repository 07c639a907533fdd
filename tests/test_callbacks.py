"""The end-of-sweep table: absolute figures with saved % and overhead % against `none`."""

from __future__ import annotations

import re
from pathlib import Path

from memexp.callbacks import format_table
from memexp.results import STATUS_OK, RunResult, write_result
from memexp.text import MIB


def _job(sweep: Path, num: int, strategy: str, peak_mib: int, step_ms: float) -> RunResult:
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
    )
    write_result(job_dir, result)
    return result


def test_the_table_shows_saved_and_overhead_percent_beside_the_figures(tmp_path: Path) -> None:
    results = [
        _job(tmp_path, 0, "none", peak_mib=100, step_ms=10.0),
        _job(tmp_path, 1, "full", peak_mib=60, step_ms=13.0),
    ]
    table = format_table(results)
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
    table = format_table([_job(tmp_path, 0, "full", peak_mib=60, step_ms=13.0)])
    assert re.search(
        r"^\s*0\s+tiny\s+full\s+16×2\s+60\.0\s+-\s+30\.0\s+-\s+-\s+13\.0\s+-\s+ok$", table, re.M
    )
