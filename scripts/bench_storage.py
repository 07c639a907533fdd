"""Saved-tensor storage side by side: compression measured on the CPU, offloading measured and
predicted.

    .venv/bin/python scripts/bench_storage.py                      # small, 1 timed step a job
    .venv/bin/python scripts/bench_storage.py --model small --repeat 3
    .venv/bin/python scripts/bench_storage.py --out scripts/results/bench_storage.md

Every row is one ordinary memexp job (`memexp.runner.run_job`, fp32, Adam), so each figure is
the job's own record (kept under outputs/bench_storage/). Measured rows (device=cpu): saved
bytes as stored (saved-tensor hooks packing with the storage), the forward+backward peak
(tensor tracker), the gradients' relative error against the same step stored as made, and the
storage's own pack/unpack time per step (compression kernels; disk writes and reads).
Predicted rows (device=fake, imagining the default H200): the same bytes on fake tensors and
offloading's transfer time at device.host_gbps / device.disk_gbps (closed form from
fake-tensor bytes, not overlapped with compute).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from memexp import CONF_DIR  # noqa: E402
from memexp.configure import register_configs  # noqa: E402
from memexp.results import STATUS_OK, RunResult, read_result  # noqa: E402
from memexp.runner import run_job  # noqa: E402
from memexp.text import MIB, markdown_table  # noqa: E402

MEASURED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("none", ("strategy=none",)),
    ("compress int8", ("strategy=compress", "strategy.dtype=int8")),
    ("compress fp8", ("strategy=compress", "strategy.dtype=fp8")),
    ("compress bf16", ("strategy=compress", "strategy.dtype=bf16")),
    ("compress int8 on full", ("strategy=compress", "strategy.base=full")),
    ("offload to disk", ("strategy=offload", "strategy.to=disk")),
)
PREDICTED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("none", ("strategy=none",)),
    ("offload to host", ("strategy=offload", "strategy.to=host")),
    ("offload to disk", ("strategy=offload", "strategy.to=disk")),
    ("compress int8", ("strategy=compress",)),
)


def run(
    model: str, overrides: tuple[str, ...], device: tuple[str, ...], job_dir: Path
) -> RunResult:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={model}", *overrides, *device, "logger=none"])
    run_job(cfg, job_dir, {"overrides": [f"model={model}", *overrides, *device]})
    return read_result(job_dir)


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:,.2f}"


def pct(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f} %"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def measured_table(rows: list[tuple[str, RunResult]]) -> str:
    baseline = rows[0][1].saved_activation_bytes
    body = []
    for label, record in rows:
        if record.status != STATUS_OK:
            body.append([label, record.status, *["-"] * 7])
            continue
        extra, saved = record.extra, record.saved_activation_bytes
        body.append(
            [
                label,
                mib(saved),
                pct(saved / baseline, 1) if saved is not None and baseline else "-",
                mib(record.forward_backward_peak_bytes),
                f"{record.loss_first_step:.6f}",
                pct(extra.get("storage_grad_rel_error"), 3),
                pct(extra.get("storage_grad_rel_error_worst"), 3)
                + (
                    f" ({extra['storage_grad_rel_error_worst_parameter']})"
                    if "storage_grad_rel_error_worst_parameter" in extra
                    else ""
                ),
                ms(extra.get("storage_pack_ms")),
                ms(extra.get("storage_unpack_ms")),
            ]
        )
    headers = [
        "storage",
        "saved MiB",
        "of none's",
        "fwd+bwd peak MiB",
        "loss",
        "grad rel. error",
        "worst parameter",
        "pack ms/step",
        "unpack ms/step",
    ]
    return markdown_table(headers, body)


def predicted_table(rows: list[tuple[str, RunResult]]) -> str:
    body = []
    for label, record in rows:
        extra = record.extra
        links = extra.get("storage_transfer_links")
        body.append(
            [
                label,
                mib(record.saved_activation_bytes),
                mib(record.forward_backward_peak_bytes),
                mib(extra.get("offloaded_host_peak_bytes")),
                mib(extra.get("storage_transfer_out_bytes")),
                ms(extra.get("storage_transfer_out_ms")),
                ms(extra.get("storage_transfer_back_ms")),
                " then ".join(f"{name} {gbps:g} GB/s" for name, gbps in links.items())
                if links
                else "-",
            ]
        )
    headers = [
        "plan",
        "saved MiB",
        "fwd+bwd peak MiB",
        "host peak MiB",
        "moved MiB a way",
        "out ms",
        "back ms",
        "links",
    ]
    return markdown_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--predict", nargs="+", default=["small", "medium", "llama7b"])
    parser.add_argument("--repeat", type=int, default=1, help="timed steps per measured job")
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/results/bench_storage.md")
    args = parser.parse_args()

    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load = os.getloadavg()
    root = ROOT / "outputs" / "bench_storage" / started.replace(":", "-")
    cpu = ("device=cpu", f"measure.repeat={args.repeat}", "measure.max_time_s=0.01")
    measured = [
        (label, run(args.model, overrides, cpu, root / f"cpu-{index}"))
        for index, (label, overrides) in enumerate(MEASURED)
    ]
    predicted = {
        model: [
            (label, run(model, overrides, ("device=fake",), root / f"fake-{model}-{index}"))
            for index, (label, overrides) in enumerate(PREDICTED)
        ]
        for model in args.predict
    }
    lines = [
        "# Saved-tensor storage: compression and offload",
        "",
        f"Produced by `.venv/bin/python scripts/bench_storage.py --model {args.model} "
        f"--predict {' '.join(args.predict)} --repeat {args.repeat}`; started {started}, load "
        f"average at start {', '.join(f'{v:.2f}' for v in load)} on {os.cpu_count()} cores "
        "(shared: times are noisy, bytes and errors are not). Job records in outputs/bench_storage/.",
        "",
        f"## Measured on the CPU: `{args.model}`, fp32, Adam",
        "",
        "Saved MiB as stored (compressed data and scales; offloaded tensors counted where they "
        "are made). Gradient error: ‖g − g_ref‖/‖g_ref‖ of one step against the same step "
        "stored as made (same seed and batch); the loss is the same by construction (the "
        "forward is unchanged). Pack/unpack: the storage's own time per step.",
        "",
        measured_table(measured),
        "",
        "## Predicted on fake tensors (imagining the default H200)",
        "",
        "Transfer time = bytes / bandwidth each way (closed form from fake-tensor bytes), not "
        "overlapped with compute: copies run on the compute stream, files are written when "
        "saved and read when needed.",
        "",
    ]
    for model, rows in predicted.items():
        lines += [f"### `{model}`", "", predicted_table(rows), ""]
    args.out.write_text("\n".join(lines))
    print(args.out.read_text())


if __name__ == "__main__":
    main()
