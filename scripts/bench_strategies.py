"""Benchmark every checkpointing strategy side by side on the seed's small and medium models.

    .venv/bin/python scripts/bench_strategies.py                       # small and medium, 3 repeats
    .venv/bin/python scripts/bench_strategies.py --models small --repeat 5
    .venv/bin/python scripts/bench_strategies.py --out scripts/results/bench_strategies.md

Each strategy runs as one ordinary memexp job (`memexp.runner.run_job`, device=cpu, fp32,
Adam), so every figure is the job's own record (kept under outputs/bench_strategies/):
saved activations (saved-tensor hooks), the step's peak (tensor tracker), recompute FLOPs
(FlopCounterMode on fake tensors, matmuls only) and step time (median of `--repeat` timed
steps after one warm-up). Time overhead is the ratio of medians against `none`; its range
pairs each job's fastest step with `none`'s slowest and the reverse, so it shows the noise.

Closed-form columns. "analytic saved" is memexp's own derivation of the bytes autograd keeps
(`memexp.analytic.saved_activation_bytes`, recorded by every job as
`extra.analytic_saved_activation_bytes`); an op-level policy has no closed form there, so its
row shows "-". The recompute columns are a reference, not memexp's model: the FLOP counting of
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models")
applied to this architecture's units: the recomputed units' forward FLOPs over the step's
3 × forward FLOPs (per layer 24·sbh² + 4·b·s²·h, head 2·sbhV), one extra forward of the layers
for `full`. Measured recompute is lower: non-reentrant checkpointing stops once every saved
tensor is back, so each checkpoint's last matmul, whose output nothing inside it saves, is not
redone; the "early stop" column subtracts exactly that.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from memexp import CONF_DIR  # noqa: E402
from memexp.config import ModelConfig  # noqa: E402
from memexp.configure import register_configs  # noqa: E402
from memexp.plan import CheckpointPlan, Part  # noqa: E402
from memexp.results import STATUS_OK, RunResult, read_result  # noqa: E402
from memexp.runner import run_job  # noqa: E402
from memexp.sweepdir import RESULT_FILE  # noqa: E402
from memexp.text import MIB, markdown_table  # noqa: E402

# (label, overrides): every strategy, and the variants of those that have them.
VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("none", ("strategy=none",)),
    ("full", ("strategy=full",)),
    ("full sublayer", ("strategy=full", "strategy.granularity=sublayer")),
    ("sqrt", ("strategy=sqrt",)),
    ("selective attention_core", ("strategy=selective",)),
    ("selective attention", ("strategy=selective", "strategy.part=attention")),
    ("selective ffn", ("strategy=selective", "strategy.part=ffn")),
    ("every_n n=2", ("strategy=every_n", "strategy.n=2")),
    ("op save_matmuls", ("strategy=op",)),
    ("offload", ("strategy=offload",)),
    ("compress int8", ("strategy=compress", "strategy.dtype=int8")),
    ("adaptive ratio 0.5", ("strategy=adaptive",)),
)


@dataclass(frozen=True)
class Shape:
    b: int
    s: int
    h: int
    a: int
    f: int
    vocab: int
    layers: int

    @property
    def sbh(self) -> int:
        return self.s * self.b * self.h


def shape_of(record: RunResult, model: ModelConfig) -> Shape:
    return Shape(
        record.batch_size,
        record.seq_len,
        model.hidden,
        model.heads,
        model.ffn_hidden,
        model.vocab_size,
        model.layers,
    )


def reference_recompute_pct(x: Shape, plan: CheckpointPlan, early_stop: bool) -> float | None:
    """Korthikanti et al.'s FLOP counting: forward FLOPs of the recomputed units, % of the
    step's; with `early_stop`, less each checkpoint's last matmul (·V for the core, the output
    projection for the attention block, the down projection for the FFN block, a layer or a
    segment). None for a plan that keeps chosen operator outputs inside a unit (its own list, or
    an op-level policy on some units): the counting has no term for that."""
    core = 4 * x.b * x.s * x.s * x.h  # QKᵀ and ·V
    attention = 8 * x.sbh * x.h + core
    ffn = 4 * x.sbh * x.f
    layer = attention + ffn
    step = 3 * (x.layers * layer + 2 * x.sbh * x.vocab)
    unit = {Part.ATTENTION_CORE: core, Part.ATTENTION: attention, Part.FFN: ffn}
    last = {Part.ATTENTION_CORE: core // 2, Part.ATTENTION: 2 * x.sbh * x.h, Part.FFN: ffn // 2}
    if not early_stop:
        last = dict.fromkeys(last, 0)
    if plan.op_policy is not None:
        return 0.0  # every matmul is kept; FLOPs are counted for matmuls only
    if plan.saved_ops or plan.selective:
        return None
    recomputed = sum((end - start) * layer - last[Part.FFN] for start, end in plan.segments)
    recomputed += sum(unit[part] - last[part] for _, part in plan.parts)
    return 100.0 * recomputed / step


def compose_overrides(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def run_variant(model: str, overrides: tuple[str, ...], repeat: int, job_dir: Path) -> RunResult:
    """The job's record: read where the folder already holds one (`--resume`), else run."""
    if (job_dir / RESULT_FILE).exists():
        return read_result(job_dir)
    cfg = compose_overrides(
        f"model={model}", *overrides, "device=cpu", "logger=none", f"measure.repeat={repeat}"
    )
    run_job(cfg, job_dir, {"overrides": [f"model={model}", *overrides]})
    return read_result(job_dir)


def mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:,.1f}"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def overhead(job: RunResult, baseline: RunResult) -> str:
    if job.step_ms_median is None or baseline.step_ms_median is None:
        return "-"
    median = 100.0 * (job.step_ms_median / baseline.step_ms_median - 1)
    low = 100.0 * (job.step_ms_min / baseline.step_ms_max - 1)
    high = 100.0 * (job.step_ms_max / baseline.step_ms_min - 1)
    return f"{median:+.0f} [{low:+.0f}, {high:+.0f}]"


def model_table(model: str, rows: list[tuple[str, RunResult]], config: ModelConfig) -> list[str]:
    baseline = next(record for label, record in rows if label == "none")
    headers = (
        "strategy", "saved act MiB", "analytic saved MiB", "step peak MiB", "fwd+bwd peak MiB",
        "recompute FLOPs %",
        "reference recompute %", "reference, early stop %", "step ms median [min–max]",
        "time overhead % vs none [range]",
    )  # fmt: skip
    table: list[tuple[object, ...]] = []
    notes = []
    for label, record in rows:
        if record.status != STATUS_OK:
            table.append((label, record.status, *[""] * (len(headers) - 2)))
            notes.append(f"- {label}: {record.status} — {record.message}")
            continue
        plan = record.plan
        shape = shape_of(record, config)
        step = f"{record.step_ms_median:,.0f} [{record.step_ms_min:,.0f}–{record.step_ms_max:,.0f}]"
        table.append(
            (
                label,
                mib(record.saved_activation_bytes),
                mib(record.extra.get("analytic_saved_activation_bytes")),
                mib(record.peak_bytes),
                mib(record.forward_backward_peak_bytes),
                f"{record.recompute_flops_pct:.1f}",
                pct(reference_recompute_pct(shape, plan, False)),
                pct(reference_recompute_pct(shape, plan, True)),
                step,
                overhead(record, baseline),
            )
        )
        if "adaptive" in record.extra:
            adaptive = record.extra["adaptive"]
            notes.append(
                f"- {label}: budget {mib(adaptive['budget_bytes'])} MiB ({adaptive['budget_rule']}); "
                f"plan {record.plan_summary}; predicted peak {mib(adaptive['predicted_peak_bytes'])} "
                f"MiB at the {adaptive['predicted_peak_at']}, measured "
                f"{mib(adaptive['measured_peak_bytes'])} MiB ({adaptive['budget_scope']}); "
                f"{len(adaptive['rounds'])} plan(s); planning (profile, unit timings, solve) "
                f"{adaptive['planning_s']:.1f} s of a {record.duration_s:.0f} s job"
            )
        if plan.op_policy is not None:
            notes.append(
                f"- {label}: saved act counts what saved-tensor hooks see; the matmul outputs "
                "the policy keeps are cached by the selective-checkpoint context, not saved "
                "through the hooks, so the figure leaves them out (the peak includes them)"
            )
    title = (
        f"## {model}: hidden {config.hidden}, {config.layers} layers, {config.heads} heads, "
        f"vocabulary {config.vocab_size}, seq {baseline.seq_len} × batch {baseline.batch_size}"
    )
    return [title, "", markdown_table(headers, table), "", *notes, ""]


def machine_lines(repeat: int, started: str, load: tuple[float, ...]) -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    return [
        f"Machine: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}; started {started}; "
        f"load average at start {', '.join(f'{v:.2f}' for v in load)}. The machine is shared "
        f"with other work: times are noisy (few repeats: {repeat} timed steps after 1 warm-up "
        "per job), bytes and FLOPs are not. A negative overhead, or a range far wider than "
        "the median, means other processes' load changed between jobs: compare those rows "
        "by FLOPs, not time.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["small", "medium"])
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per job")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results/bench_strategies.md")
    parser.add_argument(
        "--resume", type=Path, help="an earlier run's folder: its recorded jobs are read, not rerun"
    )
    args = parser.parse_args()

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load = os.getloadavg()
    root = args.resume or ROOT / "outputs" / "bench_strategies" / started.replace(":", "-")
    if args.resume:
        started = f"{root.name} (jobs run then; tabled {started})"
    lines = [
        "# Checkpointing strategies side by side",
        "",
        *machine_lines(args.repeat, started, load),
        "",
        f"Produced by `.venv/bin/python scripts/bench_strategies.py "
        f"--models {' '.join(args.models)} --repeat {args.repeat}`; the job records are in "
        "outputs/bench_strategies/. Device cpu, fp32, Adam. saved act: bytes autograd keeps "
        "for backward (saved-tensor hooks); step peak: the whole step's peak (tensor tracker, "
        "parameters, gradients and optimizer state included); fwd+bwd peak: the peak over "
        "forward, loss and backward, where checkpointing acts; recompute FLOPs: % of the step "
        "without checkpointing (FlopCounterMode, matmuls only); analytic: memexp.analytic's "
        "closed form; reference: Korthikanti et al. 2022's FLOP counting (see the script's "
        "docstring).",
        "",
    ]
    for model in args.models:
        rows = []
        for label, overrides in VARIANTS:
            began = time.monotonic()
            record = run_variant(
                model, overrides, args.repeat, root / model / label.replace(" ", "_")
            )
            print(
                f"[bench] {model} {label}: {record.status} in {time.monotonic() - began:.0f} s",
                flush=True,
            )
            rows.append((label, record))
        config = OmegaConf.to_object(compose_overrides(f"model={model}").model)
        lines += model_table(model, rows, config)
    finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines.append(
        f"Finished {finished}; load average at the end "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
