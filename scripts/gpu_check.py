"""One command that exercises every CUDA path of memexp on a GPU and writes down what it saw.

    python scripts/gpu_check.py                      # writes scripts/results/gpu_check.md
    python scripts/gpu_check.py --out /tmp/gpu_check.md --work-dir /tmp/gpu_check
    python scripts/gpu_check.py --render-from outputs/gpu_check/<run>/check_run.json   # no GPU

Everything runs through memexp's own command line (`python -m memexp -m ...`, `logger=none`)
as a few multiruns side by side, each with a time limit so the whole stays under 8 minutes;
the report is built from the jobs' `result.json` records alone. What is checked:

* the allocator's memory step: every strategy on small and medium, fp32 and bf16, on
  `device=cuda` (allocated per phase and reserved, `memory_source: cuda_allocator`);
* offload with pinned host memory: `strategy=offload` must be `ok` on a GPU and its forward
  peak below `none`'s;
* the out-of-memory back-off of `batch=auto`: a budget a little above the memory the card has
  free (`torch.cuda.mem_get_info`; the allocator's peaks at batch 1 and 2 say how many samples
  fit, the budget lets the prediction pick two more), so the predicted batch does not fit and
  the job steps down (`extra.auto_batch_backoffs` > 0);
* adaptive re-planning on allocator peaks: budgets set from the fake device's predictions of
  `none` and `full`, which the allocator's real peaks overshoot (`extra.adaptive.rounds`;
  measured peak within budget, or an honest `infeasible`);
* the fake device's prediction error: the same grid on `device=fake` (`device.imagine=cuda`)
  against the allocator, per job, in MiB and %.

Jobs of one sweep share a process (Hydra's basic launcher; memexp empties the CUDA cache
between jobs), and sweeps share the GPU: allocator figures are per process and stay exact, step
times do not, so none are reported.

Exit status: 0 every check passed; 1 some check failed or was not exercised (the report says
which and why); 3 nothing was checked (no CUDA device, or a torch that cannot use it), said in
one line before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memexp.results import (  # noqa: E402  (light: no torch)
    SOURCE_CUDA_ALLOCATOR,
    STATUS_INFEASIBLE,
    STATUS_OK,
    RunResult,
    read_result,
    write_json_atomic,
)
from memexp.sweepdir import result_files_in  # noqa: E402
from memexp.text import GIB, MIB, MISSING, format_mib, markdown_table  # noqa: E402

EXIT_CHECK_FAILED = 1
EXIT_NOTHING_CHECKED = 3
DEFAULT_OUT = ROOT / "scripts" / "results" / "gpu_check.md"
OUTPUTS = ROOT / "outputs" / "gpu_check"
RUN_FILE = "check_run.json"  # the whole run beside its sweeps (`--render-from` draws it again)

MODELS = ("small", "medium")
PRECISIONS = ("fp32", "bf16")
STRATEGIES = ("none", "full", "sqrt", "selective", "every_n", "op", "offload", "adaptive")
Key = tuple[str, str, str]  # (model, precision, strategy)
GRID: tuple[Key, ...] = tuple((m, p, s) for m in MODELS for p in PRECISIONS for s in STRATEGIES)
MEASURED_ON = "device=cuda"  # every measured job's device
# Every job: no W&B, one timed step (times are not reported: sweeps share the GPU).
COMMON = ("logger=none", "measure.repeat=1")

# batch=auto: a workload whose samples are large (naive attention at seq 2048 keeps b·a·s²
# floats per layer), so a batch a few samples too big is a few back-offs, not dozens; already
# at batch 1 its peak is in the backward pass (1.7 GiB predicted, Adam's step 0.6 GiB), so the
# peaks at batch 1 and 2 lie on the line that extrapolates to a full card.
AUTO_WORKLOAD = ("model=small", "seq.len=2048", "strategy=none", "precision=fp32")
AUTO_OVERSHOOT = 2  # samples more than fit that the budget lets batch=auto predict
AUTO_FALLBACK_MARGIN = 2 * GIB  # above the free memory when the batch line is unknown

# Seconds after the start by which each stage must have ended (its sweeps are stopped then);
# with the probes before and a stopped sweep's grace period after, the report is written
# well inside the 8 minutes the whole may take.
PREDICTED_BY_S = 240  # the fake grid and the batch=auto probes (batch 1 and 2)
MEASURED_BY_S = 330  # the CUDA grid and the adaptive sweeps
AUTO_BY_S = 430  # the batch=auto back-off, alone on the GPU
PROBE_TIMEOUT_S = 120
STOP_GRACE_S = 10
LOG_TAIL_LINES = 15

# Sweep roles: which check a sweep's records feed.
MEASURED, PREDICTED, ADAPTIVE, AUTO_PROBE, AUTO = (
    "measured",
    "predicted",
    "adaptive",
    "auto_probe",
    "auto",
)
PASS, FAIL, NOT_EXERCISED = "pass", "FAIL", "not exercised"
NO_RECORD = "no record"
# A record field that may be newer than this checkout's schema: shown where a record has it.
FORWARD_BACKWARD_PEAK = "forward_backward_peak_bytes"

UNITS_AND_SOURCES = (
    "Units: MiB = 2^20 bytes, GiB = 2^30 bytes. Sources: **CUDA allocator** = "
    "`torch.cuda.max_memory_allocated` / `max_memory_reserved` over each phase of the job's "
    "memory step (`memory_source: cuda_allocator`); **fake tensors** = the same step on fake "
    "tensors under the tensor tracker (`device=fake`, `device.imagine=cuda`, "
    "`memory_source: fake_tensors`). Errors are predicted − measured, in MiB and in % of measured."
)


# --- is there a GPU at all ------------------------------------------------------------------


def cuda_driver_problem() -> str | None:
    """Why this machine cannot run CUDA, asked of the driver without importing torch; None when
    a device answers (torch is then asked too, by `probe_cuda`)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver here (libcuda.so.1 cannot be loaded)"
    status = driver.cuInit(0)
    if status != 0:
        return f"the CUDA driver finds no usable device (cuInit error {status})"
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return "the CUDA driver sees no device"
    return None


PROBE_CODE = """
import json, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available()}
if info["available"]:
    free, total = torch.cuda.mem_get_info()
    info.update(device_name=torch.cuda.get_device_name(), free_bytes=free, total_bytes=total)
print(json.dumps(info))
"""


class NoCudaError(Exception):
    """torch cannot use a GPU here: nothing can be checked."""


def probe_cuda() -> dict[str, Any]:
    """torch's view of the GPU, from a short child process: this process never holds a CUDA
    context, so the memory it reports free is what a job started next will find."""
    try:
        child = subprocess.run(
            [sys.executable, "-c", PROBE_CODE],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as error:
        raise NoCudaError(f"asking torch about the GPU took over {PROBE_TIMEOUT_S} s") from error
    lines = child.stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise NoCudaError(f"asking torch about the GPU failed: {last}")
    info = json.loads(lines[-1])
    if not info["available"]:
        raise NoCudaError(
            f"torch {info['torch']} sees no CUDA device (built for CUDA: {info['cuda'] or 'no'})"
        )
    return info


# --- sweeps: memexp's command line, run side by side under time limits -------------------------


@dataclass
class Sweep:
    """One multirun, what it was for, and how it ended."""

    name: str  # also its folder's name under the work folder
    role: str  # MEASURED | PREDICTED | ADAPTIVE | AUTO_PROBE | AUTO
    overrides: list[str]
    expected_jobs: int
    folder: Path
    note: str = ""  # how its settings were chosen, for the report
    deadline_s: float | None = None  # seconds after the check's start it had to end by
    wall_s: float | None = None
    returncode: int | None = None
    stopped: bool = False  # still running at its deadline, and stopped
    log_tail: str = ""
    records: list[RunResult] = field(default_factory=list)

    @property
    def command(self) -> str:
        """As typed in the project's root (where it runs): the folder relative to it if inside."""
        folder = self.folder.relative_to(ROOT) if self.folder.is_relative_to(ROOT) else self.folder
        return shlex.join(
            ["python", "-m", "memexp", "-m", *self.overrides, f"hydra.sweep.dir={folder}"]
        )

    @property
    def dir_override(self) -> str:
        return f"hydra.sweep.dir={self.folder}"

    @property
    def outcome(self) -> str:
        if self.stopped:
            return f"stopped at its limit ({self.deadline_s:.0f} s after the start)"
        return "not run" if self.returncode is None else f"exit {self.returncode}"


@dataclass
class Running:
    sweep: Sweep
    process: subprocess.Popen[bytes]
    started: float
    deadline: float
    log: IO[str]


def launch(sweep: Sweep, check_started: float, deadline_s: float) -> Running:
    """Start the sweep in its own process group (so a stop ends its children too)."""
    sweep.deadline_s = deadline_s
    sweep.folder.parent.mkdir(parents=True, exist_ok=True)
    log = (sweep.folder.parent / f"{sweep.name}.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "memexp", "-m", *sweep.overrides, sweep.dir_override],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    print(f"[gpu_check] started {sweep.name}: {sweep.command}", flush=True)
    return Running(sweep, process, time.monotonic(), check_started + deadline_s, log)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the sweep's process group, SIGKILL if it is still there after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=STOP_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    text = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(line[:300] for line in text[-lines:])


def finish(running: Running) -> Sweep:
    """Wait for the sweep until its deadline (then stop it) and read the records it left."""
    sweep = running.sweep
    try:
        sweep.returncode = running.process.wait(
            timeout=max(0.0, running.deadline - time.monotonic())
        )
    except subprocess.TimeoutExpired:
        sweep.stopped = True
        stop(running.process)
    sweep.wall_s = time.monotonic() - running.started
    running.log.close()
    sweep.log_tail = log_tail(Path(running.log.name))
    sweep.records = [read_result(path) for path in result_files_in(sweep.folder)]
    print(
        f"[gpu_check] {sweep.name}: {sweep.outcome} after {sweep.wall_s:.0f} s, "
        f"{len(sweep.records)}/{sweep.expected_jobs} record(s)",
        flush=True,
    )
    return sweep


def grid_sweeps(role: str, work: Path, device: list[str]) -> list[Sweep]:
    """The whole grid as one sweep per model and precision: four processes side by side."""
    return [
        Sweep(
            name=f"{role}-{model}-{precision}",
            role=role,
            overrides=[
                f"model={model}",
                f"precision={precision}",
                "strategy=" + ",".join(STRATEGIES),
                *device,
                *COMMON,
            ],
            expected_jobs=len(STRATEGIES),
            folder=work / f"{role}-{model}-{precision}",
        )
        for model in MODELS
        for precision in PRECISIONS
    ]


def adaptive_sweeps(predicted: Iterable[RunResult], work: Path) -> tuple[list[Sweep], list[str]]:
    """Per model (fp32): budgets midway between the predicted peaks of `full` and `none`, and at
    `full`'s. Real allocator peaks run above fake-tensor predictions (rounding, workspaces), so
    the first plan tends to overshoot and the planner must tighten. Returns (sweeps, notes on
    models left out)."""
    peaks = {
        (r.model, r.strategy): r.peak_bytes
        for r in predicted
        if r.status == STATUS_OK and r.precision == "fp32" and r.peak_bytes is not None
    }
    sweeps, notes = [], []
    for model in MODELS:
        none, full = peaks.get((model, "none")), peaks.get((model, "full"))
        if none is None or full is None:
            notes.append(
                f"adaptive on {model} not run: no fake-tensor prediction of `none` and `full` "
                "(fp32) to set its budgets from"
            )
            continue
        budgets = sorted({round((none + full) / 2 / MIB, 1), round(full / MIB, 1)})
        sweeps.append(
            Sweep(
                name=f"adaptive-{model}",
                role=ADAPTIVE,
                overrides=[
                    f"model={model}",
                    "precision=fp32",
                    "strategy=adaptive",
                    "strategy.budget_mb=" + ",".join(f"{b:.1f}" for b in budgets),
                    MEASURED_ON,
                    *COMMON,
                ],
                expected_jobs=len(budgets),
                folder=work / f"adaptive-{model}",
                note=(
                    f"{model}: budgets {', '.join(f'{b:,.1f}' for b in budgets)} MiB = midway "
                    f"between and at the predicted peaks of `full` ({mib(full)} MiB) "
                    f"and `none` ({mib(none)} MiB), fake tensors, fp32"
                ),
            )
        )
    return sweeps, notes


def auto_probe_sweep(work: Path, device: str) -> Sweep:
    """The batch=auto workload at batch 1 and 2 on `device` (an override): a line through them
    says what one more sample costs there."""
    name = f"auto-probe-{device.removeprefix('device=')}"
    return Sweep(
        name=name,
        role=AUTO_PROBE,
        overrides=[*AUTO_WORKLOAD, "batch.size=1,2", device, *COMMON],
        expected_jobs=2,
        folder=work / name,
    )


@dataclass(frozen=True)
class Line:
    """A step's peak against its batch size: `fixed + batch × per_sample` bytes."""

    fixed: int
    per_sample: int

    def at(self, batch: int) -> int:
        return self.fixed + batch * self.per_sample


def batch_line(records: Iterable[RunResult]) -> Line | None:
    """The line through the peaks at batch 1 and 2; None without both (or if they do not grow)."""
    peaks = {r.batch_size: r.peak_bytes for r in records if is_ok(r)}
    if peaks.get(1) is None or peaks.get(2) is None or peaks[2] <= peaks[1]:
        return None
    per_sample = peaks[2] - peaks[1]
    return Line(peaks[1] - per_sample, per_sample)


def auto_sweep(free_bytes: int, measured: Line | None, predicted: Line | None, work: Path) -> Sweep:
    """batch=auto with a budget whose predicted batch is `AUTO_OVERSHOOT` samples more than the
    allocator's line says fit in the free memory: the job must step down a few times (its own
    CUDA context and fragmentation may add a step or two). The allocator's line, not the
    prediction, decides what fits, so an error in the prediction cannot make the batch fit."""
    free = f"{free_bytes / GIB:,.3f} GiB free (`torch.cuda.mem_get_info`, separate process)"
    if measured is None or predicted is None:
        budget = free_bytes + AUTO_FALLBACK_MARGIN
        why = f"{free} + {AUTO_FALLBACK_MARGIN / GIB:g} GiB (no line through batch 1 and 2)"
    else:
        fits = max(1, (free_bytes - measured.fixed) // measured.per_sample)
        target = fits + AUTO_OVERSHOOT
        budget = predicted.at(target) + predicted.per_sample // 2
        why = (
            f"{free}; CUDA allocator at batch 1 and 2: {mib(measured.fixed)} MiB + batch × "
            f"{mib(measured.per_sample)} MiB, so about {fits} samples fit; the budget is the "
            f"predicted peak (fake tensors: {mib(predicted.fixed)} MiB + batch × "
            f"{mib(predicted.per_sample)} MiB) at batch {target} plus half a sample, so batch=auto "
            f"should pick {target} and step down about {AUTO_OVERSHOOT} times"
        )
    return Sweep(
        name="auto",
        role=AUTO,
        overrides=[
            *AUTO_WORKLOAD,
            "batch=auto",
            f"batch.budget_gb={budget / GIB:.6f}",
            MEASURED_ON,
            *COMMON,
        ],
        expected_jobs=1,
        folder=work / "auto",
        note=f"budget {budget / GIB:,.3f} GiB: {why}",
    )


# --- the report: a pure function of records ---------------------------------------------------


@dataclass
class CheckRun:
    """Everything the report says: the sweeps with their records, and the run around them."""

    command: str
    started_at: str  # e.g. "2026-12-02 10:00 UTC"
    wall_s: float
    device: dict[str, Any]  # probe_cuda() at the start
    sweeps: list[Sweep]
    notes: list[str] = field(default_factory=list)

    def records(self, role: str) -> list[RunResult]:
        return [r for sweep in self.sweeps if sweep.role == role for r in sweep.records]

    def sweeps_of(self, role: str) -> list[Sweep]:
        return [sweep for sweep in self.sweeps if sweep.role == role]


@dataclass(frozen=True)
class Verdict:
    check: str
    outcome: str  # PASS | FAIL | NOT_EXERCISED
    detail: str


def by_key(records: Iterable[RunResult]) -> dict[Key, RunResult]:
    return {(r.model, r.precision, r.strategy): r for r in records}  # type: ignore[misc]


def optional_figure(record: RunResult, name: str) -> Any:
    """A figure newer records carry (e.g. `forward_backward_peak_bytes`): the attribute once the
    schema has it, else the value `RunResult.from_dict` kept in `extra`."""
    value = getattr(record, name, None)
    return value if value is not None else record.extra.get(name)


def status_of(record: RunResult | None) -> str:
    return NO_RECORD if record is None else record.status


def is_ok(record: RunResult | None) -> bool:
    return record is not None and record.status == STATUS_OK and record.peak_bytes is not None


def peak_phase(record: RunResult) -> str:
    """The phase whose peak is the step's peak (`forward`, `backward`, `optimizer`)."""
    peaks = {k: v for k, v in (record.phase_bytes or {}).items() if k.endswith("_peak")}
    return max(peaks, key=peaks.__getitem__).removesuffix("_peak") if peaks else MISSING


def mib(count: int | None) -> str:
    """A MiB cell; a figure that is not there reads as every other missing cell."""
    return MISSING if count is None else format_mib(count)


def problems_text(problems: list[str], shown: int = 4) -> str:
    """The first few problems, then how many more the tables show."""
    more = f"; and {len(problems) - shown} more (see the tables)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more


def signed_mib(count: int) -> str:
    return f"{count / MIB:+,.1f}"


def error_pct(predicted: int, measured: int) -> float:
    return 100.0 * (predicted - measured) / measured


def label(key: Key) -> str:
    return " ".join(key)


def allocator_verdict(run: CheckRun) -> Verdict:
    measured = by_key(run.records(MEASURED))
    problems = []
    for key in GRID:
        record = measured.get(key)
        if not is_ok(record):
            problems.append(f"{label(key)}: {status_of(record)}")
        elif record.memory_source != SOURCE_CUDA_ALLOCATOR:
            problems.append(f"{label(key)}: memory_source {record.memory_source}")
        elif not record.phase_bytes or record.peak_reserved_bytes is None:
            problems.append(f"{label(key)}: no per-phase or reserved figures")
        elif record.peak_reserved_bytes < record.peak_bytes:
            problems.append(f"{label(key)}: reserved below allocated")
    if problems:
        return Verdict("allocator memory step", FAIL, problems_text(problems))
    return Verdict(
        "allocator memory step",
        PASS,
        f"{len(GRID)}/{len(GRID)} jobs ok with `cuda_allocator` figures per phase, reserved ≥ allocated",
    )


def offload_rows(run: CheckRun) -> list[tuple[Key, RunResult | None, RunResult | None]]:
    measured = by_key(run.records(MEASURED))
    return [
        ((m, p, "offload"), measured.get((m, p, "none")), measured.get((m, p, "offload")))
        for m in MODELS
        for p in PRECISIONS
    ]


def forward_peak(record: RunResult) -> int | None:
    return (record.phase_bytes or {}).get("forward_peak")


def offload_verdict(run: CheckRun) -> Verdict:
    problems = []
    for key, none, offload in offload_rows(run):
        if not is_ok(offload) or not is_ok(none):
            problems.append(f"{label(key)}: {status_of(offload)} (none: {status_of(none)})")
        elif None in (forward_peak(offload), forward_peak(none)):
            problems.append(f"{label(key)}: no forward peak")
        elif forward_peak(offload) >= forward_peak(none):
            problems.append(f"{label(key)}: forward peak not below none's")
    if problems:
        return Verdict("offload (pinned host memory)", FAIL, problems_text(problems))
    return Verdict(
        "offload (pinned host memory)",
        PASS,
        "ok on every model and precision; forward peak below `none`'s each time",
    )


def backoffs(record: RunResult) -> int:
    return int(record.extra.get("auto_batch_backoffs", 0))


def auto_verdict(run: CheckRun) -> Verdict:
    records = run.records(AUTO)
    if not records:
        return Verdict(
            "batch=auto out-of-memory back-off", FAIL, "no record (see Notes and Sweeps)"
        )
    record = records[0]
    if record.status != STATUS_OK:
        return Verdict(
            "batch=auto out-of-memory back-off", FAIL, f"{record.status}: {record.message}"
        )
    if backoffs(record) == 0:
        return Verdict(
            "batch=auto out-of-memory back-off",
            NOT_EXERCISED,
            f"the predicted batch {record.batch_size} fit: no back-off was needed",
        )
    return Verdict(
        "batch=auto out-of-memory back-off",
        PASS,
        f"predicted batch {record.extra.get('auto_batch_size')}, {backoffs(record)} back-off(s), "
        f"ran at batch {record.batch_size}",
    )


def adaptive_rounds(record: RunResult) -> list[dict[str, Any]]:
    return list((record.extra.get("adaptive") or {}).get("rounds") or [])


def adaptive_budget(record: RunResult) -> int | None:
    return (record.extra.get("adaptive") or {}).get("budget_bytes")


def replanned(record: RunResult) -> bool:
    """Planned again after a measured peak: a second plan, or an `infeasible` that came after a
    measured plan (its tightened budget had no plan left, or the rounds ran out)."""
    rounds = adaptive_rounds(record)
    return len(rounds) > 1 or (record.status == STATUS_INFEASIBLE and len(rounds) >= 1)


def adaptive_verdict(run: CheckRun) -> Verdict:
    records = run.records(ADAPTIVE)
    expected = sum(sweep.expected_jobs for sweep in run.sweeps_of(ADAPTIVE))
    problems = [] if records else ["no record (see Notes and Sweeps)"]
    if len(records) < expected:
        problems.append(f"{expected - len(records)} job(s) without a record")
    for r in records:
        budget = adaptive_budget(r)
        if r.status == STATUS_OK:
            if budget is None or r.peak_bytes is None or r.peak_bytes > budget:
                problems.append(f"{r.model} budget {mib(budget)} MiB: ok but over budget")
        elif r.status != STATUS_INFEASIBLE:
            problems.append(f"{r.model} budget {mib(budget)} MiB: {r.status}: {r.message}")
    if problems:
        return Verdict("adaptive re-planning", FAIL, problems_text(problems))
    again = sum(map(replanned, records))
    honest = f"{len(records)} job(s): each within its budget or `infeasible`"
    if not again:
        return Verdict(
            "adaptive re-planning", NOT_EXERCISED, f"{honest}, but none needed a second plan"
        )
    return Verdict("adaptive re-planning", PASS, f"{honest}; {again} planned again")


def prediction_pairs(run: CheckRun) -> list[tuple[Key, RunResult | None, RunResult | None]]:
    measured, predicted = by_key(run.records(MEASURED)), by_key(run.records(PREDICTED))
    return [(key, measured.get(key), predicted.get(key)) for key in GRID]


def prediction_verdict(run: CheckRun) -> Verdict:
    pairs = prediction_pairs(run)
    errors = [error_pct(p.peak_bytes, m.peak_bytes) for _, m, p in pairs if is_ok(m) and is_ok(p)]
    missing = len(pairs) - len(errors)
    if missing or not errors:
        return Verdict(
            "fake-device prediction", FAIL, f"{missing}/{len(pairs)} pairs lack an ok record"
        )
    return Verdict(
        "fake-device prediction",
        PASS,
        f"{len(errors)}/{len(pairs)} pairs; peak error {min(errors):+.2f} % to {max(errors):+.2f} %",
    )


VERDICTS: tuple[Callable[[CheckRun], Verdict], ...] = (
    allocator_verdict,
    offload_verdict,
    auto_verdict,
    adaptive_verdict,
    prediction_verdict,
)


def verdicts(run: CheckRun) -> list[Verdict]:
    return [verdict(run) for verdict in VERDICTS]


def phase_keys(records: Iterable[RunResult]) -> list[str]:
    """Every phase any record names, in the order first seen (new phases show up by themselves)."""
    keys: dict[str, None] = {}
    for record in records:
        keys.update(dict.fromkeys(record.phase_bytes or {}))
    return list(keys)


def allocator_section(run: CheckRun) -> list[str]:
    measured = by_key(run.records(MEASURED))
    phases = phase_keys(measured.values())
    with_fb = any(optional_figure(r, FORWARD_BACKWARD_PEAK) is not None for r in measured.values())
    headers = [
        "model",
        "precision",
        "strategy",
        "status",
        *(f"{phase} MiB" for phase in phases),
        *(["fwd+bwd peak MiB"] if with_fb else []),
        "peak allocated MiB",
        "peak reserved MiB",
        "memory_source",
    ]
    rows = []
    for key in GRID:
        record = measured.get(key)
        if record is None:
            rows.append([*key, NO_RECORD, *[MISSING] * (len(headers) - 4)])
            continue
        phase_bytes = record.phase_bytes or {}
        rows.append(
            [
                *key,
                record.status,
                *(mib(phase_bytes.get(phase)) for phase in phases),
                *([mib(optional_figure(record, FORWARD_BACKWARD_PEAK))] if with_fb else []),
                mib(record.peak_bytes),
                mib(record.peak_reserved_bytes),
                record.memory_source or MISSING,
            ]
        )
    return [
        "## Allocator memory step per phase (CUDA allocator)",
        "",
        "`device=cuda`, Adam, the model's own sequence and batch. `after_setup` and "
        "`after_step`: allocated at those moments; `*_peak`: the phase's peak allocated; "
        "reserved: the caching allocator's peak over the step. MiB, CUDA allocator.",
        "",
        markdown_table(headers, rows),
        "",
    ]


def offload_section(run: CheckRun) -> list[str]:
    headers = [
        "model",
        "precision",
        "offload status",
        "none: step peak MiB",
        "offload: step peak MiB",
        "none: forward peak MiB",
        "offload: forward peak MiB",
        "forward peak saved MiB",
        "saved %",
    ]
    rows = []
    for (model, precision, _), none, offload in offload_rows(run):
        saved = pct = MISSING
        if (
            is_ok(none)
            and is_ok(offload)
            and None not in (forward_peak(none), forward_peak(offload))
        ):
            saved = f"{(forward_peak(none) - forward_peak(offload)) / MIB:,.1f}"
            pct = f"{100 * (1 - forward_peak(offload) / forward_peak(none)):.1f}"
        rows.append(
            [
                model,
                precision,
                status_of(offload),
                mib(none.peak_bytes if none else None),
                mib(offload.peak_bytes if offload else None),
                mib(forward_peak(none) if none else None),
                mib(forward_peak(offload) if offload else None),
                saved,
                pct,
            ]
        )
    return [
        "## Offload with pinned host memory",
        "",
        "`strategy=offload device=cuda` keeps saved activations in pinned host memory "
        "(`save_on_cpu`); its device peaks against `none`'s, MiB, CUDA allocator. The step's "
        "peak can sit in Adam's step, where offloading changes nothing; the forward peak shows "
        "what it moves off the card.",
        "",
        markdown_table(headers, rows),
        "",
    ]


def auto_section(run: CheckRun) -> list[str]:
    headers = [
        "budget GiB",
        "batches tried (fake tensors)",
        "batch predicted to fit",
        "its predicted peak MiB",
        "back-offs",
        "batch run",
        "peak allocated MiB",
        "peak reserved MiB",
        "status",
        "message",
    ]
    rows = []
    for r in run.records(AUTO):
        budget = r.extra.get("auto_batch_budget_bytes")
        rows.append(
            [
                MISSING if budget is None else f"{budget / GIB:,.3f}",
                len(r.extra.get("auto_batch_probes") or []),
                r.extra.get("auto_batch_size", MISSING),
                mib(r.extra.get("auto_batch_predicted_peak_bytes")),
                backoffs(r),
                r.batch_size if r.batch_size is not None else MISSING,
                mib(r.peak_bytes),
                mib(r.peak_reserved_bytes),
                r.status,
                r.message or "",
            ]
        )
    notes = [sweep.note for sweep in run.sweeps_of(AUTO) if sweep.note]
    workload = " ".join(AUTO_WORKLOAD)
    return [
        "## batch=auto: out-of-memory back-off",
        "",
        f"`{workload} batch=auto device=cuda`: the largest batch whose predicted peak (fake "
        "tensors) fits the budget is run; on out-of-memory the job steps down one batch at a "
        "time. Peaks: CUDA allocator, at the batch run.",
        "",
        *(f"- {note}" for note in notes),
        *([""] if notes else []),
        markdown_table(headers, rows) if rows else "No record (see Sweeps).",
        "",
    ]


def adaptive_section(run: CheckRun) -> list[str]:
    headers = [
        "model",
        "budget MiB",
        "plan",
        "planning budget MiB",
        "predicted peak MiB (planner)",
        "measured peak MiB (CUDA allocator)",
        "against budget",
    ]
    rows, outcomes = [], []
    for r in run.records(ADAPTIVE):
        budget = adaptive_budget(r)
        for number, step in enumerate(adaptive_rounds(r), start=1):
            measured = step.get("measured_peak_bytes")
            against = MISSING
            if measured is not None and budget is not None:
                against = (
                    "within" if measured <= budget else f"over by {signed_mib(measured - budget)}"
                )
            rows.append(
                [
                    r.model,
                    mib(budget),
                    number,
                    mib(step.get("planning_budget_bytes")),
                    mib(step.get("predicted_peak_bytes")),
                    mib(measured),
                    against,
                ]
            )
        outcomes.append(
            f"- {r.model}, budget {mib(budget)} MiB: **{r.status}** after "
            f"{len(adaptive_rounds(r))} measured plan(s), peak {mib(r.peak_bytes)} MiB "
            f"({r.memory_source or MISSING})" + (f" — {r.message}" if r.message else "")
        )
    notes = [sweep.note for sweep in run.sweeps_of(ADAPTIVE) if sweep.note]
    return [
        "## Adaptive re-planning on allocator peaks",
        "",
        "`strategy=adaptive device=cuda strategy.budget_mb=...`, fp32. Each plan's peak is "
        "predicted by the planner (fake tensors) and measured (CUDA allocator); over budget, "
        "the planning budget is tightened by the overshoot and the job plans again. MiB.",
        "",
        *(f"- {note}" for note in notes),
        *([""] if notes else []),
        markdown_table(headers, rows) if rows else "No measured plan.",
        "",
        *outcomes,
        *([""] if outcomes else []),
    ]


def prediction_section(run: CheckRun) -> list[str]:
    pairs = prediction_pairs(run)
    with_fb = any(
        optional_figure(r, FORWARD_BACKWARD_PEAK) is not None
        for _, m, p in pairs
        for r in (m, p)
        if r is not None
    )
    headers = [
        "model",
        "precision",
        "strategy",
        "measured peak MiB (CUDA allocator)",
        "reserved peak MiB (CUDA allocator)",
        "predicted peak MiB (fake tensors)",
        "error MiB",
        "error %",
        "peak phase: measured / predicted",
        *(["fwd+bwd peak MiB: measured / predicted / error"] if with_fb else []),
        "status: measured / predicted",
    ]
    rows, errors = [], {precision: [] for precision in PRECISIONS}
    for key, measured, predicted in pairs:
        error = pct = phases = MISSING
        if is_ok(measured) and is_ok(predicted):
            error = signed_mib(predicted.peak_bytes - measured.peak_bytes)
            value = error_pct(predicted.peak_bytes, measured.peak_bytes)
            errors[key[1]].append(value)
            pct = f"{value:+.2f}"
            phases = f"{peak_phase(measured)} / {peak_phase(predicted)}"
        fb = []
        if with_fb:
            pair = [
                optional_figure(r, FORWARD_BACKWARD_PEAK) if r else None
                for r in (measured, predicted)
            ]
            fb_error = MISSING if None in pair else signed_mib(pair[1] - pair[0])
            fb = [f"{mib(pair[0])} / {mib(pair[1])} / {fb_error}"]
        rows.append(
            [
                *key,
                mib(measured.peak_bytes if measured else None),
                mib(measured.peak_reserved_bytes if measured else None),
                mib(predicted.peak_bytes if predicted else None),
                error,
                pct,
                phases,
                *fb,
                f"{status_of(measured)} / {status_of(predicted)}",
            ]
        )
    summary = [
        f"- {precision}: error {min(values):+.2f} % to {max(values):+.2f} %, mean |error| "
        f"{sum(map(abs, values)) / len(values):.2f} % over {len(values)} job(s)"
        for precision, values in errors.items()
        if values
    ]
    return [
        "## Prediction error: fake tensors against the CUDA allocator",
        "",
        "The same jobs on `device=fake` (`device.imagine=cuda`, `device.memory_gb` = this "
        "card's memory) and on `device=cuda`. Peaks over the whole step; error = predicted − "
        "measured (MiB; % of measured). What a GPU adds that fake tensors do not see: "
        "allocator rounding, cuBLAS/cuDNN workspaces, CUDA kernels' own saved tensors, and in "
        "bf16 CUDA's autocast op lists, which differ from the CPU's (docs/memory_model.md).",
        "",
        *summary,
        *([""] if summary else []),
        markdown_table(headers, rows),
        "",
    ]


def failures_section(run: CheckRun) -> list[str]:
    lines = []
    for sweep in run.sweeps:
        for r in sweep.records:
            if r.status != STATUS_OK:
                where = f"{sweep.name} job {r.job_num}"
                what = " ".join(str(x) for x in (r.model, r.precision, r.strategy) if x)
                kind = f" ({r.error_type})" if r.error_type else ""
                lines.append(f"- {where}, {what}: **{r.status}**{kind} — {r.message}")
        if len(sweep.records) < sweep.expected_jobs:
            lines.append(
                f"- {sweep.name}: {sweep.expected_jobs - len(sweep.records)} of "
                f"{sweep.expected_jobs} job(s) left no record ({sweep.outcome})"
            )
    return [
        "## Failed jobs and missing records",
        "",
        *(lines or ["None: every job ended `ok`."]),
        "",
    ]


def environment_section(run: CheckRun) -> list[str]:
    fields_shown = ("torch", "cuda", "device_name", "python", "git_commit", "host")
    rows: dict[tuple[Any, ...], None] = {}
    for role, what in ((MEASURED, "device=cuda jobs"), (PREDICTED, "device=fake jobs")):
        for r in run.records(role):
            rows[(what, *(r.environment.get(name, MISSING) for name in fields_shown))] = None
    device = run.device
    total = device.get("total_bytes")
    free = device.get("free_bytes")
    return [
        "## Environment",
        "",
        f"Probed at the start (torch in a separate process): {device.get('device_name', MISSING)}, "
        f"{MISSING if total is None else f'{total / GIB:,.2f}'} GiB, "
        f"{MISSING if free is None else f'{free / GIB:,.2f}'} GiB free; torch "
        f"{device.get('torch', MISSING)}, CUDA {device.get('cuda', MISSING)}. From the records:",
        "",
        markdown_table(("records", *fields_shown), list(rows)),
        "",
    ]


def sweeps_section(run: CheckRun) -> list[str]:
    rows = [
        [
            s.name,
            s.outcome,
            MISSING if s.wall_s is None else f"{s.wall_s:.0f}",
            f"{len(s.records)}/{s.expected_jobs}",
        ]
        for s in run.sweeps
    ]
    lines = [
        "## Sweeps",
        "",
        "Run side by side in stages: the CUDA and fake grids (and the batch=auto probes) "
        "together, the adaptive sweeps once the fake grid's predictions exist, batch=auto last "
        "and alone on the GPU. Jobs of one sweep share a process (Hydra's basic launcher; memexp "
        "empties the CUDA cache between jobs); sweeps share the GPU, whose allocator figures are "
        "per process, so they stay each job's own, while step times do not and are not reported.",
        "",
        markdown_table(("sweep", "outcome", "wall s", "records"), rows),
        "",
        "```",
        *(s.command for s in run.sweeps),
        "```",
        "",
    ]
    for s in run.sweeps:
        if s.returncode != 0 and s.log_tail:
            lines += [f"Last lines of `{s.name}`'s output ({s.outcome}):", "", "```"]
            lines += [s.log_tail, "```", ""]
    return lines


def render_report(run: CheckRun) -> str:
    """The whole markdown report, from the records and the run around them."""
    results = verdicts(run)
    lines = [
        "# GPU check",
        "",
        f"Produced by `{run.command}` on {run.started_at} in {run.wall_s:.0f} s wall; device "
        f"{run.device.get('device_name', MISSING)}, torch {run.device.get('torch', MISSING)}, "
        f"CUDA {run.device.get('cuda', MISSING)}.",
        "",
        UNITS_AND_SOURCES,
        "",
        "## Verdicts",
        "",
        markdown_table(
            ("check", "outcome", "detail"), [(v.check, v.outcome, v.detail) for v in results]
        ),
        "",
    ]
    if run.notes:
        lines += ["Notes:", "", *(f"- {note}" for note in run.notes), ""]
    for section in (
        allocator_section,
        offload_section,
        auto_section,
        adaptive_section,
        prediction_section,
        failures_section,
        environment_section,
        sweeps_section,
    ):
        lines += section(run)
    return "\n".join(lines).rstrip() + "\n"


# --- the command --------------------------------------------------------------------------------


def save_run(run: CheckRun, path: Path) -> None:
    """The run as JSON beside its sweeps: the report can be drawn again without a GPU."""
    write_json_atomic(path, asdict(run))


def load_run(path: Path) -> CheckRun:
    data = json.loads(Path(path).read_text())
    sweeps = [
        Sweep(
            **{
                **sweep,
                "folder": Path(sweep["folder"]),
                "records": [RunResult.from_dict(r) for r in sweep["records"]],
            }
        )
        for sweep in data.pop("sweeps")
    ]
    return CheckRun(**data, sweeps=sweeps)


def run_checks(work: Path, device: dict[str, Any], started: float) -> tuple[list[Sweep], list[str]]:
    """Every sweep, in stages, each stopped at its deadline (seconds after `started`, a
    `time.monotonic()`); returns them and notes on what could not run."""
    memory_gb = f"device.memory_gb={device['total_bytes'] / GIB!r}"
    running: list[Running] = []
    notes: list[str] = []

    def start(sweeps: Iterable[Sweep], by_s: float) -> list[Running]:
        launched = [launch(sweep, started, by_s) for sweep in sweeps]
        running.extend(launched)
        return launched

    try:
        start(grid_sweeps(MEASURED, work, [MEASURED_ON]), MEASURED_BY_S)
        fake = ["device=fake", "device.imagine=cuda", memory_gb]
        predicted = start(grid_sweeps(PREDICTED, work, fake), PREDICTED_BY_S)
        probes = start(
            [auto_probe_sweep(work, MEASURED_ON), auto_probe_sweep(work, "device=fake")],
            PREDICTED_BY_S,
        )
        predictions = [r for sweep in map(finish, predicted) for r in sweep.records]
        adaptive, adaptive_notes = adaptive_sweeps(predictions, work)
        notes += adaptive_notes
        start(adaptive, MEASURED_BY_S)
        for job in running:
            if job.sweep.wall_s is None:
                finish(job)
        try:
            free = probe_cuda()["free_bytes"]
        except NoCudaError as error:
            notes.append(f"batch=auto not run: {error}")
        else:
            measured_line, predicted_line = (batch_line(p.sweep.records) for p in probes)
            (auto,) = start([auto_sweep(free, measured_line, predicted_line, work)], AUTO_BY_S)
            finish(auto)
    finally:
        for job in running:
            if job.process.poll() is None:
                stop(job.process)
    return [job.sweep for job in running], notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the markdown report")
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="an empty or new folder for the sweeps (default: outputs/gpu_check/<date>_<time>)",
    )
    parser.add_argument(
        "--render-from",
        type=Path,
        metavar="RUN_JSON",
        help=f"draw the report again from a run's {RUN_FILE} (no GPU needed), then stop",
    )
    args = parser.parse_args(argv)
    if args.render_from:
        run = load_run(args.render_from)
    else:
        started = time.monotonic()
        now = datetime.now(timezone.utc)
        work = (args.work_dir or OUTPUTS / now.strftime("%Y-%m-%d_%H-%M-%S")).resolve()
        if work.is_dir() and any(work.iterdir()):
            parser.error(f"--work-dir {work} is not empty: its old records would be read as new")
        problem = cuda_driver_problem()
        try:
            if problem:
                raise NoCudaError(problem)
            device = probe_cuda()
        except NoCudaError as error:
            print(f"gpu_check: nothing was checked: {error}", file=sys.stderr)
            return EXIT_NOTHING_CHECKED
        sweeps, notes = run_checks(work, device, started)
        run = CheckRun(
            command=shlex.join(
                ["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            started_at=now.strftime("%Y-%m-%d %H:%M UTC"),
            wall_s=time.monotonic() - started,
            device=device,
            sweeps=sweeps,
            notes=notes,
        )
        save_run(run, work / RUN_FILE)
        print(f"[gpu_check] sweeps and {RUN_FILE} in {work}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render_report(run))
    results = verdicts(run)
    for v in results:
        print(f"[gpu_check] {v.check}: {v.outcome} — {v.detail}")
    print(f"[gpu_check] wrote {args.out}")
    return 0 if all(v.outcome == PASS for v in results) else EXIT_CHECK_FAILED


if __name__ == "__main__":
    sys.exit(main())
