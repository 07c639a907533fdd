"""Benchmark the budget-held planners side by side: adaptive, op, sac_milp and compile_budget.

    .venv/bin/python scripts/bench_planner.py                        # small (cpu), medium (fake)
    .venv/bin/python scripts/bench_planner.py --models small --budgets 3 --repeat 2

For each model a budget ladder is laid between the leanest plan's and `none`'s predicted
forward+backward peaks (memexp.planner, fake tensors): `--budgets` budgets evenly inside that
range. At each budget `adaptive`, `sac_milp` and `compile_budget` run as ordinary memexp jobs
(`memexp.runner.run_job`, fp32, Adam) with `strategy.budget_mb` set to it; `op` (a fixed plan)
and `none` run once and are compared with every budget. Every figure is a job's own record
(kept under outputs/bench_planner/):

- peak: the forward+backward peak (tensor tracker on the CPU, fake tensors on `fake`); for
  compile_budget the peak its record judges the budget by, the tracker's over the compiled step
  itself (memexp/strategies/compile_budget.py), or marked ≈ where it is an estimate (`inductor`
  on the CPU);
- over budget: how far that peak is above the budget (0 when within);
- recompute FLOPs: % of the step without checkpointing (FlopCounterMode, matmuls only; for
  compile_budget those of the nodes its partitioner recomputes, "-" where none were recorded);
- predicted recompute: the plan's recompute time under one cost model for every planner,
  `memexp.planner.predict(profile, options).recompute_ps` on the model's recomputation-only
  profile (the roofline of `device.peak_tflops` / `device.memory_gbps`, else the imagined
  device's rates; the cost source is named under each table; adaptive's options, the layer's
  operator choices included), the plan read as layer options by `memexp.planner.options_of`;
  where the profile holds no such option (sac_milp's own per-layer sets of operator outputs;
  the reason is noted), marked †, the same roofline over the plan's whole step less `none`'s
  (`memexp.measure.flops.step_roofline_ps`, equal to the profile's prediction wherever both
  apply); for compile_budget, marked ‡, the same roofline over the nodes of its backward graphs
  that its partitioner recomputes (`memexp.measure.flops.compiled_recompute`), as its backend
  runs them: operator by operator after inductor's decompositions, unfused;
- adaptive within this peak: for a peer's measured plan (op, sac_milp, compile_budget), the
  predicted recompute time of the plan adaptive's solver picks on the same profile held to that
  peer's measured peak (`memexp.planner.cheapest_within`): adaptive against the peer at a peak
  no larger;
- recompute time: the job's median backward time less `none`'s, then its own backward's min–max
  over the timed steps (measured, so noisy on a shared machine: a difference inside the spreads
  is noise; "-" on the fake device, where nothing runs);
- planning: the strategy's own planning time from its record (profile, solve), 0 for `op`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from memexp import CONF_DIR, planner  # noqa: E402
from memexp.config import ExperimentSpec  # noqa: E402
from memexp.configure import register_configs, validate  # noqa: E402
from memexp.measure.flops import step_roofline_ps  # noqa: E402
from memexp.plan import CheckpointPlan  # noqa: E402
from memexp.results import SCOPE_FORWARD_BACKWARD, RunResult, read_result  # noqa: E402
from memexp.runner import run_job  # noqa: E402
from memexp.sweepdir import RESULT_FILE  # noqa: E402
from memexp.text import MIB, markdown_table  # noqa: E402

# Where each model runs: small measured on the CPU, medium predicted on fake tensors.
DEVICES = {"small": "cpu", "medium": "fake"}
# The budget-held planners; each records its own figures under `extra[<its name>]`.
BUDGETED = ("adaptive", "sac_milp", "compile_budget")
# Settings each planner runs with beyond the budget. Adaptive prices its options on the
# roofline (deterministic), named rather than left to `auto` (which means it off a GPU): its
# measured per-option times are noise on a shared CPU, and timing every option there made
# planning take minutes.
PLANNER_SETTINGS = {"adaptive": ("strategy.cost_source=roofline",)}


def compose_overrides(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@dataclass
class CommonCost:
    """One cost model for every planner's plan: the model's recomputation-only profile (its
    roofline, which also lays the ladder) for plans of layer options, and the same roofline
    over the plan's whole step, less `none`'s, for eager plans no layer option expresses (equal
    to the profile's prediction wherever both apply: tests/test_adaptive.py checks it)."""

    spec: ExperimentSpec
    profile: planner.StepProfile
    priced: dict[CheckpointPlan, tuple[str, str | None]] = field(default_factory=dict)

    @classmethod
    def of(cls, model: str, device: str) -> CommonCost:
        spec = validate(
            compose_overrides(f"model={model}", f"device={device}", "strategy=adaptive")
        )
        return cls(spec, planner.profile_step(spec, (), operator_choices=True))

    @cached_property
    def nothing_ps(self) -> int:
        return step_roofline_ps(self.spec, CheckpointPlan.nothing(self.profile.layers))

    def recompute(self, plan: CheckpointPlan) -> tuple[str, str | None]:
        """The plan's recompute time in ms (marked † when priced on its whole step), and
        a note where it is not read from layer options."""
        if plan not in self.priced:
            self.priced[plan] = self._price(plan)
        return self.priced[plan]

    def _price(self, plan: CheckpointPlan) -> tuple[str, str | None]:
        try:
            choices = planner.options_of(plan)
        except ValueError as error:
            return self._on_its_own_step(plan, str(error))
        unprofiled = set(choices) - set(self.profile.options)
        if unprofiled:
            return self._on_its_own_step(
                plan,
                f"{len(unprofiled)} of its layer options, its own sets of operator outputs, "
                "are not among the profiled ones",
            )
        return f"{planner.predict(self.profile, choices).recompute_ps / 1e9:,.2f}", None

    def _on_its_own_step(self, plan: CheckpointPlan, why: str) -> tuple[str, str]:
        """The roofline over the plan's whole step less `none`'s, marked †, and why."""
        ps = step_roofline_ps(self.spec, plan) - self.nothing_ps
        return f"†{ps / 1e9:,.2f}", f"{why}; † priced on its own step"

    def adaptive_within(self, peak: int | None) -> str:
        """What adaptive's solver predicts its plan would recompute held to `peak` (a peer's
        measured peak): the comparison at a peak no larger than the peer's."""
        if peak is None:
            return "-"
        solution = planner.cheapest_within(self.profile, peak, SCOPE_FORWARD_BACKWARD)
        return "no plan" if solution is None else f"{solution.recompute_ps / 1e9:,.2f}"


def ladder(profile: planner.StepProfile, count: int) -> list[int]:
    """`count` budgets evenly between the leanest plan's and `none`'s predicted peaks."""
    nothing = planner.predict(profile, ((),) * profile.layers).peak_in(SCOPE_FORWARD_BACKWARD)
    lowest = planner.leanest(profile, SCOPE_FORWARD_BACKWARD).peak_bytes
    return [round(lowest + (nothing - lowest) * k / (count + 1)) for k in range(1, count + 1)]


@dataclass
class Job:
    label: str
    budget: int | None
    record: RunResult | None  # None: not run (a stopped benchmark finished with --recorded-only)


def run(
    model: str, device: str, repeat: int, job_dir: Path, recorded_only: bool, *overrides: str
) -> RunResult | None:
    """The job's record: read where the folder already holds one (`--resume`), else run, unless
    `recorded_only` (None then: the job was not run)."""
    if (job_dir / RESULT_FILE).exists():
        return read_result(job_dir)
    if recorded_only:
        return None
    cfg = compose_overrides(
        f"model={model}",
        f"device={device}",
        *overrides,
        "logger=none",
        f"measure.repeat={repeat}",
        "measure.max_time_s=1",
    )
    started = time.monotonic()
    run_job(cfg, job_dir, {"overrides": [f"model={model}", *overrides]})
    record = read_result(job_dir)
    print(
        f"[bench] {model} {' '.join(overrides)}: {record.status} in "
        f"{time.monotonic() - started:.0f} s",
        flush=True,
    )
    return record


def peak_of(job: Job) -> tuple[int | None, str]:
    """The forward+backward peak the planner is judged by, marked ≈ where it is an estimate."""
    extra = job.record.extra.get("compile_budget")
    if extra is not None:
        return extra.get("peak_bytes"), "" if extra.get("peak_measured") else "≈"
    return job.record.forward_backward_peak_bytes, ""


def mib(value: int | None, mark: str = "") -> str:
    return "-" if value is None else f"{mark}{value / MIB:,.1f}"


def recompute_time(job: Job, none: RunResult) -> str:
    record = job.record
    ours, theirs = record.backward_ms_median, none.backward_ms_median
    if ours is None or theirs is None:
        return "-"
    return f"{ours - theirs:+,.0f} ({record.backward_ms_min:,.0f}–{record.backward_ms_max:,.0f})"


def predicted_recompute(job: Job, cost: CommonCost) -> tuple[str, str | None]:
    """The job's plan's recompute time on the common cost model, and a note on how."""
    plan = job.record.plan
    if plan is None:
        return "-", None
    if plan.compiled is None:
        return cost.recompute(plan)
    extra = job.record.extra["compile_budget"]
    if "recompute_roofline_ps" not in extra:
        return "-", "its backend's partition was not recorded"
    rates = (extra["roofline_tflops"], extra["roofline_gbps"])
    if rates != cost.spec.roofline_rates:
        raise ValueError(f"{job.label} was priced at {rates}, not the common rates")
    ops = extra["recomputed_operators"]
    return (
        f"‡{extra['recompute_roofline_ps'] / 1e9:,.2f}",
        f"‡ priced on the {ops} operator nodes its backward graphs recompute",
    )


def planning_time(job: Job) -> str:
    if job.record.strategy not in BUDGETED:
        return "0"
    value = job.record.extra.get(job.record.strategy, {}).get("planning_s")
    return "-" if value is None else f"{value:,.1f}"


def row(job: Job, budget: int, none: RunResult, cost: CommonCost) -> list[str]:
    record = job.record
    if record is None:
        return [mib(budget), job.label, "not run", "", "", "", "", "", "", ""]
    peak, mark = peak_of(job)
    over = None if peak is None else max(0, peak - budget)
    compiled = record.extra.get("compile_budget")
    unrecorded = compiled is not None and "recompute_flops" not in compiled
    flops = (
        "-"
        if record.recompute_flops_pct is None or unrecorded
        else f"{record.recompute_flops_pct:.2f}"
    )
    return [
        mib(budget),
        job.label,
        record.status,
        mib(peak, mark),
        mib(over, mark),
        flops,
        predicted_recompute(job, cost)[0],
        "-" if job.label in ("none", "adaptive") or mark else cost.adaptive_within(peak),
        recompute_time(job, none),
        planning_time(job),
    ]


HEADERS = (
    "budget MiB",
    "planner",
    "status",
    "fwd+bwd peak MiB",
    "over budget MiB",
    "recompute FLOPs %",
    "predicted recompute ms (common cost)",
    "adaptive within this peak: predicted ms",
    "recompute time ms: bwd − none's (bwd min–max)",
    "planning s",
)


def model_section(
    model: str, device: str, budgets: list[int], jobs: list[Job], cost: CommonCost
) -> list[str]:
    none = next(job.record for job in jobs if job.label == "none")
    op = next(job for job in jobs if job.label == "op")
    if none is None:
        return [f"## {model} (device={device}): not run", ""]
    rows = [row(Job("none", None, none), budgets[-1], none, cost)]
    for budget in budgets:
        rows.append(row(op, budget, none, cost))
        rows += [row(job, budget, none, cost) for job in jobs if job.budget == budget]
    notes = [
        f"- {job.label} at {mib(job.budget)} MiB: {job.record.status} — {job.record.message}"
        for job in jobs
        if job.record is not None and job.record.status != "ok"
    ]
    for job in jobs:
        why = None if job.record is None else predicted_recompute(job, cost)[1]
        if why is not None:
            notes.append(f"- {job.label} at {mib(job.budget)} MiB, predicted recompute: {why}")
    return [
        f"## {model} (device={device}): seq {none.seq_len} × batch {none.batch_size}",
        "",
        f"none's predicted forward+backward peak ends the ladder; `op` and `none` are measured "
        f"once and set against each budget. Load average at the end of this model's jobs: "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}. Predicted recompute times are on "
        f"one cost model for every plan: {cost.profile.cost_source}.",
        "",
        markdown_table(HEADERS, rows),
        "",
        *notes,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(DEVICES))
    parser.add_argument("--budgets", type=int, default=5, help="budgets on each ladder")
    parser.add_argument("--repeat", type=int, default=2, help="timed steps per measured job")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results/bench_planner.md")
    parser.add_argument(
        "--resume", type=Path, help="an earlier run's folder: its recorded jobs are read, not rerun"
    )
    parser.add_argument(
        "--recorded-only",
        action="store_true",
        help="with --resume: run nothing, table what is there",
    )
    args = parser.parse_args()

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    root = args.resume or ROOT / "outputs" / "bench_planner" / started.replace(":", "-")
    if args.resume:
        started = f"{root.name} (jobs run then; tabled {started})"
    lines = [
        "# Budget-held planners side by side",
        "",
        f"Started {started} on {os.cpu_count()} CPU(s) shared with other work; load average "
        f"at start {', '.join(f'{v:.2f}' for v in os.getloadavg())}. Produced by "
        f"`scripts/bench_planner.py --models {' '.join(args.models)} --budgets {args.budgets} "
        f"--repeat {args.repeat}` (the script's docstring defines every column). Bytes and "
        f"FLOPs are exact; times are noisy ({args.repeat} timed steps per job).",
        "",
    ]
    for model in args.models:
        device = DEVICES[model]
        cost = CommonCost.of(model, device)
        budgets = ladder(cost.profile, args.budgets)
        folder = root / model
        jobs = [
            Job(
                label,
                None,
                run(
                    model,
                    device,
                    args.repeat,
                    folder / label,
                    args.recorded_only,
                    f"strategy={label}",
                ),
            )
            for label in ("none", "op")
        ]
        for budget in budgets:
            for name in BUDGETED:
                record = run(
                    model,
                    device,
                    args.repeat,
                    folder / f"{name}_{budget}",
                    args.recorded_only,
                    f"strategy={name}",
                    f"strategy.budget_mb={budget / MIB}",
                    *PLANNER_SETTINGS.get(name, ()),
                )
                jobs.append(Job(name, budget, record))
        lines += model_section(model, device, budgets, jobs, cost)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")  # what is done so far survives a stop
    print("\n".join(lines))


if __name__ == "__main__":
    main()
