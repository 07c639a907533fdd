"""A job's progress: its phases as log lines (with its number in a sweep), live on a terminal.

The log lines are what a job's `memexp.log` and a CI log hold; the live line is tqdm's, on a
terminal only, counting the timed steps it is told of after their clocks stopped.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from memexp import job
from memexp.progress import TIMED_STEPS, PhaseProgress, showing_progress, wants_live_display
from memexp.results import STATUS_OK, RunResult
from memexp.sweepdir import RESULT_FILE

JOB_PHASES = ["plan", "count FLOPs", "build", "warm-up", TIMED_STEPS, "memory step", "record"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def phase_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "memexp.progress"]


@pytest.mark.slow
def test_a_sweeps_job_logs_each_phase_in_order_under_its_number(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="memexp")
    identity = {"sweep_dir": str(tmp_path), "job_num": 3, "overrides": []}
    result = job.run_guarded(tiny_cfg("measure.repeat=2"), tmp_path / "3", identity, tmp_path)
    assert result is not None and result.status == STATUS_OK
    lines = phase_lines(caplog)
    assert all(line.startswith("[job 3] ") for line in lines)
    entered = [
        line.removeprefix("[job 3] ").split(" (")[0] for line in lines if " elapsed)" in line
    ]
    assert entered == JOB_PHASES
    assert f"[job 3] {TIMED_STEPS}: {result.time_repeats} in " in "\n".join(lines)
    assert lines[-1].startswith("[job 3] ok after ")
    outcome = [r.getMessage() for r in caplog.records if r.name == "memexp.runner"][-1]
    assert outcome.startswith("[job 3] step peak ")


@pytest.mark.slow
def test_a_single_run_has_no_job_prefix(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="memexp")
    identity = {"sweep_dir": None, "job_num": None, "overrides": []}
    job.run_guarded(tiny_cfg("model.heads=5"), tmp_path, identity, tmp_path)  # fails at once
    lines = phase_lines(caplog)
    assert len(lines) == 2
    assert lines[0].startswith("record (") and lines[1].startswith("error after ")


def test_the_live_line_counts_timed_steps_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    terminal = Terminal()
    with showing_progress(2, terminal) as progress:
        assert progress.bar is not None
        progress.on_phase(TIMED_STEPS)
        for _ in range(3):
            progress.on_step({"step": 1.0}, None)
        assert progress.bar.n == 3
        progress.bar.refresh()
        assert "[job 2] timed steps: 3 step(s)" in terminal.getvalue()
        progress.on_phase("memory step")
        assert progress.bar.n == 0  # counted per phase
        progress.on_finish(RunResult(status=STATUS_OK), Path("."))


def test_no_live_line_off_a_terminal_or_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert not wants_live_display(io.StringIO())
    assert wants_live_display(Terminal())
    monkeypatch.setenv("CI", "true")
    assert not wants_live_display(Terminal())
    with showing_progress(None, Terminal()) as progress:
        assert progress.bar is None


def test_timed_steps_are_counted_when_they_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="memexp")
    progress = PhaseProgress()
    progress.on_phase(TIMED_STEPS)
    for _ in range(5):
        progress.on_step({"step": 1.0}, None)
    progress.on_phase("memory step")
    assert any(line.startswith(f"{TIMED_STEPS}: 5 in ") for line in phase_lines(caplog))


@pytest.mark.slow
def test_a_jobs_log_file_holds_its_lines(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "memexp", "model=tiny", "logger=none", "measure.repeat=1",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    finished = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert (run_dir / RESULT_FILE).is_file()
    log_text = (run_dir / "memexp.log").read_text()
    for phase in JOB_PHASES:
        assert f"[memexp.progress][INFO] - {phase} (" in log_text
    assert "[memexp.runner][INFO] - step peak " in log_text
    assert "[memexp.runner][INFO] - step peak " in finished.stdout  # and on the console
