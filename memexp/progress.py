"""A job's progress: its phases (plan, FLOP count, build, warm-up, timed steps, memory step,
record) with the time elapsed, so a long job never looks stuck.

Every phase is one log line (`memexp.progress`), which lands in the job's own `memexp.log` and on
the console. On a terminal, the job that runs in the command's own process also shows a live
line (tqdm): the phase, the timed steps so far and the time elapsed; log lines print above it.
Jobs in worker processes (the `parallel` launcher), under CI or writing to a file get the log
lines only. The display is updated between steps, after each step's clock has stopped, and runs
no thread of its own: the measured steps pay nothing for it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from memexp.logs import job_prefix
from memexp.observe import JobObserver
from memexp.results import RunResult

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

TIMED_STEPS = "timed steps"


def wants_live_display(stream: TextIO) -> bool:
    """A terminal, not CI, and this process is the command's own (no other job shares it)."""
    return (
        stream.isatty()
        and not os.environ.get("CI")
        and multiprocessing.current_process().name == "MainProcess"
    )


class PhaseProgress(JobObserver):
    """Logs each phase as it begins with the job's elapsed seconds, and the timed steps' count
    when they end; `bar` (a tqdm bar, or None) shows the same live."""

    def __init__(self, job_num: int | None = None, bar: tqdm | None = None) -> None:
        self.job_num = job_num
        self.bar = bar
        self.started = time.monotonic()
        self.phase: str | None = None
        self.phase_started = self.started
        self.steps = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def on_phase(self, phase: str) -> None:
        self._end_phase()
        self.phase, self.phase_started, self.steps = phase, time.monotonic(), 0
        log.info("%s (%.1f s elapsed)", phase, self.elapsed())
        if self.bar is not None:
            self.bar.set_description_str(f"{job_prefix(self.job_num)}{phase}", refresh=False)
            self.bar.reset()

    def on_step(self, phase_ms: Mapping[str, float], allocated_bytes: int | None) -> None:
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)

    def on_finish(self, result: RunResult, job_dir: Path) -> None:
        self._end_phase()
        self.phase = None
        log.info("%s after %.1f s", result.status, self.elapsed())

    def _end_phase(self) -> None:
        if self.phase == TIMED_STEPS:
            seconds = time.monotonic() - self.phase_started
            log.info("%s: %d in %.1f s", TIMED_STEPS, self.steps, seconds)


@contextmanager
def showing_progress(job_num: int | None, stream: TextIO | None = None) -> Iterator[PhaseProgress]:
    """A job's progress observer; live on `stream` (stderr) when `wants_live_display` says so."""
    stream = stream if stream is not None else sys.stderr
    with ExitStack() as stack:
        bar = None
        if wants_live_display(stream):
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            tqdm.monitor_interval = 0  # no monitor thread beside the measured steps
            bar = stack.enter_context(
                tqdm(
                    file=stream,
                    leave=False,
                    bar_format="{desc}: {n_fmt} step(s) {elapsed}",
                    mininterval=0.5,
                )
            )
            stack.enter_context(logging_redirect_tqdm())
        yield PhaseProgress(job_num, bar)
