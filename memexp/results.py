"""The per-job record (`result.json`): one flat schema, written atomically, read back by everything else.

Every figure carries its unit in its name (`_bytes`, `_ms`, `_flops`, `_pct`) and every group of
figures says where it came from (`memory_source`, `flops_source`, `saved_source`), so a reader
never has to guess whether a number was measured, tracked, faked or derived.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from memexp.plan import CheckpointPlan
from memexp.sweepdir import RESULT_FILE

SCHEMA_VERSION = 1

# Job outcomes. Only `error` makes a sweep exit non-zero: the others are answers, not failures.
STATUS_OK = "ok"
STATUS_ERROR = "error"
STATUS_OOM = "oom"
STATUS_INFEASIBLE = "infeasible"
STATUS_NOT_APPLICABLE = "not_applicable"
# Stopped by Ctrl-C (SIGINT) or SIGTERM before it finished: `resume` measures it again.
STATUS_INTERRUPTED = "interrupted"
STATUSES = (
    STATUS_OK,
    STATUS_ERROR,
    STATUS_OOM,
    STATUS_INFEASIBLE,
    STATUS_NOT_APPLICABLE,
    STATUS_INTERRUPTED,
)
DAMAGED_SUFFIX = "damaged"


class InfeasibleError(Exception):
    """The job cannot fit its memory budget: recorded as status `infeasible`, an answer."""


class DamagedRecord(ValueError):
    """A `result.json` that cannot be read as a record (truncated, not JSON, not a record).

    A ValueError that names the file, so every reader can report it and go on to the next one.
    """

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path} is not a readable record ({reason})")


class NotApplicableError(Exception):
    """The strategy does nothing on this device (offloading to the host from the host):
    recorded as status `not_applicable` with the reason, never as a number."""


# Where memory figures come from.
SOURCE_CUDA_ALLOCATOR = "cuda_allocator"
SOURCE_TENSOR_TRACKER = "tensor_tracker"
SOURCE_FAKE_TENSORS = "fake_tensors"

# Where a peak is taken over, and the record field that holds it. The whole step includes the
# optimizer step, whose scratch (Adam's) can set the peak whatever the plan; forward, loss and
# backward are where checkpointing acts (the seed's peak).
SCOPE_STEP = "step"
SCOPE_FORWARD_BACKWARD = "forward_backward"
PEAK_FIELDS = {SCOPE_STEP: "peak_bytes", SCOPE_FORWARD_BACKWARD: "forward_backward_peak_bytes"}


@dataclass
class RunResult:
    """One job. Fields left `None` were not measured (a failed job, or a figure the device lacks)."""

    # --- identity -------------------------------------------------------------------------
    status: str
    message: str | None = None
    error_type: str | None = None
    schema_version: int = SCHEMA_VERSION
    sweep_dir: str | None = None
    job_dir: str | None = None
    job_num: int | None = None
    overrides: list[str] = field(default_factory=list)
    model: str | None = None
    strategy: str | None = None
    attention: str | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    device: str | None = None
    precision: str | None = None
    optimizer: str | None = None
    seed: int | None = None
    # How the state was spread over ranks (memexp.config.PARALLEL_MODES) and over how many; every
    # memory figure below is one rank's. Records from before the field read as `none` on 1.
    parallel: str | None = None
    world_size: int | None = None
    param_count: int | None = None

    # --- the checkpoint plan ----------------------------------------------------------------
    plan: CheckpointPlan | None = None  # stored as CheckpointPlan.to_dict()
    plan_summary: str | None = None

    # --- memory of one tracked training step ------------------------------------------------
    memory_source: str | None = None  # cuda_allocator | tensor_tracker | fake_tensors
    peak_bytes: int | None = None  # peak allocated over the whole step
    forward_backward_peak_bytes: int | None = None  # over forward, loss and backward only
    peak_reserved_bytes: int | None = None  # CUDA caching allocator only
    params_bytes: int | None = None  # breakdown at the moment of the peak
    grads_bytes: int | None = None
    optimizer_state_bytes: int | None = None
    activations_bytes: int | None = None
    temporaries_bytes: int | None = None
    other_bytes: int | None = None
    # Under parallel=zero2|fsdp (params_bytes and grads_bytes are then the rank's shards): the
    # parameters and gradients gathered whole for compute, and the all-gather and reduce-scatter
    # buffers; under ddp|zero1 communication_bytes holds DDP's gradient buckets. None: one device.
    unsharded_params_bytes: int | None = None
    unsharded_grads_bytes: int | None = None
    communication_bytes: int | None = None
    # allocated bytes at phase boundaries: after_setup, forward_peak, backward_peak,
    # optimizer_peak, after_step
    phase_bytes: dict[str, int] | None = None
    timeline_file: str | None = None  # memory over the step, next to result.json
    # Under a `parallel` mode: every rank's peak_bytes, forward_backward_peak_bytes and
    # breakdown, in rank order; the fields above are those of `peak_rank`, the fullest rank.
    rank_memory: list[dict[str, int]] | None = None
    peak_rank: int | None = None

    # --- device-independent figures ---------------------------------------------------------
    saved_activation_bytes: int | None = None  # bytes autograd keeps for backward (no params)
    saved_source: str | None = None
    flops_step: int | None = None  # one training step, recomputation included
    flops_step_no_checkpoint: int | None = None  # the same step without any checkpointing
    flops_recompute: int | None = None
    recompute_flops_pct: float | None = None
    flops_source: str | None = None
    loss_first_step: float | None = None

    # --- time (median/min/max over `time_repeats` steps after `time_warmup`) ---------------
    time_source: str | None = None
    time_warmup: int | None = None
    time_repeats: int | None = None  # steps timed: at least measure.repeat, more until stable
    time_stable: bool | None = None  # step IQR / median <= measure.stable_iqr before the cap
    time_threads: int | None = None  # PyTorch intra-op threads during the timed steps
    time_interop_threads: int | None = None
    time_cpus: int | None = None  # CPUs this process could run on (its affinity)
    time_load_before: float | None = None  # 1-minute load average before the timed steps
    time_load_after: float | None = None  # ... and after them
    forward_ms_median: float | None = None
    forward_ms_min: float | None = None
    forward_ms_max: float | None = None
    backward_ms_median: float | None = None
    backward_ms_min: float | None = None
    backward_ms_max: float | None = None
    optimizer_ms_median: float | None = None
    optimizer_ms_min: float | None = None
    optimizer_ms_max: float | None = None
    step_ms_median: float | None = None
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    step_ms_iqr: float | None = None  # interquartile range of the step times
    tokens_per_s_median: float | None = None

    # --- strategy-specific extras (e.g. the adaptive planner's budget and prediction) -------
    extra: dict[str, Any] = field(default_factory=dict)

    # --- provenance -------------------------------------------------------------------------
    environment: dict[str, Any] = field(default_factory=dict)
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for `result.json`: the plan in its own serialised form."""
        data = asdict(self)
        data["plan"] = self.plan.to_dict() if self.plan is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """Read a record, keeping unknown keys in `extra` so newer records still load."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if kwargs.get("plan") is not None:
            kwargs["plan"] = CheckpointPlan.from_dict(kwargs["plan"])
        unknown = {k: v for k, v in data.items() if k not in known}
        result = cls(**kwargs)
        result.extra.update(unknown)
        return result


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a reader sees all or nothing.

    The file gets the mode any other output gets (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(job_dir: Path, result: RunResult) -> Path:
    path = Path(job_dir) / RESULT_FILE
    write_json_atomic(path, result.to_dict())
    return path


def read_result(path: Path) -> RunResult:
    """The record at `path` (a file, or a job folder); DamagedRecord when it cannot be one."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedRecord(path, f"{type(error).__name__}: {error}") from error
    if not isinstance(data, dict) or data.get("status") not in STATUSES:
        raise DamagedRecord(path, "no known `status`")
    try:
        return RunResult.from_dict(data)
    except (TypeError, AttributeError) as error:
        raise DamagedRecord(path, str(error)) from error


def set_aside_damaged(path: Path) -> Path:
    """Rename a damaged record to `result.damaged-<n>.json` beside it (kept for a person to read),
    so that the job's folder reads as unmeasured; returns the new path."""
    path = Path(path)
    index = 1
    while (kept := path.with_name(f"{path.stem}.{DAMAGED_SUFFIX}-{index}{path.suffix}")).exists():
        index += 1
    return path.rename(kept)
