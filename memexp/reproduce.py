"""Re-run a saved sweep with every job's saved config, and check that its deterministic figures come back.

    python -m memexp.reproduce SWEEP_DIR [--launcher NAME] [--out DIR]
    python -m memexp.reproduce SWEEP_DIR --compare-with OTHER_SWEEP_DIR

Each job of SWEEP_DIR is replayed from what Hydra saved in its folder: the composed config
(`.hydra/config.yaml`) and the config-group choices (`.hydra/hydra.yaml`, `hydra.runtime.choices`)
become one Hydra experiment config (`<out>/.replay/replay/job_<n>.yaml`, `@package _global_`), and
one multirun sweeps over them in job order. The preset files in memexp/conf/ may have changed since; the
replayed jobs still get the values the original jobs ran with. The launcher is the original's
(`hydra/launcher` choice, whose `hydra.launcher._target_` is shown) with its command-line settings,
unless `--launcher` names another. The new sweep goes to `<SWEEP_DIR>_repro_<time>` next to it.

Job by job, the figures that depend only on the config and the code must
come back: exactly for the status, parameter count, plan, saved-activation bytes and FLOPs, and,
when memory comes from counting tensors (tensor tracker, fake tensors), the peak and its breakdown;
the first step's loss within a relative 1e-6 (see LOSS_RTOL). Step times are set against the
original's own spread and reported, never failed. The table is printed and written to
`<out>/reproduction.md`, with warnings where the environment differs (torch, device, precision,
memory source, code commit) or a replayed config differs from the saved one.

Jobs are paired by config, never by position (job numbers follow the order of a sweep's
overrides): a replayed job by the folder it replays, otherwise by the config hash stored in the
records (`memexp.resume.config_hash`). A damaged record or a folder without its saved config is
named ("cannot be replayed"), never dropped. `--compare-with` only prints: it writes nothing into
either folder.

Exit status: 0 when every deterministic figure matches; 1 when one differs or a job has no record
in the reproduction (each named in the report); 2 when input cannot be read (no job folders, a
damaged record, a job that cannot be replayed, a missing --compare-with folder).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from memexp.logs import log_to_stderr
from memexp.results import (
    SOURCE_FAKE_TENSORS,
    SOURCE_TENSOR_TRACKER,
    STATUS_OK,
    DamagedRecord,
    RunResult,
    read_result,
)
from memexp.resume import recorded_hash
from memexp.sweepdir import (
    HYDRA_DIR,
    JOB_CONFIG,
    JOB_HYDRA,
    RESULT_FILE,
    job_order,
    read_sweep_overrides,
)
from memexp.text import markdown_table

log = logging.getLogger(__name__)

REPORT_FILE = "reproduction.md"
UNREADABLE_EXIT_CODE = 2  # input that cannot be read (a figure that differs is 1)
REPLAY_DIR = ".replay"  # inside the new sweep folder: the generated experiment configs
REPLAY_GROUP = "replay"

# Equal on any machine: they follow from the config and the code alone.
EXACT_FIGURES = (
    "status",
    "param_count",
    "plan",
    "saved_activation_bytes",
    "flops_step",
    "flops_step_no_checkpoint",
    "flops_recompute",
)
# Equal too when memory is counted from tensors; the CUDA allocator's figures also depend on its
# cached blocks and the libraries' workspaces, so those are reported as a ratio, not checked.
TRACKED_MEMORY_FIGURES = (
    "peak_bytes",
    "params_bytes",
    "grads_bytes",
    "optimizer_state_bytes",
    "activations_bytes",
    "temporaries_bytes",
    "other_bytes",
    "phase_bytes",
)
EXACT_MEMORY_SOURCES = (SOURCE_TENSOR_TRACKER, SOURCE_FAKE_TENSORS)
LOSS_FIGURE = "loss_first_step"
# Same seed, data and ops give the same loss, usually to the bit; but another thread count (another
# launcher or host) sums float32 reductions in another order, which moves the last bits (float32
# epsilon: 1.2e-7). 1e-6 absorbs that and nothing that a config or code change would produce.
LOSS_RTOL = 1e-6
# Where two sweeps can differ without a figure being wrong, but a reader should know.
ENVIRONMENT = {
    "torch": lambda r: r.environment.get("torch"),
    "CUDA": lambda r: r.environment.get("cuda"),
    "device name": lambda r: r.environment.get("device_name"),
    "precision": lambda r: r.precision,
    "memory source": lambda r: r.memory_source,
    "code commit": lambda r: r.environment.get("git_commit"),
}
# Keys a replay leaves unset: the rerun is a fresh sweep, not the resumption of one.
NOT_REPLAYED_KEYS = ("resume",)
_PLAIN_OVERRIDE_VALUE = re.compile(r"[\w/.\-:~+@]+")


@dataclass(frozen=True)
class SavedJob:
    """One job folder of a sweep, as Hydra and the runner left it.

    `problem` says what could not be read: a damaged record (then `record` is None), or a
    missing or unreadable `.hydra/` (then `config` is None and the job cannot be replayed).
    """

    num: int
    folder: Path
    config: DictConfig | None  # .hydra/config.yaml: the composed task config
    choices: dict[str, str]  # config-group choices of the task config (hydra's own left out)
    overrides: list[str]
    launcher: str  # the hydra/launcher choice
    launcher_target: str
    launcher_overrides: list[str]  # hydra.launcher.* settings given on the command line
    record: RunResult | None
    problem: str | None = None

    @property
    def config_hash(self) -> str | None:
        """What identifies the job: the hash of its resolved config, stored in its record."""
        return recorded_hash(self.record) if self.record is not None else None


def _read_record(folder: Path) -> tuple[RunResult | None, str | None]:
    path = folder / RESULT_FILE
    if not path.is_file():
        return None, None
    try:
        return read_result(path), None
    except DamagedRecord as damaged:
        return None, str(damaged)


def read_saved_job(folder: Path) -> SavedJob:
    """One job folder; what cannot be read is said in `problem`, never raised."""
    record, problem = _read_record(folder)
    try:
        hydra = OmegaConf.load(folder / JOB_HYDRA).hydra
        config = OmegaConf.load(folder / JOB_CONFIG)
        choices = OmegaConf.to_container(hydra.runtime.choices)
        launcher, launcher_target = choices["hydra/launcher"], hydra.launcher._target_
        num, overrides = int(hydra.job.num), list(hydra.overrides.task)
        launcher_overrides = [o for o in hydra.overrides.hydra if o.startswith("hydra.launcher.")]
    except Exception as error:  # missing, truncated or foreign .hydra/: say so, never drop the job
        reason = (
            f"cannot be replayed: no readable {JOB_HYDRA} and {JOB_CONFIG} ({type(error).__name__})"
        )
        fallback = record.job_num if record is not None and record.job_num is not None else None
        return SavedJob(
            num=fallback if fallback is not None else job_order(folder)[0],
            folder=folder,
            config=None,
            choices={},
            overrides=list(record.overrides) if record is not None else [],
            launcher="",
            launcher_target="",
            launcher_overrides=[],
            record=record,
            problem="; ".join(filter(None, [problem, reason])),
        )
    return SavedJob(
        num=num,
        folder=folder,
        config=config,
        choices={
            group: choice
            for group, choice in choices.items()  # type: ignore[union-attr]
            if choice is not None and not group.startswith("hydra/")
        },
        overrides=overrides,
        launcher=launcher,
        launcher_target=launcher_target,
        launcher_overrides=launcher_overrides,
        record=record,
        problem=problem,
    )


def read_saved_jobs(sweep_dir: Path) -> list[SavedJob]:
    """Every job folder of `sweep_dir` (it holds `.hydra/` or a record), in folder order."""
    folders = {path.parent for path in Path(sweep_dir).glob(f"*/{HYDRA_DIR}")}
    folders |= {path.parent for path in Path(sweep_dir).glob(f"*/{RESULT_FILE}")}
    return [read_saved_job(folder) for folder in sorted(folders, key=job_order)]


# --- replay --------------------------------------------------------------------------------------


def replay_name(job: SavedJob) -> str:
    """Named after the job's folder, which is unique where job numbers may not be (a resumed
    sweep moves a record of another config to a new folder with its old number)."""
    return f"job_{job.folder.name}"


def replay_config(job: SavedJob, sweep_dir: Path) -> str:
    """The job as a Hydra experiment config: its group choices, then every value it ran with."""
    defaults = [
        {f"override /{group}": choice}
        for group, choice in job.choices.items()
        if group != REPLAY_GROUP  # a reproduction's jobs are replays already
    ]
    values = OmegaConf.to_container(job.config, resolve=False)
    for key in NOT_REPLAYED_KEYS:
        values.pop(key, None)  # type: ignore[union-attr]
    header = (
        "# @package _global_\n"
        f"# Job {job.num} of {sweep_dir}, replayed by memexp.reproduce: the config-group choices\n"
        f"# from its {HYDRA_DIR}/hydra.yaml, then every value of its {HYDRA_DIR}/config.yaml.\n"
    )
    return header + OmegaConf.to_yaml({"defaults": defaults, **values})  # type: ignore[dict-item]


def _override_value(text: str) -> str:
    """Quote a value for Hydra's override grammar when it holds more than plain path characters."""
    if _PLAIN_OVERRIDE_VALUE.fullmatch(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def shared_overrides(sweep_dir: Path) -> list[str]:
    """The original command line's task overrides that all its jobs shared (sweeps left out).

    Replayed jobs need none of them, but the sweep's own config (what the end-of-sweep callbacks
    see, e.g. the logger) is composed from the command line alone.
    """
    saved = read_sweep_overrides(sweep_dir)
    if saved is None:
        return []
    return [
        override.input_line
        for override in OverridesParser.create().parse_overrides(saved[0])
        if not (override.is_sweep_override() or override.is_add() or override.is_delete())
        and override.key_or_group not in NOT_REPLAYED_KEYS
        and override.input_line is not None
    ]


def replay_command(
    jobs: Sequence[SavedJob],
    sweep_dir: Path,
    conf_dir: Path,
    out_dir: Path,
    launcher: str,
    settings: list[str],
) -> list[str]:
    """`python -m memexp -m` over the replay configs, into `out_dir`, under `launcher`."""
    return [
        sys.executable,
        "-m",
        "memexp",
        "-m",
        "--config-dir",
        str(conf_dir),
        *shared_overrides(sweep_dir),
        f"+{REPLAY_GROUP}=" + ",".join(replay_name(job) for job in jobs),
        f"hydra.sweep.dir={_override_value(str(out_dir))}",
        f"hydra/launcher={launcher}",
        *settings,
    ]


def launch_settings(jobs: Sequence[SavedJob], requested: str | None) -> tuple[str, list[str]]:
    """The launcher for the rerun and its command-line settings.

    The original's (its lowest job's) with the settings it was given, unless another is requested:
    settings of one launcher mean nothing to another, so those are dropped.
    """
    first = jobs[0]
    if requested is None or requested == first.launcher:
        return first.launcher, first.launcher_overrides
    return requested, []


def replay(
    jobs: Sequence[SavedJob], sweep_dir: Path, out_dir: Path, launcher: str | None
) -> tuple[str, int]:
    """Write the replay configs and run the sweep, its output streaming through.

    Returns the command and its exit status (1 when a job ended in `error`, as for any sweep).
    """
    conf_dir = out_dir / REPLAY_DIR
    (conf_dir / REPLAY_GROUP).mkdir(parents=True)
    for job in jobs:
        (conf_dir / REPLAY_GROUP / f"{replay_name(job)}.yaml").write_text(
            replay_config(job, sweep_dir)
        )
    command = replay_command(jobs, sweep_dir, conf_dir, out_dir, *launch_settings(jobs, launcher))
    finished = subprocess.run(command, check=False)
    return shlex.join(["python", *command[1:]]), finished.returncode


# --- comparison ----------------------------------------------------------------------------------


@dataclass
class JobComparison:
    num: int
    overrides: list[str]
    status: str
    checked: int = 0  # deterministic figures compared
    differences: list[str] = field(default_factory=list)  # deterministic: these fail the check
    reported: list[str] = field(default_factory=list)  # compared, never failing
    config_changes: list[str] = field(default_factory=list)
    step_ratio: float | None = None  # reproduction median / original median
    step_spread: tuple[float, float] | None = None  # original min / median, max / median
    unreadable: list[str] = field(default_factory=list)  # input that could not be read


def _config_values(config: DictConfig) -> dict[str, Any]:
    values = pd.json_normalize(OmegaConf.to_container(config, resolve=False), sep=".")
    flat = values.iloc[0].to_dict() if len(values) else {}
    return {k: v for k, v in flat.items() if k.split(".")[0] not in NOT_REPLAYED_KEYS}


def config_changes(original: DictConfig, reproduced: DictConfig) -> list[str]:
    before, after = _config_values(original), _config_values(reproduced)
    return [
        f"{key}: {before.get(key, 'absent')!r} -> {after.get(key, 'absent')!r}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key, "absent") != after.get(key, "absent")
    ]


def _same(figure: str, original: Any, reproduced: Any) -> bool:
    if figure == LOSS_FIGURE and original is not None and reproduced is not None:
        return math.isclose(original, reproduced, rel_tol=LOSS_RTOL)
    return original == reproduced


def deterministic_figures(original: RunResult, reproduced: RunResult) -> list[str]:
    """The figures that must agree for this pair of records."""
    if original.status != STATUS_OK or reproduced.status != STATUS_OK:
        return ["status"]
    figures = [*EXACT_FIGURES, LOSS_FIGURE]
    sources = {original.memory_source, reproduced.memory_source}
    if len(sources) == 1 and sources <= set(EXACT_MEMORY_SOURCES):
        figures += TRACKED_MEMORY_FIGURES
    return figures


def compare_records(comparison: JobComparison, original: RunResult, reproduced: RunResult) -> None:
    figures = deterministic_figures(original, reproduced)
    comparison.checked = len(figures)
    for figure in figures:
        before, after = getattr(original, figure), getattr(reproduced, figure)
        if not _same(figure, before, after):
            comparison.differences.append(f"{figure}: original {before}, reproduction {after}")
    if original.status != STATUS_OK or reproduced.status != STATUS_OK:
        return
    if original.step_ms_median and reproduced.step_ms_median is not None:
        median = original.step_ms_median
        comparison.step_ratio = reproduced.step_ms_median / median
        comparison.step_spread = (original.step_ms_min / median, original.step_ms_max / median)
    if "peak_bytes" not in figures and original.peak_bytes and reproduced.peak_bytes is not None:
        comparison.reported.append(
            f"peak_bytes ({original.memory_source} / {reproduced.memory_source}, not checked): "
            f"reproduction / original {reproduced.peak_bytes / original.peak_bytes:.3f}×"
        )


def compare_job(original: SavedJob, reproduced: SavedJob | None, replayed: bool) -> JobComparison:
    """One original job against its partner (the same config), or why it could not be compared."""
    if original.record is None:
        comparison = JobComparison(original.num, original.overrides, "no record")
        if original.problem:
            comparison.status = "unreadable"
            comparison.unreadable.append(original.problem)
        else:
            comparison.reported.append(f"the original has no {RESULT_FILE}: nothing to compare")
        return comparison
    # The record's overrides are those it was measured with; a resumed sweep's .hydra files
    # describe the last command that passed through the folder.
    comparison = JobComparison(original.num, original.record.overrides, original.record.status)
    if replayed and original.config is None:
        comparison.unreadable.append(original.problem or "cannot be replayed")
    elif reproduced is not None and reproduced.record is None and reproduced.problem:
        comparison.unreadable.append(f"the reproduction's {reproduced.problem}")
    elif reproduced is None or reproduced.record is None:
        comparison.differences.append(f"the reproduction has no {RESULT_FILE} for this job")
    if reproduced is None or reproduced.record is None:
        return comparison
    comparison.status = f"{original.record.status} / {reproduced.record.status}"
    if original.config is not None and reproduced.config is not None:
        comparison.config_changes = config_changes(original.config, reproduced.config)
    compare_records(comparison, original.record, reproduced.record)
    return comparison


def partner_of(original: SavedJob, reproduced: Sequence[SavedJob]) -> SavedJob | None:
    """The reproduced job of the same config: its replay of this folder, else the same hash.

    Never by position: job numbers follow the order of a sweep's overrides.
    """
    for job in reproduced:
        if job.choices.get(REPLAY_GROUP) == replay_name(original):
            return job
    if original.config_hash is None:
        return None
    return next((job for job in reproduced if job.config_hash == original.config_hash), None)


def environment_warnings(original: Sequence[SavedJob], reproduced: Sequence[SavedJob]) -> list[str]:
    """One line per environment property whose values differ between the two sweeps."""

    def values(jobs: Sequence[SavedJob], read: Any) -> str:
        found = {str(read(job.record)) for job in jobs if job.record is not None}
        return ", ".join(sorted(found)) or "unknown"

    warnings = []
    for name, read in ENVIRONMENT.items():
        before, after = values(original, read), values(reproduced, read)
        if before != after:
            warnings.append(f"{name} differs: original {before}; reproduction {after}")
    return warnings


@dataclass
class Comparison:
    original_dir: Path
    reproduced_dir: Path
    jobs: list[JobComparison]
    environment: list[str]
    launcher: str
    command: str | None = None
    command_exit: int | None = None

    unpaired: list[str] = field(default_factory=list)  # reproduced jobs that could not be read

    @staticmethod
    def _label(job: JobComparison) -> str:
        return f"job {job.num} ({' '.join(job.overrides) or 'no overrides'})"

    @property
    def differences(self) -> list[str]:
        return [f"{self._label(job)}: {d}" for job in self.jobs for d in job.differences]

    @property
    def unreadable(self) -> list[str]:
        """Input the comparison could not read: a damaged record, a folder without its config."""
        return [
            *(f"{self._label(job)}: {u}" for job in self.jobs for u in job.unreadable),
            *self.unpaired,
        ]


def compare_sweeps(original_dir: Path, reproduced_dir: Path, replayed: bool = False) -> Comparison:
    """Pair every original job with the reproduced job of the same config and compare them."""
    original = read_saved_jobs(original_dir)
    reproduced = read_saved_jobs(reproduced_dir)
    partners = {job.folder: partner_of(job, reproduced) for job in original}
    paired = {partner.folder for partner in partners.values() if partner is not None}
    first = next((job for job in original if job.config is not None), None)
    return Comparison(
        original_dir=Path(original_dir),
        reproduced_dir=Path(reproduced_dir),
        jobs=[compare_job(job, partners[job.folder], replayed) for job in original],
        environment=environment_warnings(original, reproduced),
        launcher=f"{first.launcher} ({first.launcher_target})" if first else "unknown",
        unpaired=[
            f"reproduction {job.folder.name}: {job.problem}"
            for job in reproduced
            if job.problem and job.folder not in paired
        ],
    )


# --- report --------------------------------------------------------------------------------------


def _step_cells(job: JobComparison) -> tuple[str, str]:
    if job.step_ratio is None or job.step_spread is None:
        return "-", "-"
    low, high = job.step_spread
    inside = "within" if low <= job.step_ratio <= high else "outside"
    return f"{job.step_ratio:.2f}×", f"{low:.2f}–{high:.2f}× ({inside})"


def _figures_cell(job: JobComparison) -> str:
    if job.differences:
        return f"{len(job.differences)} differ"
    return f"{job.checked} match" if job.checked else "-"


def render(comparison: Comparison) -> str:
    differences, unreadable = comparison.differences, comparison.unreadable
    checked = sum(job.checked for job in comparison.jobs)
    verdicts = []
    if differences:
        verdicts.append(
            f"**{len(differences)} deterministic difference(s)**: listed under Differences."
        )
    if unreadable:
        verdicts.append(f"**{len(unreadable)} job(s) could not be read**: listed under Unreadable.")
    verdict = " ".join(verdicts) or (
        f"**Every deterministic figure matches** ({checked} figures over "
        f"{len(comparison.jobs)} job(s))."
    )
    lines = [
        f"# Reproduction of {comparison.original_dir.name}",
        "",
        f"- Original: `{comparison.original_dir}`, launcher {comparison.launcher}",
        f"- Reproduction: `{comparison.reproduced_dir}`",
    ]
    if comparison.command:
        lines.append(f"- Command: `{comparison.command}` (exit status {comparison.command_exit})")
    lines += ["", verdict, "", "## Environment", ""]
    lines += [f"- warning: {w}" for w in comparison.environment] or [
        "Same torch, CUDA, device name, precision, memory source and code commit."
    ]
    rows = [
        (
            job.num,
            " ".join(job.overrides),
            job.status,
            _figures_cell(job),
            *_step_cells(job),
        )
        for job in comparison.jobs
    ]
    headers = (
        "job",
        "overrides",
        "status (original / reproduction)",
        "deterministic figures",
        "step time: reproduction / original median",
        "original spread: min–max / median",
    )
    lines += ["", "## Jobs", "", markdown_table(headers, rows)]
    if differences:
        lines += ["", "## Differences", "", *(f"- {d}" for d in differences)]
    if unreadable:
        lines += ["", "## Unreadable", "", *(f"- {u}" for u in unreadable)]
    notes = [
        f"job {job.num}: {note}"
        for job in comparison.jobs
        for note in [*job.reported, *(f"config {c}" for c in job.config_changes)]
    ]
    if notes:
        lines += ["", "## Notes (reported, not checked)", "", *(f"- {n}" for n in notes)]
    lines += [
        "",
        "## How figures are compared",
        "",
        f"- Exactly: {', '.join(EXACT_FIGURES)}; with memory counted from tensors "
        f"({', '.join(EXACT_MEMORY_SOURCES)}) also {', '.join(TRACKED_MEMORY_FIGURES)}.",
        f"- {LOSS_FIGURE}: within a relative {LOSS_RTOL:g}; another thread count reorders "
        "float32 sums, which moves the last bits (float32 epsilon 1.2e-7).",
        "- Step time (ms, the records' `time_source`): the ratio of medians, set against the "
        "original's own spread (its min and max over the median); reported, never a failure, "
        "because times follow the machine's load.",
        "- CUDA allocator peaks: a ratio, reported only (cached blocks and library workspaces vary).",
    ]
    return "\n".join(lines) + "\n"


def report(comparison: Comparison, report_file: Path | None) -> int:
    """Print the comparison (and write it to `report_file`), return the exit code: 2 when some
    input could not be read, else 1 when a deterministic figure differs, else 0."""
    text = render(comparison)
    print(text, flush=True)
    if report_file is not None:
        report_file.write_text(text)
    for problem in comparison.unreadable:
        log.error("unreadable: %s", problem)
    for difference in comparison.differences:
        log.error("not reproduced: %s", difference)
    if comparison.unreadable:
        return UNREADABLE_EXIT_CODE
    return 1 if comparison.differences else 0


# --- command line --------------------------------------------------------------------------------


def default_out_dir(sweep_dir: Path) -> Path:
    return sweep_dir.with_name(f"{sweep_dir.name}_repro_{datetime.now():%Y-%m-%d_%H-%M-%S}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m memexp.reproduce", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="the saved sweep to reproduce")
    parser.add_argument(
        "--launcher", help="hydra/launcher option for the rerun (default: the original's)"
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--out", type=Path, help="new sweep folder (default: next to SWEEP_DIR)")
    target.add_argument(
        "--compare-with", type=Path, help="compare with this existing sweep instead of rerunning"
    )
    args = parser.parse_args(argv)
    log_to_stderr()

    sweep_dir = args.sweep_dir.resolve()
    jobs = read_saved_jobs(sweep_dir)
    if not jobs:
        log.error("no job folders (*/%s/ or */%s) in %s", HYDRA_DIR, RESULT_FILE, sweep_dir)
        return UNREADABLE_EXIT_CODE
    if args.compare_with is not None:
        other = args.compare_with.resolve()
        if not other.is_dir():
            log.error("--compare-with %s: no such folder", other)
            return UNREADABLE_EXIT_CODE
        return report(compare_sweeps(sweep_dir, other), report_file=None)
    replayable = [job for job in jobs if job.config is not None]
    if not replayable:
        log.error("no job of %s can be replayed (none has its %s/)", sweep_dir, HYDRA_DIR)
        return UNREADABLE_EXIT_CODE
    out_dir = (args.out or default_out_dir(sweep_dir)).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        log.error("%s is not empty; choose another --out", out_dir)
        return UNREADABLE_EXIT_CODE
    command, command_exit = replay(replayable, sweep_dir, out_dir, args.launcher)
    comparison = compare_sweeps(sweep_dir, out_dir, replayed=True)
    comparison.command, comparison.command_exit = command, command_exit
    return report(comparison, report_file=out_dir / REPORT_FILE)


if __name__ == "__main__":
    sys.exit(main())
