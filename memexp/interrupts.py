"""Ctrl-C and SIGTERM stop a sweep the same way: as a KeyboardInterrupt that the runner records.

The running job's record says `interrupted` and why; the end table and the aggregate still cover
what finished; the process exits with INTERRUPTED_EXIT_CODE (128 + SIGINT, as a shell reports it).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so it unwinds exactly like Ctrl-C."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signal.Signals(signum).name)


def stop_on_sigterm() -> None:
    """Turn SIGTERM into Terminated (a KeyboardInterrupt) in this process.

    Only the main thread may set signal handlers; elsewhere the default (end at once) stays.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def describe_interrupt(interrupt: KeyboardInterrupt) -> str:
    """The record's message: which signal stopped the job, and what to do about it."""
    cause = "SIGTERM" if isinstance(interrupt, Terminated) else "Ctrl-C (SIGINT)"
    return f"stopped by {cause} before it finished; resume the sweep to measure it again"
