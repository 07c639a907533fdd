"""Benchmark the fake device: how long a prediction takes, how much memory it needs, how exact it is.

    .venv/bin/python scripts/bench_predict.py                  # seed_llama7b cost; error on tiny, small
    .venv/bin/python scripts/bench_predict.py --error-models tiny small medium
    .venv/bin/python scripts/bench_predict.py --out scripts/results/bench_predict.md
    .venv/bin/python scripts/bench_predict.py --model llama3_8b --seq 8192 --precision bf16 \
        --strategies full --error-models llama_tiny mistral_tiny gpt2_tiny \
        --out scripts/results/bench_predict_llama3_8b.md

Cost: each case of `--model` (default seed_llama7b at its own seq 4096, batch 1) runs in a fresh
Python process, so its peak resident memory (ru_maxrss) is the prediction's own; the time (wall
and CPU) covers what a fake-device job computes (building the model, the step on fake tensors,
saved bytes, FLOPs with and without checkpointing), from a process that has already imported
torch. The command line's wall and CPU time and peak RSS, start-up included, are measured once
too, before anything else runs.

Error: for each model the same job is measured on the CPU (tensor tracker, after a warm-up step,
as `device=cpu` runs it) and predicted on fake tensors imagining the CPU; the difference is
reported in bytes, with the closed form's saved bytes beside both.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memexp.text import GIB, markdown_table  # noqa: E402

COST_STRATEGIES = ("none", "full", "sqrt")


def cost_overrides(args: argparse.Namespace) -> list[str]:
    """The cost model's workload as overrides: its own seq unless `--seq`, and the precision."""
    seq = [f"seq.len={args.seq}"] if args.seq else []
    return [f"model={args.model}", *seq, f"precision={args.precision}"]


def cli_command(args: argparse.Namespace) -> list[str]:
    return [
        *cost_overrides(args),
        "strategy=full",
        "device=fake",
        f"device.memory_gb={args.memory_gb}",
        "logger=none",
    ]


def spec_for(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    from memexp import CONF_DIR
    from memexp.configure import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)), cuda_available=False)


def predict_once(overrides: list[str], strategy: str) -> dict[str, Any]:
    """In this (fresh) process: predict the job under `strategy`, as a fake-device job does."""
    from memexp.estimate import predict_job, step_flops_without_checkpointing
    from memexp.strategies import make_plan

    spec = spec_for(*overrides, f"strategy={strategy}", "device=fake")
    plan = make_plan(spec)
    started, cpu_started = time.perf_counter(), time.process_time()
    prediction = predict_job(spec, plan)
    if plan.recomputes_anything:
        step_flops_without_checkpointing(spec)
    seconds = time.perf_counter() - started
    return {
        "strategy": strategy,
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu_started,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_bytes": prediction.memory.peak_bytes,
        "saved_activation_bytes": prediction.saved_activation_bytes,
        "tracked_ops": len(prediction.memory.timeline),
    }


def cost_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for strategy in args.strategies:
        child = subprocess.run(
            [sys.executable, __file__, *passed_on(args), "--predict-once", strategy],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return rows


def passed_on(args: argparse.Namespace) -> list[str]:
    """The options that say the cost model's workload, for a child process."""
    seq = ["--seq", str(args.seq)] if args.seq else []
    return ["--model", args.model, *seq, "--precision", args.precision]


def cli_cost(args: argparse.Namespace) -> dict[str, float]:
    """Wall and CPU seconds and peak RSS of the command line (run before any other child, so
    the children's peak RSS is its own)."""
    run_dir = Path(tempfile.mkdtemp(prefix="bench_predict_")) / "run"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "memexp", *cli_command(args), f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "seconds": wall,
        "cpu_seconds": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime,
        "max_rss_bytes": after.ru_maxrss * 1024,
        "load_after": os.getloadavg()[0],
    }


def error_row(model: str, strategy: str) -> dict[str, Any]:
    from memexp.estimate import predict
    from memexp.measure.memory import measure_memory
    from memexp.measure.timing import StoppingRule, time_steps
    from memexp.strategies import make_plan
    from memexp.training import build_workload

    spec = spec_for(f"model={model}", f"strategy={strategy}", "device=cpu")
    plan = make_plan(spec)
    predicted = predict(spec, plan, "cpu")
    work = build_workload(spec, plan, "cpu")
    measured_saved = time_steps(work, warmup=1, rule=StoppingRule.fixed(1)).saved_activation_bytes
    measured = measure_memory(work)
    return {
        "model": model,
        "strategy": strategy,
        "workload": f"{spec.seq_len}x{spec.batch_size}",
        "measured_peak": measured.peak_bytes,
        "predicted_peak": predicted.memory.peak_bytes,
        "peak_error": predicted.memory.peak_bytes - measured.peak_bytes,
        "breakdown_equal": predicted.memory.breakdown == measured.breakdown,
        "measured_saved": measured_saved,
        "predicted_saved": predicted.saved_activation_bytes,
        "closed_form_saved": closed_form_saved(spec, plan),
    }


def closed_form_saved(spec: Any, plan: Any) -> int | None:
    """The closed form's saved bytes; None where it has none (a real architecture's layer)."""
    from memexp import analytic
    from memexp.config import ConfigError

    try:
        return analytic.saved_activation_bytes(spec, plan)
    except ConfigError:
        return None


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    model_name = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        cpu,
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{model_name}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}; load average at start {load} "
        "(the machine is shared: times are noisy, bytes are not)"
    )


def markdown(
    args: argparse.Namespace,
    cost: list[dict[str, Any]],
    cli: dict[str, float],
    errors: list[dict[str, Any]],
) -> str:
    spec = spec_for(*cost_overrides(args), "device=fake")
    model = spec.model
    lines = [
        "# Fake-device prediction: cost and exactness",
        "",
        f"Machine: {machine()}.",
        "",
        f"Produced by `.venv/bin/python scripts/bench_predict.py {' '.join(sys.argv[1:])}`.",
        "",
        f"## Cost: {model.name} ({model.architecture} architecture, hidden {model.hidden}, "
        f"{model.layers} layers, vocab {model.vocab_size}), seq {spec.seq_len}, "
        f"batch {spec.batch_size}, {spec.precision}",
        "",
        "Each row is a fresh process; seconds exclude Python start-up and the imports before the "
        "model is built (a real architecture's `transformers` import is inside), peak RSS is the "
        "whole process. Predicted peak: fake tensors imagining CUDA's default code paths "
        "(multi-tensor Adam), fp32 weights, Adam.",
        "",
        markdown_table(
            (
                "strategy", "prediction s (wall)", "CPU s", "process peak RSS GiB", "ops tracked",
                "predicted peak GiB", "saved activations GiB",
            ),
            [
                (
                    row["strategy"], f"{row['seconds']:.1f}", f"{row['cpu_seconds']:.1f}",
                    f"{row['max_rss_bytes'] / GIB:.2f}",
                    f"{row['tracked_ops']:,}", f"{row['peak_bytes'] / GIB:.2f}",
                    f"{row['saved_activation_bytes'] / GIB:.2f}",
                )
                for row in cost
            ],
        ),
    ]  # fmt: skip
    lines += [
        "",
        f"Command line end to end (`python -m memexp {' '.join(cli_command(args))}`, start-up, "
        f"imports and record writing included): {cli['seconds']:.1f} s wall, "
        f"{cli['cpu_seconds']:.1f} s CPU, peak RSS {cli['max_rss_bytes'] / GIB:.2f} GiB "
        f"(load average {cli['load_after']:.2f} when it ended).",
        "",
        "## Exactness: predicted (fake tensors, imagining the CPU) against measured (CPU tracker)",
        "",
        "Bytes. `peak error` = predicted − measured; `breakdown` says whether every category "
        "at the peak (params, grads, optimizer state, activations, temporaries) is equal too.",
        "",
        markdown_table(
            (
                "model", "strategy", "seq×batch", "measured peak", "predicted peak", "peak error",
                "breakdown", "saved: measured", "saved: predicted", "saved: closed form",
            ),
            [
                (
                    row["model"], row["strategy"], row["workload"], f"{row['measured_peak']:,}",
                    f"{row['predicted_peak']:,}", f"{row['peak_error']:,}",
                    "equal" if row["breakdown_equal"] else "differs", f"{row['measured_saved']:,}",
                    f"{row['predicted_saved']:,}",
                    "—" if row["closed_form_saved"] is None else f"{row['closed_form_saved']:,}",
                )
                for row in errors
            ],
        ),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predict-once", metavar="STRATEGY", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="seed_llama7b", help="the model whose cost is measured")
    parser.add_argument("--seq", type=int, help="its sequence length (default: the preset's)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--memory-gb", default=141, type=float, help="the imagined device's GiB")
    parser.add_argument("--strategies", nargs="*", default=list(COST_STRATEGIES))
    parser.add_argument("--error-models", nargs="*", default=["tiny", "small"])
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    if args.predict_once:
        print(json.dumps(predict_once(cost_overrides(args), args.predict_once)))
        return
    cli = cli_cost(args)
    cost = cost_rows(args)
    errors = [error_row(m, s) for m in args.error_models for s in COST_STRATEGIES]
    report = markdown(args, cost, cli, errors)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
