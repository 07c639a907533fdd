"""Resume: a sweep finished in its own folder measures every job exactly once and loses no record."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import BRIEF_TIMING, TINY, SweepRun
from omegaconf import DictConfig

from memexp.results import (
    RESULT_FILE,
    STATUS_ERROR,
    STATUS_OK,
    RunResult,
    read_result,
    write_result,
)
from memexp.resume import REFUSED_EXIT_CODE, already_measured, config_hash

SWEEP = ("strategy=none,full,sqrt", "measure.repeat=1")
JOBS = range(3)


def copy_of(sweep: SweepRun, tmp_path: Path) -> Path:
    """A private copy of the session's tiny sweep (none ok, full error, sqrt oom) to resume."""
    (folder,) = (sweep.cwd / "outputs" / "multirun").glob("*/*")
    return Path(shutil.copytree(folder, tmp_path / "sweep"))


def record_bytes(sweep_dir: Path) -> dict[int, bytes]:
    return {n: (sweep_dir / str(n) / RESULT_FILE).read_bytes() for n in JOBS}


def test_the_hash_ignores_where_results_go_but_not_what_is_measured(
    tiny_cfg: Callable[..., DictConfig],
) -> None:
    base = config_hash(tiny_cfg("strategy=full"))
    assert config_hash(tiny_cfg("strategy=full", "resume=/elsewhere")) == base
    assert config_hash(tiny_cfg("strategy=full", "logger=wandb")) == base
    assert config_hash(tiny_cfg("strategy=full", "seq.len=32")) != base
    assert config_hash(tiny_cfg("strategy=sqrt")) != base


def test_only_an_ok_record_of_the_same_config_counts_as_measured(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = tiny_cfg("strategy=full", f"resume={tmp_path}")
    cases = {
        "same config, ok": (STATUS_OK, config_hash(cfg), True),
        "same config, failed": (STATUS_ERROR, config_hash(cfg), False),
        "other config, ok": (STATUS_OK, config_hash(tiny_cfg("strategy=sqrt")), False),
    }
    for name, (status, digest, measured) in cases.items():
        write_result(tmp_path, RunResult(status=status, extra={"config_hash": digest}))
        assert already_measured(cfg, tmp_path) is measured, name
    not_resuming = tiny_cfg("strategy=full")
    assert not already_measured(not_resuming, tmp_path)


@pytest.mark.slow
def test_a_folder_of_results_is_refused_unless_resumed(
    tiny_sweep: SweepRun, tmp_path: Path, run_sweep: Callable[..., SweepRun]
) -> None:
    sweep_dir = copy_of(tiny_sweep, tmp_path)
    before = record_bytes(sweep_dir)
    reused = run_sweep(tmp_path, {}, *SWEEP, f"hydra.sweep.dir={sweep_dir}")
    missing = run_sweep(tmp_path, {}, *SWEEP, f"resume={tmp_path / 'no-such-sweep'}")
    assert (reused.exit_code, missing.exit_code) == (REFUSED_EXIT_CODE, REFUSED_EXIT_CODE)
    assert record_bytes(sweep_dir) == before
    assert not list(sweep_dir.glob("*/result.previous-*"))


@pytest.mark.slow
def test_resuming_reruns_failed_jobs_and_keeps_their_old_records(
    tiny_sweep: SweepRun, tmp_path: Path, run_sweep: Callable[..., SweepRun]
) -> None:
    sweep_dir = copy_of(tiny_sweep, tmp_path)
    before = record_bytes(sweep_dir)
    resumed = run_sweep(tmp_path, {}, *SWEEP, f"resume={sweep_dir}")

    assert resumed.exit_code == 0
    assert record_bytes(sweep_dir)[0] == before[0]  # ok, same config: skipped
    for num in (1, 2):  # error and oom: measured again, the old record kept beside the new one
        assert read_result(sweep_dir / str(num)).status == STATUS_OK
        kept = sweep_dir / str(num) / "result.previous-1.json"
        assert kept.read_bytes() == before[num]
    assert f"3 job(s) in {sweep_dir}" in resumed.stdout  # the end-of-sweep summary read them all


@pytest.mark.slow
def test_a_killed_sweep_resumed_measures_every_job_exactly_once(
    tmp_path: Path, run_sweep: Callable[..., SweepRun]
) -> None:
    """`python -m memexp` killed with SIGKILL once the first record exists, then resumed."""
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "memexp", "-m", *TINY, *BRIEF_TIMING, *SWEEP,
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    # One thread: on two shared cores, threads of one process spinning against each other
    # make a tiny step take seconds.
    started = subprocess.Popen(
        command,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (sweep_dir / "0" / RESULT_FILE).exists():
            assert started.poll() is None and time.monotonic() < deadline, "no first record"
            time.sleep(0.02)
    finally:
        os.killpg(started.pid, signal.SIGKILL)
        started.wait()
    killed_at = datetime.now(timezone.utc).replace(microsecond=0)
    first = (sweep_dir / "0" / RESULT_FILE).read_bytes()
    unfinished = [n for n in JOBS if not (sweep_dir / str(n) / RESULT_FILE).exists()]
    assert unfinished, "the sweep finished before it was killed"

    resumed = run_sweep(tmp_path, {}, *SWEEP, f"resume={sweep_dir}")

    assert resumed.exit_code == 0
    records = {n: read_result(sweep_dir / str(n)) for n in JOBS}
    assert [r.status for r in records.values()] == [STATUS_OK] * len(JOBS)
    assert (sweep_dir / "0" / RESULT_FILE).read_bytes() == first
    assert all(datetime.fromisoformat(records[n].started_at) >= killed_at for n in unfinished)
    assert not list(sweep_dir.glob("*/result.previous-*"))  # no job ever held two records
    assert [(r.job_num, r.sweep_dir) for r in records.values()] == [
        (n, str(sweep_dir)) for n in JOBS
    ]
    assert f"3 job(s) in {sweep_dir}" in resumed.stdout  # the end-of-sweep callback read them all
