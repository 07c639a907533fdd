"""Benchmark the fake device: how long a prediction takes, how much memory it needs, how exact it is.

    .venv/bin/python scripts/bench_predict.py                  # llama7b cost; error on tiny, small
    .venv/bin/python scripts/bench_predict.py --error-models tiny small medium
    .venv/bin/python scripts/bench_predict.py --out scripts/results/bench_predict.md

Cost: each llama7b case (seq 4096, batch 1) runs in a fresh Python process, so its peak
resident memory (ru_maxrss) is the prediction's own; the time covers what a fake-device job
computes (the step on fake tensors, saved bytes, FLOPs with and without checkpointing), from a
process that has already imported torch. The command line's wall time, start-up included, is
measured once too.

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
CLI = ("model=llama7b", "strategy=full", "device=fake", "device.memory_gb=141", "logger=none")


def spec_for(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir

    from memexp import CONF_DIR
    from memexp.configure import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)), cuda_available=False)


def predict_once(strategy: str) -> dict[str, Any]:
    """In this (fresh) process: predict llama7b under `strategy`, as a fake-device job does."""
    from memexp.estimate import predict_job, step_flops_without_checkpointing
    from memexp.strategies import make_plan

    spec = spec_for("model=llama7b", f"strategy={strategy}", "device=fake")
    plan = make_plan(spec)
    started = time.perf_counter()
    prediction = predict_job(spec, plan)
    if plan.recomputes_anything:
        step_flops_without_checkpointing(spec)
    seconds = time.perf_counter() - started
    return {
        "strategy": strategy,
        "seconds": seconds,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_bytes": prediction.memory.peak_bytes,
        "saved_activation_bytes": prediction.saved_activation_bytes,
        "tracked_ops": len(prediction.memory.timeline),
    }


def cost_rows() -> list[dict[str, Any]]:
    rows = []
    for strategy in COST_STRATEGIES:
        child = subprocess.run(
            [sys.executable, __file__, "--predict-once", strategy],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    return rows


def cli_seconds() -> float:
    run_dir = Path(tempfile.mkdtemp(prefix="bench_predict_")) / "run"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "memexp", *CLI, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - started


def error_row(model: str, strategy: str) -> dict[str, Any]:
    from memexp import analytic
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
        "closed_form_saved": analytic.saved_activation_bytes(spec, plan),
    }


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


def markdown(cost: list[dict[str, Any]], cli: float, errors: list[dict[str, Any]]) -> str:
    lines = [
        "# Fake-device prediction: cost and exactness",
        "",
        f"Machine: {machine()}.",
        "",
        "Produced by `.venv/bin/python scripts/bench_predict.py`.",
        "",
        "## Cost: llama7b (hidden 4096, 32 layers, vocab 32000), seq 4096, batch 1",
        "",
        "Each row is a fresh process; seconds exclude Python start-up and imports, peak RSS is the "
        "whole process. Predicted peak: fake tensors imagining CUDA's default code paths "
        "(multi-tensor Adam), fp32, Adam.",
        "",
        markdown_table(
            (
                "strategy", "prediction s", "process peak RSS GiB", "ops tracked",
                "predicted peak GiB", "saved activations GiB",
            ),
            [
                (
                    row["strategy"], f"{row['seconds']:.1f}", f"{row['max_rss_bytes'] / GIB:.2f}",
                    f"{row['tracked_ops']:,}", f"{row['peak_bytes'] / GIB:.2f}",
                    f"{row['saved_activation_bytes'] / GIB:.2f}",
                )
                for row in cost
            ],
        ),
    ]  # fmt: skip
    lines += [
        "",
        f"Command line end to end (`python -m memexp {' '.join(CLI)}`, start-up, imports and "
        f"record writing included): {cli:.1f} s wall.",
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
                    f"{row['predicted_saved']:,}", f"{row['closed_form_saved']:,}",
                )
                for row in errors
            ],
        ),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predict-once", metavar="STRATEGY", help=argparse.SUPPRESS)
    parser.add_argument("--error-models", nargs="*", default=["tiny", "small"])
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    args = parser.parse_args()
    if args.predict_once:
        print(json.dumps(predict_once(args.predict_once)))
        return
    cost = cost_rows()
    cli = cli_seconds()
    errors = [error_row(m, s) for m in args.error_models for s in COST_STRATEGIES]
    report = markdown(cost, cli, errors)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
