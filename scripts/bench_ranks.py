"""Benchmark the measurement across processes: each parallel mode measured on two gloo ranks on
this machine, against its fake-device prediction.

    .venv/bin/python scripts/bench_ranks.py                        # tiny and small, every mode
    .venv/bin/python scripts/bench_ranks.py --models tiny --modes fsdp
    .venv/bin/python scripts/bench_ranks.py --out scripts/results/bench_ranks.md

For each model and mode the job is measured as `device=cpu parallel=<mode>
parallel.world_size=2` measures it (two spawned ranks, one timed step, the tracked memory step in
every rank) and predicted as `device=fake device.imagine=cpu` predicts it (rank 0 on a fake
process group). Reported: every rank's step peak, the prediction's, their difference in bytes,
whether the whole breakdown and every phase agree, and the wall time of the measured job with
the load average around it (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("fsdp", "zero2", "zero1", "ddp")
QUICK = ("measure.repeat=1", "measure.max_time_s=0.01", "logger=none")


def spec_for(*overrides: str) -> Any:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from memexp import CONF_DIR
    from memexp.configure import register_configs, validate

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=list(overrides)), cuda_available=False)


def compare(model: str, mode: str, world_size: int) -> list[Any]:
    """One table row: measured ranks against the prediction of rank 0."""
    from memexp.estimate import predict_job
    from memexp.measure.memory import rank_figures
    from memexp.measure.step import measure_on_ranks
    from memexp.strategies import make_plan

    job = (f"model={model}", f"parallel={mode}", f"parallel.world_size={world_size}", *QUICK)
    measured_spec = spec_for("device=cpu", *job)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    measured = measure_on_ranks(measured_spec, make_plan(measured_spec), "gloo").memory
    wall_s = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    predicted_spec = spec_for("device=fake", "device.imagine=cpu", *job)
    predicted = predict_job(predicted_spec, make_plan(predicted_spec)).memory
    first = measured.ranks[0]
    return [
        model,
        mode,
        " / ".join(f"{rank['peak_bytes']:,}" for rank in measured.ranks),
        f"{predicted.peak_bytes:,}",
        f"{predicted.peak_bytes - first['peak_bytes']:+,}",
        "yes" if first == rank_figures(predicted) else "no",
        "yes" if measured.phase_bytes == predicted.phase_bytes else "no",
        f"{wall_s:.0f}",
        f"{load_before:.1f} → {load_after:.1f}",
    ]


def main(argv: list[str] | None = None) -> None:
    from memexp.text import markdown_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    headers = [
        "model",
        "mode",
        "measured peak per rank (bytes)",
        "predicted rank 0 peak",
        "predicted − measured rank 0",
        "breakdown equal",
        "phases equal",
        "measured wall s",
        "load avg",
    ]
    rows = []
    for model in args.models:
        for mode in args.modes:
            rows.append(compare(model, mode, args.world_size))
            print(" | ".join(rows[-1]), flush=True)
    import torch

    text = (
        f"# Measured across {args.world_size} gloo ranks vs predicted (`scripts/bench_ranks.py`)\n\n"
        f"{platform.node()}: {os.cpu_count()} CPU(s), torch {torch.__version__}, "
        f"python {platform.python_version()}.\n\n{markdown_table(headers, rows)}\n"
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
