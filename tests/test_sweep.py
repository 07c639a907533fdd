"""A sweep from the command line: failed jobs are results, the table is printed, exit code is honest.

The session's tiny sweep (conftest.py) runs `-m strategy=none,full,sqrt` in this process with
the `full` job crashing and the `sqrt` job running out of memory.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from omegaconf import DictConfig

from memexp.callbacks import collect_results, format_table
from memexp.results import RESULT_FILE, RunResult

if TYPE_CHECKING:
    from conftest import SweepRun

# outputs/multirun/<date>/<time>_<unique>: the date and time Hydra's `now`, then a random tag.
SWEEP_FOLDER = re.compile(r"outputs/multirun/\d{4}-\d{2}-\d{2}/\d{2}-\d{2}-\d{2}_[0-9a-f]{6}")


def only_sweep_folder(run: SweepRun) -> Path:
    folders = list((run.cwd / "outputs" / "multirun").glob("*/*"))
    assert len(folders) == 1, folders
    return folders[0]


def by_strategy(sweep_dir: Path) -> dict[str, RunResult]:
    return {result.strategy: result for result in collect_results(sweep_dir)}


@pytest.mark.slow
def test_every_job_of_a_sweep_lands_in_one_dated_unique_folder(tiny_sweep: SweepRun) -> None:
    folder = only_sweep_folder(tiny_sweep)
    assert SWEEP_FOLDER.fullmatch(folder.relative_to(tiny_sweep.cwd).as_posix())
    assert sorted(p.parent.name for p in folder.glob(f"*/{RESULT_FILE}")) == ["0", "1", "2"]


@pytest.mark.slow
def test_each_job_records_its_own_outcome(tiny_sweep: SweepRun) -> None:
    results = by_strategy(only_sweep_folder(tiny_sweep))
    assert results.keys() == {"none", "full", "sqrt"}
    assert (results["none"].status, results["none"].message) == ("ok", None)

    crashed = results["full"]
    assert crashed.status == "error"
    assert crashed.error_type == "RuntimeError"
    assert crashed.message == str(tiny_sweep.failures["full"])
    assert "RuntimeError: simulated failure" in crashed.extra["traceback"]

    out_of_memory = results["sqrt"]
    assert out_of_memory.status == "oom"
    assert out_of_memory.error_type == "OutOfMemoryError"
    assert out_of_memory.message == str(tiny_sweep.failures["sqrt"])


@pytest.mark.slow
def test_failed_jobs_still_record_who_they_are(tiny_sweep: SweepRun) -> None:
    folder = only_sweep_folder(tiny_sweep)
    for result in collect_results(folder):
        assert (result.model, result.seq_len, result.batch_size) == ("tiny", 16, 2)
        assert result.sweep_dir == str(folder.resolve())
        assert f"strategy={result.strategy}" in result.overrides
        assert result.plan is not None
        assert result.finished_at is not None


@pytest.mark.slow
def test_summary_table_lists_every_job_and_failure(tiny_sweep: SweepRun) -> None:
    folder = only_sweep_folder(tiny_sweep)
    out = tiny_sweep.stdout
    assert f"[memexp] 3 job(s) in {folder.relative_to(tiny_sweep.cwd)}" in out
    assert re.search(
        r"job\s+model\s+strategy\s+seq×batch\s+step peak MiB\s+saved %\s+fwd\+bwd peak MiB\s+saved %\s+saved act MiB\s+step ms\s+overhead %",
        out,
    )
    for job, strategy, status in [(0, "none", "ok"), (1, "full", "error"), (2, "sqrt", "oom")]:
        assert re.search(rf"^\s*{job}\s+tiny\s+{strategy}\s+16×2\s.*\s{status}$", out, re.M)
    assert "peaks: tensor_tracker (step: the whole step; fwd+bwd: forward, loss and" in out
    assert f"job 1 error: {tiny_sweep.failures['full']}" in out
    assert f"job 2 oom: {tiny_sweep.failures['sqrt']}" in out


@pytest.mark.slow
def test_an_error_job_makes_the_sweep_exit_one(tiny_sweep: SweepRun) -> None:
    assert tiny_sweep.exit_code == 1


@pytest.mark.slow
def test_out_of_memory_alone_exits_zero(
    tiny_sweep: SweepRun, run_sweep: Callable[..., SweepRun], tmp_path: Path
) -> None:
    assert tiny_sweep.exit_code == 1  # an earlier sweep in this process failed
    failures = {"sqrt": torch.OutOfMemoryError("simulated")}
    run = run_sweep(tmp_path, failures, "strategy=sqrt", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert run.exit_code == 0
    assert [r.status for r in collect_results(tmp_path / "sweep")] == ["oom"]


@pytest.mark.slow
def test_sweeps_started_together_get_different_folders(
    compose_cfg: Callable[..., DictConfig],
) -> None:
    first, second = (compose_cfg("logger=none", hydra_config=True) for _ in range(2))
    folders = [cfg.hydra.sweep.dir for cfg in (first, second)]
    assert all(SWEEP_FOLDER.fullmatch(folder) for folder in folders), folders
    assert folders[0] != folders[1]
    assert first.hydra.run.dir != second.hydra.run.dir


def test_end_table_shows_both_peaks_in_mib() -> None:
    medium = RunResult(
        status="ok", job_num=0, model="medium", strategy="full", seq_len=512, batch_size=2,
        memory_source="fake_tensors", peak_bytes=3_850_625_428,
        forward_backward_peak_bytes=3_109_736_860,
    )  # fmt: skip
    lines = format_table([medium]).splitlines()
    assert re.match(
        r"job\s+model\s+strategy\s+seq×batch\s+step peak MiB\s+saved %\s+fwd\+bwd peak MiB",
        lines[0],
    )
    assert re.match(
        r"\s*0\s+medium\s+full\s+512×2\s+3,672\.2\s+-\s+2,965\.7\s+-\s+-\s+-\s+-\s+ok$", lines[2]
    )
