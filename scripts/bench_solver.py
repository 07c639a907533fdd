"""How fast the adaptive planner solves, and what its per-unit choices buy against `op`.

    .venv/bin/python scripts/bench_solver.py                 # both parts
    .venv/bin/python scripts/bench_solver.py --skip-versus-op
    .venv/bin/python scripts/bench_solver.py --out scripts/results/bench_solver.md

Solver. The `small` layer in a 32-layer model, profiled on fake tensors (device=fake, the
H200 roofline) under adaptive's default options (the unit options and the layer's operator
choices), then `cheapest_within` at a ladder of budgets from the leanest plan's
forward+backward peak to `none`'s, and `leanest` once: CPU time (time.process_time, which the
other processes on a shared machine do not inflate) and wall time of each. Nothing is asserted:
the tests check the solver's answers (equal to exhaustive search), this checks its speed.

Versus op. `small` on the CPU as ordinary memexp jobs (memexp.runner.run_job: tensor tracker
peaks, FlopCounterMode FLOPs, timed steps): `op`, then `adaptive` with `op`'s measured
forward+backward peak as `strategy.budget_mb`, once with each cost source (the roofline of an
imagined CPU, deterministic; and each option's backward measured here). Per job: its measured
peak, its recompute FLOPs, the recompute time adaptive predicted for its plan and for op's
(every layer recomputed element-wise: `layer@save_matmuls`), and the backward's median time.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from memexp import CONF_DIR, planner  # noqa: E402
from memexp.configure import register_configs, validate  # noqa: E402
from memexp.results import SCOPE_FORWARD_BACKWARD, RunResult, read_result  # noqa: E402
from memexp.runner import run_job  # noqa: E402
from memexp.text import MIB, markdown_table  # noqa: E402

T = TypeVar("T")
LAYERS = 32
LADDER = 9  # budgets from the leanest plan's peak to none's


def compose_overrides(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def timed(run: Callable[[], T]) -> tuple[T, float, float]:
    """`run`'s result, its CPU seconds and its wall seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = run()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def solver_section() -> list[str]:
    spec = validate(
        compose_overrides("model=small", f"model.layers={LAYERS}", "device=fake", "logger=none"),
        cuda_available=False,
    )
    profile, profile_cpu, profile_wall = timed(
        lambda: planner.profile_step(spec, (), operator_choices=True)
    )
    scope = SCOPE_FORWARD_BACKWARD
    lean, lean_cpu, lean_wall = timed(lambda: planner.leanest(profile, scope))
    nothing = planner.predict(profile, ((),) * LAYERS).peak_in(scope)
    rows = [["leanest", f"{lean.peak_bytes / MIB:,.1f}", f"{lean.recompute_ps / 1e9:.3f}",
             f"{lean_cpu:.2f}", f"{lean_wall:.2f}"]]  # fmt: skip
    for step in range(LADDER):
        budget = lean.peak_bytes + (nothing - lean.peak_bytes) * step // (LADDER - 1)
        solution, cpu, wall = timed(lambda b=budget: planner.cheapest_within(profile, b, scope))
        rows.append(
            [
                f"{budget / MIB:,.1f}",
                f"{solution.peak_bytes / MIB:,.1f}",
                f"{solution.recompute_ps / 1e9:.3f}",
                f"{cpu:.2f}",
                f"{wall:.2f}",
            ]
        )
    useful = planner._useful_options(profile, with_cost=True)
    return [
        f"## Solver: `small`'s layer × {LAYERS}, {len(profile.options)} options per layer "
        f"({len(planner.OPTIONS)} unit options, the rest operator choices)",
        "",
        f"Profile (fake tensors, once per job): {profile_cpu:.1f} s CPU, {profile_wall:.1f} s "
        f"wall. Cost source: {profile.cost_source}. Options no other beats everywhere, "
        f"the ones the search extends: {len(useful)} "
        f"({', '.join(planner.option_name(o) for o in useful)}).",
        "",
        markdown_table(
            ["budget (MiB)", "predicted peak (MiB)", "recompute (ms)", "CPU s", "wall s"], rows
        ),
        "",
    ]


def run(job_dir: Path, *overrides: str) -> RunResult:
    cfg = compose_overrides("model=small", "device=cpu", "logger=none", *overrides)
    run_job(cfg, job_dir, {"overrides": list(overrides)})
    return read_result(job_dir)


def versus_op_section(out_dir: Path) -> list[str]:
    op = run(out_dir / "op", "strategy=op")
    budget_mb = op.forward_backward_peak_bytes / MIB
    jobs = {"op": op}
    for source in ("roofline", "measured"):
        jobs[f"adaptive, {source} cost"] = run(
            out_dir / f"adaptive_{source}",
            "strategy=adaptive",
            f"strategy.budget_mb={budget_mb!r}",
            f"strategy.cost_source={source}",
        )
    rows = []
    for name, record in jobs.items():
        extra = record.extra.get("adaptive", {})
        op_ms = extra.get("option_recompute_ms", {}).get("layer@save_matmuls")
        rows.append(
            [
                name,
                record.status,
                f"{record.forward_backward_peak_bytes / MIB:,.3f}",
                f"{record.flops_recompute:,}",
                "-" if not extra else f"{extra['predicted_recompute_ms']:.3f}",
                "-" if op_ms is None else f"{op_ms * record.plan.num_layers:.3f}",
                f"{record.backward_ms_median:.1f}",
                " ".join(extra.get("plan_layers", [])) or record.plan_summary,
            ]
        )
    return [
        f"## Versus op on `small` (CPU), budget = op's measured peak {budget_mb:,.3f} MiB",
        "",
        markdown_table(
            [
                "job",
                "status",
                "fwd+bwd peak (MiB, tracker)",
                "recompute FLOPs",
                "predicted recompute (ms)",
                "op's plan predicted (ms)",
                "backward median (ms)",
                "plan",
            ],
            rows,
        ),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results/bench_solver.md")
    parser.add_argument("--skip-versus-op", action="store_true")
    args = parser.parse_args()
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    lines = [
        "# bench_solver",
        "",
        f"Run {started} on {platform.machine()} with {os.cpu_count()} CPUs; load average at "
        f"start {', '.join(f'{v:.2f}' for v in load)} (a shared machine: wall times stretch "
        "with other processes' load, CPU times much less).",
        "",
        *solver_section(),
    ]
    if not args.skip_versus_op:
        lines += versus_op_section(ROOT / "outputs" / "bench_solver")
    lines.append(f"Load average at the end {', '.join(f'{v:.2f}' for v in os.getloadavg())}.")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
