"""What a job reports while it runs, to whoever listens: the seam between measuring and mirroring.

Measurement calls `current_observer()` and never knows who listens; the job's guard installs a
listener (`observing`) around the job, e.g. the W&B run of `memexp.wandb_sink`. The default
observer does nothing, so a job with `logger=none` pays one empty call per timed step and no
import of any tracker.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from memexp.results import RunResult


class JobObserver:
    """Hears a job as it happens; every method does nothing unless a subclass listens."""

    def on_phase(self, phase: str) -> None:
        """The job enters `phase` (`plan`, `build`, `warm-up`, `timed steps`, ...); never
        called inside a timed step."""

    def on_step(self, phase_ms: Mapping[str, float], allocated_bytes: int | None) -> None:
        """One timed step: milliseconds per phase (`forward`, ..., `step`) and the bytes allocated
        after it where the device's allocator says (None where it keeps no count)."""

    def on_finish(self, result: RunResult, job_dir: Path) -> None:
        """The job's record, written to `job_dir`: the last thing the observer hears."""


class Observers(JobObserver):
    """Several observers hearing one job, in the order given (e.g. the progress display and
    the W&B run)."""

    def __init__(self, *observers: JobObserver) -> None:
        self.observers = observers

    def on_phase(self, phase: str) -> None:
        for observer in self.observers:
            observer.on_phase(phase)

    def on_step(self, phase_ms: Mapping[str, float], allocated_bytes: int | None) -> None:
        for observer in self.observers:
            observer.on_step(phase_ms, allocated_bytes)

    def on_finish(self, result: RunResult, job_dir: Path) -> None:
        for observer in self.observers:
            observer.on_finish(result, job_dir)


NO_OBSERVER = JobObserver()
_CURRENT: ContextVar[JobObserver] = ContextVar("memexp_job_observer", default=NO_OBSERVER)


def enter_phase(phase: str) -> None:
    """Tell the job's observer that the job enters `phase`."""
    _CURRENT.get().on_phase(phase)


def current_observer() -> JobObserver:
    """The observer of the job running now (`NO_OBSERVER` outside `observing`)."""
    return _CURRENT.get()


@contextmanager
def observing(observer: JobObserver) -> Iterator[JobObserver]:
    """Make `observer` the one measurement reports to while the block runs."""
    token = _CURRENT.set(observer)
    try:
        yield observer
    finally:
        _CURRENT.reset(token)
