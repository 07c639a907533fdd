"""What goes wrong is recorded, named and survived: damaged records, resolution failures,
interrupts, unwritable folders, records of another config on resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from memexp import analytic, devices, job, runner
from memexp.config import ConfigError
from memexp.configure import validate
from memexp.interrupts import Terminated
from memexp.results import (
    STATUS_ERROR,
    STATUS_INFEASIBLE,
    STATUS_INTERRUPTED,
    STATUS_OK,
    STATUS_OOM,
    DamagedRecord,
    RunResult,
    read_result,
    write_result,
)
from memexp.resume import (
    already_measured,
    check_writable,
    config_hash,
    drop_snapshots,
    snapshot_job_configs,
)
from memexp.sweepdir import HYDRA_DIR, JOB_CONFIG, RESULT_FILE
from tests.conftest import fail_strategies

DAMAGED = {
    "truncated": '{"status": "ok", "peak_bytes": 12',
    "garbage": "\x00\x01 not json",
    "not a record": '{"hello": 1}',
    "a list": "[1, 2]",
}


@pytest.mark.parametrize("text", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_record_is_named(tmp_path: Path, text: str) -> None:
    path = tmp_path / RESULT_FILE
    path.write_text(text)
    with pytest.raises(DamagedRecord, match=f"^{path} is not a readable record"):
        read_result(path)


def _job(sweep: Path, name: str, record: RunResult | None, config: str) -> Path:
    """A job folder as Hydra and the runner leave it: `.hydra/config.yaml`, maybe a record."""
    folder = sweep / name
    (folder / HYDRA_DIR).mkdir(parents=True)
    (folder / JOB_CONFIG).write_text(config)
    if record is not None:
        write_result(folder, record)
    return folder


def _ok(cfg: DictConfig) -> RunResult:
    return RunResult(status=STATUS_OK, extra={"config_hash": config_hash(cfg)})


def test_resume_sets_a_damaged_record_aside_and_runs_the_job(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    folder = _job(tmp_path, "0", None, "strategy: none\n")
    (folder / RESULT_FILE).write_text(DAMAGED["truncated"])
    cfg = tiny_cfg(f"resume={tmp_path}")
    assert not already_measured(cfg, folder, tmp_path)
    assert (folder / "result.damaged-1.json").read_text() == DAMAGED["truncated"]
    assert not (folder / RESULT_FILE).exists()


def test_resume_skips_a_config_measured_in_another_folder_and_leaves_both_as_they_were(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """`strategy=sqrt,none` resumed on a `none,full,sqrt` sweep: nothing runs, nothing moves."""
    none, sqrt = tiny_cfg("strategy=none"), tiny_cfg("strategy=sqrt")
    _job(tmp_path, "0", _ok(none), "strategy: none\n")
    _job(tmp_path, "2", _ok(sqrt), "strategy: sqrt\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    snapshot_job_configs(tmp_path)
    (tmp_path / "0" / JOB_CONFIG).write_text("strategy: sqrt\n")  # Hydra's job 0 is now sqrt

    assert already_measured(
        tiny_cfg("strategy=sqrt", f"resume={tmp_path}"), tmp_path / "0", tmp_path
    )
    drop_snapshots(tmp_path)  # the sweep's end: folder 2 ran no job of this sweep
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_record_of_another_config_moves_with_its_config_to_a_new_folder(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    none = tiny_cfg("strategy=none")
    folder = _job(tmp_path, "0", _ok(none), "strategy: none\n")
    (folder / "timeline.json").write_text("{}")
    record = (folder / RESULT_FILE).read_bytes()
    snapshot_job_configs(tmp_path)
    (folder / JOB_CONFIG).write_text("strategy: full\n")

    assert not already_measured(tiny_cfg("strategy=full", f"resume={tmp_path}"), folder, tmp_path)
    moved = tmp_path / "1"
    assert (moved / RESULT_FILE).read_bytes() == record
    assert (moved / JOB_CONFIG).read_text() == "strategy: none\n"
    assert (moved / "timeline.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == [HYDRA_DIR]
    assert (folder / JOB_CONFIG).read_text() == "strategy: full\n"


def test_an_interpolation_that_fails_is_a_record_with_what_identity_can_be_read(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = tiny_cfg("strategy=sqrt")
    cfg.seq.len = "${model.maxlen}"
    identity = {"sweep_dir": str(tmp_path), "job_num": 3, "overrides": ["seq.len=${model.maxlen}"]}
    result = job.run_guarded(cfg, tmp_path / "3", identity, tmp_path)
    assert result is not None
    assert read_result(tmp_path / "3") == result
    assert (result.status, result.error_type) == (STATUS_ERROR, "InterpolationKeyError")
    assert (result.model, result.strategy, result.job_num) == ("tiny", "sqrt", 3)
    assert "model.maxlen" in result.message


@pytest.mark.slow
@pytest.mark.parametrize(
    ("interrupt", "cause"),
    [(KeyboardInterrupt(), "Ctrl-C (SIGINT)"), (Terminated("SIGTERM"), "SIGTERM")],
)
def test_an_interrupt_is_recorded_then_stops_the_sweep(
    tiny_cfg: Callable[..., DictConfig],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interrupt: KeyboardInterrupt,
    cause: str,
) -> None:
    fail_strategies(monkeypatch, {"none": interrupt})
    with pytest.raises(KeyboardInterrupt):
        runner.run_job(tiny_cfg("device=cpu"), tmp_path, {})
    record = read_result(tmp_path)
    assert record.status == STATUS_INTERRUPTED
    assert record.message == (
        f"stopped by {cause} before it finished; resume the sweep to measure it again"
    )


def test_records_take_the_umask_like_every_other_output(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        write_result(tmp_path, RunResult(status=STATUS_OK))
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / RESULT_FILE).stat().st_mode) == 0o640


def test_an_unwritable_folder_is_refused_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    with pytest.raises(ConfigError) as refused:
        check_writable(blocker / "sweep", "hydra.sweep.dir")
    assert str(refused.value) == (
        f"hydra.sweep.dir={str(blocker / 'sweep')!r} is not allowed: "
        "a folder this process can write (Not a directory)"
    )


def test_a_resumed_record_keeps_every_other_file_in_place(tmp_path: Path) -> None:
    """The copy of `.hydra/` is taken only beside records, and only once."""
    _job(tmp_path, "0", RunResult(status=STATUS_OK), "a: 1\n")
    _job(tmp_path, "1", None, "a: 2\n")
    snapshot_job_configs(tmp_path)
    (tmp_path / "0" / JOB_CONFIG).write_text("a: 3\n")
    snapshot_job_configs(tmp_path)
    assert (tmp_path / "0" / ".hydra.of-record" / "config.yaml").read_text() == "a: 1\n"
    assert not (tmp_path / "1" / ".hydra.of-record").exists()
    shutil.rmtree(tmp_path / "0" / ".hydra.of-record")
    assert json.loads((tmp_path / "0" / RESULT_FILE).read_text())["status"] == STATUS_OK


def _take_ctrl_c() -> None:
    """A process started from a background shell inherits SIGINT ignored, and Python then keeps
    it ignored: give the sweep the default, as a terminal would."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=_take_ctrl_c,
    )


def _wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 300
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"no {path}"
        time.sleep(0.02)


@pytest.mark.slow
def test_a_sweep_through_every_fault_then_resumed_loses_nothing(tmp_path: Path) -> None:
    """Killed (SIGKILL), a damaged record, interrupted (SIGINT), a job that never resolves:
    `resume` then leaves a record for every job and an aggregate of all of them."""
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "memexp", "-m", "model=tiny", "logger=none", "measure.repeat=1",
        "measure.max_time_s=0.01", "strategy=none,sqrt", "seq.len=16,${model.maxlen}",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    # jobs: 0 none/16, 1 none/unresolvable, 2 sqrt/16, 3 sqrt/unresolvable
    killed = _start(command, tmp_path)
    _wait_for(sweep_dir / "0" / RESULT_FILE, killed)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate()

    (sweep_dir / "0" / RESULT_FILE).write_text(DAMAGED["truncated"])
    interrupted = _start([*command[:-1], f"resume={sweep_dir}"], tmp_path)
    _wait_for(sweep_dir / "2" / HYDRA_DIR, interrupted)
    os.killpg(interrupted.pid, signal.SIGINT)
    output, _ = interrupted.communicate()
    assert interrupted.returncode == 130
    assert "interrupted; summarizing what finished" in output
    assert "Traceback" not in output
    assert "is not a readable record" in output

    resumed = subprocess.run(
        [*command[:-1], f"resume={sweep_dir}"],
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "raised" not in resumed.stderr, resumed.stderr  # no callback of Hydra's failed
    assert resumed.returncode == 1  # the unresolvable jobs are errors
    statuses = {n: read_result(sweep_dir / str(n)).status for n in range(4)}
    assert statuses == {0: STATUS_OK, 1: STATUS_ERROR, 2: STATUS_OK, 3: STATUS_ERROR}
    assert (sweep_dir / "0" / "result.damaged-1.json").read_text() == DAMAGED["truncated"]
    assert "model.maxlen" in read_result(sweep_dir / "3").message
    assert "4 job(s) in" in resumed.stdout
    with (sweep_dir / "results.csv").open(newline="") as table:
        rows = list(csv.DictReader(table))
    assert [(row["job_num"], row["status"]) for row in rows] == [
        ("0", STATUS_OK),
        ("1", STATUS_ERROR),
        ("2", STATUS_OK),
        ("3", STATUS_ERROR),
    ]
    assert not list(sweep_dir.glob("*/.hydra.of-record"))


CPU_ALLOCATION_FAILURE = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"
)


def test_a_cpu_allocation_failure_is_out_of_memory(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_strategies(monkeypatch, {"none": CPU_ALLOCATION_FAILURE})
    record = runner.run_job(tiny_cfg("device=cpu"), tmp_path, {})
    assert (record.status, record.error_type) == (STATUS_OOM, "RuntimeError")
    assert "can't allocate memory" in record.message


def test_a_step_beyond_host_memory_is_refused_before_it_allocates(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(devices, "available_host_memory", lambda: 4096)
    record = runner.run_job(tiny_cfg("device=cpu"), tmp_path, {})
    assert record.status == STATUS_INFEASIBLE
    assert "more than the 0.00 MiB of host memory available" in record.message
    assert record.peak_bytes is None and record.step_ms_median is None  # nothing ran


@pytest.mark.slow
def test_the_host_memory_floor_is_below_the_measured_peak(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """A floor that exceeded a real step's peak would refuse jobs that fit."""
    for strategy in ("none", "full"):
        cfg = tiny_cfg("device=cpu", f"strategy={strategy}")
        record = runner.run_job(cfg, tmp_path / strategy, {})
        spec = validate(cfg, cuda_available=False)
        floor = analytic.step_floor_bytes(spec, record.plan, multi_tensor=False)
        assert 0 < floor <= record.peak_bytes


@pytest.mark.slow
def test_a_7b_model_on_the_cpu_is_refused_in_seconds(tmp_path: Path) -> None:
    """Its weights alone (27 GB in fp32) are more than this machine has: refused, not swapped."""
    run = subprocess.run(
        [sys.executable, "-m", "memexp", "model=seed_llama7b", "device=cpu", "logger=none",
         f"hydra.run.dir={tmp_path}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    record = read_result(tmp_path)
    assert record.status == STATUS_INFEASIBLE, run.stdout + run.stderr
    assert "host memory available" in record.message
