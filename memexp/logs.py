"""memexp's log lines: prefixed with the job's number in a sweep, and shown by the command-line tools.

memexp logs through `logging` (loggers under `memexp.`); Hydra configures the handlers of a job
(the console and the job's own `memexp.log`), and the command-line tools (`memexp.summarize`,
`memexp.reproduce`, ...) show theirs on stderr (`log_to_stderr`), keeping stdout for their result.

Jobs under the `parallel` launcher write to one terminal at once; `[job 3] ...` says whose line
it is. The prefix is added where a record is made (a log-record factory, installed once), so
every memexp logger and every handler (the console, the job's own `memexp.log`) see the same
line, and a handler's format is left as the user configured it.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

PACKAGE_LOGGER = "memexp"
_JOB_NUM: ContextVar[int | None] = ContextVar("memexp_job_num", default=None)


def job_prefix(job_num: int | None) -> str:
    """`[job 3] ` for job 3 of a sweep; nothing for a single run."""
    return "" if job_num is None else f"[job {job_num}] "


@functools.cache
def _install_factory() -> None:
    """Wrap the process's log-record factory once: memexp's records get the running job's prefix."""
    make_record = logging.getLogRecordFactory()

    def prefixed(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        job_num = _JOB_NUM.get()
        if job_num is not None and record.name.split(".")[0] == PACKAGE_LOGGER:
            record.msg = f"{job_prefix(job_num)}{record.msg}"
        return record

    logging.setLogRecordFactory(prefixed)


def log_to_stderr() -> None:
    """A command-line tool's messages, `[memexp] ...` on stderr, unless logging is set up already."""
    logging.basicConfig(level=logging.INFO, format="[memexp] %(message)s", stream=sys.stderr)


@contextmanager
def job_lines(job_num: int | None) -> Iterator[None]:
    """While the block runs, memexp's log lines carry `job_num`'s prefix (none for None)."""
    _install_factory()
    token = _JOB_NUM.set(job_num)
    try:
        yield
    finally:
        _JOB_NUM.reset(token)
