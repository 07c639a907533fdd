"""A workload's strategy-independent figures, computed once per sweep and reused by its later jobs.

The FLOPs of a step with nothing recomputed and the adaptive planner's profile depend on the
workload (model, sequence, batch, device, precision, optimizer), never on the strategy, yet every
job of a sweep over strategies used to compute them again, on fake tensors, for seconds. The job's
guard names the sweep folder (`caching_in`); `cached` then keeps each figure in
`<sweep>/cache/<figure>-<key>.json` (memexp.sweepdir).

Never wrong: the key hashes the whole validated job less its strategy and its timing settings,
plus the torch version and memexp's own source, so any change that could change a figure misses.
Safe under parallel jobs: a file is written whole or not at all (`write_json_atomic`); two jobs
that miss together compute the same value and the second rename wins; a file that does not read
is a miss. Outside a sweep (a single run, a test) nothing is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from memexp.config import ExperimentSpec
from memexp.results import write_json_atomic
from memexp.sweepdir import cache_file

T = TypeVar("T")
_FOLDER: ContextVar[Path | None] = ContextVar("memexp_cache_folder", default=None)
PACKAGE_ROOT = Path(__file__).resolve().parent


@functools.cache
def code_fingerprint() -> str:
    """A digest of memexp's own source and the torch version: what computes the figures."""
    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def workload_key(spec: ExperimentSpec) -> str:
    """Every field of the job except its strategy and timing settings, and `code_fingerprint`."""
    fields = dataclasses.asdict(dataclasses.replace(spec, strategy=None, measure=None))
    text = json.dumps([fields, code_fingerprint()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@contextmanager
def caching_in(sweep_dir: Path | None) -> Iterator[None]:
    """While the block runs, `cached` keeps figures in `sweep_dir` (nothing when None)."""
    token = _FOLDER.set(Path(sweep_dir) if sweep_dir is not None else None)
    try:
        yield
    finally:
        _FOLDER.reset(token)


def cached(
    figure: str,
    spec: ExperimentSpec,
    compute: Callable[[], T],
    encode: Callable[[T], Any] = lambda value: value,
    decode: Callable[[Any], T] = lambda data: data,
) -> T:
    """`compute()`, or the value an earlier job of the sweep computed for this workload.

    `encode` turns the value into JSON data and `decode` back (the identity for plain numbers).
    """
    folder = _FOLDER.get()
    if folder is None:
        return compute()
    path = cache_file(folder, figure, workload_key(spec))
    try:
        return decode(json.loads(path.read_text())["value"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # absent, or unreadable: computed again and rewritten
    value = compute()
    write_json_atomic(path, {"figure": figure, "value": encode(value)})
    return value
