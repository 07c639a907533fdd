"""scripts/gpu_check.py: it refuses at once without CUDA, plans its budgets by the rules it states,
and its report computes every error from the records it is given.

The fake-tensor figures below are copied from real `device=fake` runs on this project (small:
256×4, medium: 512×2, fp32, Adam, imagine=cuda; the batch=auto workload: small at 2048×1 and
2048×2); the allocator figures beside them are made up, chosen so the errors come out round.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from memexp.results import RunResult
from memexp.text import MIB

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()

# device=fake, model=small, fp32: none and full; model=medium fp32 none.
SMALL_NONE_PREDICTED = {
    "peak_bytes": 741_314_024,
    "phase_bytes": {
        "after_setup": 362_472_928,
        "forward_peak": 700_354_024,
        "backward_peak": 741_314_024,
        "optimizer_peak": 604_110_432,
        "after_step": 362_472_928,
    },
}
SMALL_FULL_PREDICTED_PEAK = 604_110_432
MEDIUM_NONE_PREDICTED = {
    "peak_bytes": 3_883_957_416,
    "phase_bytes": {
        "after_setup": 2_330_381_224,
        "forward_peak": 3_710_778_288,
        "backward_peak": 3_792_698_288,
        "optimizer_peak": 3_883_957_416,
        "after_step": 2_330_381_224,
    },
}
# The batch=auto workload (small, seq 2048) on fake tensors at batch 1 and 2.
AUTO_PREDICTED_PEAKS = {1: 1_831_309_864, 2: 3_287_180_776}


def record(
    model: str, precision: str, strategy: str, status: str = "ok", **fields: Any
) -> RunResult:
    return RunResult(status=status, model=model, precision=precision, strategy=strategy, **fields)


def predicted(model: str, strategy: str, figures: dict[str, Any]) -> RunResult:
    return record(model, "fp32", strategy, device="fake", memory_source="fake_tensors", **figures)


def measured(
    model: str, strategy: str, peak: int, reserved: int, phases: dict[str, int], **extra: Any
) -> RunResult:
    # Through from_dict, as a newer record would be read: unknown fields land in `extra`.
    return RunResult.from_dict(
        {
            "status": "ok",
            "model": model,
            "precision": "fp32",
            "strategy": strategy,
            "device": "cuda",
            "memory_source": "cuda_allocator",
            "peak_bytes": peak,
            "peak_reserved_bytes": reserved,
            "phase_bytes": phases,
            "environment": {"torch": "2.6.0+cu124", "cuda": "12.4", "device_name": "NVIDIA H200"},
            **extra,
        }
    )


def sweep(name: str, role: str, records: list[RunResult], expected: int, **fields: Any) -> Any:
    return gpu_check.Sweep(
        name=name,
        role=role,
        overrides=["model=small"],
        expected_jobs=expected,
        folder=Path("/tmp") / name,
        returncode=0,
        wall_s=12.0,
        records=records,
        **fields,
    )


def minus_mib(phases: dict[str, int], count: int) -> dict[str, int]:
    return {k: v - count * MIB for k, v in phases.items()}


def check_run() -> Any:
    """Small and medium fp32 `none` measured and predicted, an offload job, one batch=auto job,
    two adaptive jobs; everything else in the grid has no record."""
    small_measured = measured(
        "small",
        "none",
        peak=SMALL_NONE_PREDICTED["peak_bytes"] - 20 * MIB,  # 720,342,504
        reserved=780 * MIB,
        phases=minus_mib(SMALL_NONE_PREDICTED["phase_bytes"], 20),
        forward_backward_peak_bytes=700 * MIB,
    )
    medium_measured = measured(
        "medium",
        "none",
        peak=MEDIUM_NONE_PREDICTED["peak_bytes"] + 64 * MIB,  # 3,951,066,280
        reserved=3_900 * MIB,
        phases=minus_mib(MEDIUM_NONE_PREDICTED["phase_bytes"], -64),
    )
    offload = measured(
        "small",
        "offload",
        peak=650 * MIB,
        reserved=700 * MIB,
        phases={**small_measured.phase_bytes, "forward_peak": 430_000_000},
    )
    auto = record(
        "small",
        "fp32",
        "none",
        device="cuda",
        batch_size=95,
        peak_bytes=139 * 2**30,
        peak_reserved_bytes=140 * 2**30,
        memory_source="cuda_allocator",
        extra={
            "auto_batch_budget_bytes": 148_146_336_520,
            "auto_batch_probes": [[1, 1], [2, 2], [4, 4]],
            "auto_batch_size": 97,
            "auto_batch_predicted_peak_bytes": 141_594_916_816,
            "auto_batch_backoffs": 2,
        },
    )
    budget = 641_548_800  # 611.8 MiB
    within = record(
        "small",
        "fp32",
        "adaptive",
        peak_bytes=600 * MIB,
        extra={
            "adaptive": {"budget_bytes": budget, "rounds": [{"measured_peak_bytes": 600 * MIB}]}
        },
    )
    over = {"planning_budget_bytes": 3_704 * MIB, "predicted_peak_bytes": 3_703 * MIB}
    infeasible = record(
        "medium",
        "fp32",
        "adaptive",
        status="infeasible",
        job_num=0,
        message="no plan fits the budget of 3704.0 MiB (tightened by 60.0 MiB)",
        peak_bytes=3_764 * MIB,
        extra={
            "adaptive": {
                "budget_bytes": 3_704 * MIB,
                "rounds": [{**over, "measured_peak_bytes": 3_764 * MIB}],
            }
        },
    )
    return gpu_check.CheckRun(
        command="python scripts/gpu_check.py",
        started_at="2026-12-02 10:00 UTC",
        wall_s=301.4,
        device={"torch": "2.6.0+cu124", "cuda": "12.4", "device_name": "NVIDIA H200"},
        sweeps=[
            sweep("measured-small-fp32", gpu_check.MEASURED, [small_measured, offload], 8),
            sweep(
                "measured-medium-fp32",
                gpu_check.MEASURED,
                [medium_measured],
                8,
                stopped=True,
                deadline_s=330.0,
            ),
            sweep(
                "predicted-small-fp32",
                gpu_check.PREDICTED,
                [predicted("small", "none", SMALL_NONE_PREDICTED)],
                8,
            ),
            sweep(
                "predicted-medium-fp32",
                gpu_check.PREDICTED,
                [predicted("medium", "none", MEDIUM_NONE_PREDICTED)],
                8,
            ),
            sweep("adaptive-small", gpu_check.ADAPTIVE, [within], 1),
            sweep("adaptive-medium", gpu_check.ADAPTIVE, [infeasible], 1),
            sweep("auto", gpu_check.AUTO, [auto], 1, note="budget 137.972 GiB: as planned"),
        ],
    )


def row_of(report: str, start: str) -> str:
    (line,) = [line for line in report.splitlines() if line.startswith(start)]
    return line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_it_exits_at_once_saying_nothing_was_checked(tmp_path: Path) -> None:
    out, work = tmp_path / "report.md", tmp_path / "work"
    child = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--work-dir", str(work)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == gpu_check.EXIT_NOTHING_CHECKED == 3
    (line,) = child.stderr.strip().splitlines()
    assert line.startswith("gpu_check: nothing was checked: ")
    assert not out.exists() and not work.exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_a_torch_without_cuda_is_asked_and_nothing_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        gpu_check, "cuda_driver_problem", lambda: None
    )  # as on a machine with a driver
    code = gpu_check.main(
        ["--out", str(tmp_path / "report.md"), "--work-dir", str(tmp_path / "work")]
    )
    assert code == gpu_check.EXIT_NOTHING_CHECKED
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        f"gpu_check: nothing was checked: torch {torch.__version__} sees no CUDA device "
        f"(built for CUDA: {torch.version.cuda or 'no'})"
    )


def test_adaptive_budgets_lie_midway_between_and_at_the_predicted_peaks(tmp_path: Path) -> None:
    records = [
        predicted("small", "none", SMALL_NONE_PREDICTED),
        predicted("small", "full", {"peak_bytes": SMALL_FULL_PREDICTED_PEAK}),
        predicted("medium", "none", MEDIUM_NONE_PREDICTED),
    ]
    sweeps, notes = gpu_check.adaptive_sweeps(records, tmp_path)
    (small,) = sweeps
    # midway: (741,314,024 + 604,110,432) / 2 / 2^20 = 641.548 → 641.5; full: 576.125 → 576.1
    assert "strategy.budget_mb=576.1,641.5" in small.overrides
    assert "device=cuda" in small.overrides and small.expected_jobs == 2
    assert notes == [
        "adaptive on medium not run: no fake-tensor prediction of `none` and `full` (fp32) "
        "to set its budgets from"
    ]


def test_auto_budget_lets_the_prediction_pick_two_samples_more_than_fit(tmp_path: Path) -> None:
    fake = gpu_check.batch_line(
        [
            record("small", "fp32", "none", batch_size=b, peak_bytes=p)
            for b, p in AUTO_PREDICTED_PEAKS.items()
        ]
    )
    # 3,287,180,776 − 1,831,309,864 = 1,455,870,912 a sample; 375,438,952 fixed
    assert fake == gpu_check.Line(fixed=375_438_952, per_sample=1_455_870_912)
    allocator = gpu_check.Line(fixed=400_000_000, per_sample=1_500_000_000)
    auto = gpu_check.auto_sweep(150_000_000_000, allocator, fake, tmp_path)
    # fits: (150e9 − 0.4e9) // 1.5e9 = 99; target 101; budget = 375,438,952 + 101 × 1,455,870,912
    # + 1,455,870,912 // 2 = 148,146,336,520 bytes = 137.972028 GiB
    assert "batch.budget_gb=137.972028" in auto.overrides
    assert "about 99 samples fit" in auto.note and "should pick 101" in auto.note
    unknown = gpu_check.auto_sweep(150_000_000_000, None, fake, tmp_path)
    # 150e9 bytes = 139.698386 GiB, + 2 GiB
    assert "batch.budget_gb=141.698386" in unknown.overrides


def test_prediction_errors_are_computed_per_job_and_summarised() -> None:
    report = gpu_check.render_report(check_run())
    # small: predicted 741,314,024 − measured 720,342,504 = +20 MiB = +2.91 % of measured
    assert row_of(
        report,
        "| small | fp32 | none | 687.0 | 780.0 | 707.0 | +20.0 | +2.91 | backward / backward |",
    )
    # medium: 3,883,957,416 − 3,951,066,280 = −64 MiB = −1.70 % of measured
    assert row_of(
        report,
        "| medium | fp32 | none | 3,768.0 | 3,900.0 | 3,704.0 | -64.0 | -1.70 | optimizer / optimizer |",
    )
    # mean |error| = (2.9113 + 1.6985) / 2 = 2.30
    assert "- fp32: error -1.70 % to +2.91 %, mean |error| 2.30 % over 2 job(s)" in report
    # fields newer records carry are shown where present
    assert "fwd+bwd peak MiB: measured / predicted / error" in report
    assert "| 700.0 / — / — |" in row_of(report, "| small | fp32 | none | 687.0")
    assert row_of(
        report,
        "| small | bf16 | none | — | — | — | — | — | — | — / — / — | no record / no record |",
    )


def test_allocator_offload_auto_and_adaptive_tables() -> None:
    report = gpu_check.render_report(check_run())
    headers = row_of(report, "| model | precision | strategy | status | after_setup MiB")
    assert (
        "| fwd+bwd peak MiB | peak allocated MiB | peak reserved MiB | memory_source |" in headers
    )
    # phases: the predicted ones less 20 MiB each
    assert row_of(
        report, "| small | fp32 | none | ok | 325.7 | 647.9 | 687.0 | 556.1 | 325.7 | 700.0 |"
    )
    # forward peak: 679,382,504 − 430,000,000 = 249,382,504 bytes = 237.8 MiB = 36.7 %
    assert row_of(report, "| small | fp32 | ok | 687.0 | 650.0 | 647.9 | 410.1 | 237.8 | 36.7 |")
    assert row_of(report, "| small | bf16 | no record |")
    assert row_of(report, "| 137.972 | 3 | 97 | 135,035.4 | 2 | 95 | 142,336.0 | 143,360.0 | ok |")
    assert row_of(report, "| medium | 3,704.0 | 1 | 3,704.0 | 3,703.0 | 3,764.0 | over by +60.0 |")
    assert "- medium, budget 3,704.0 MiB: **infeasible** after 1 measured plan(s)" in report


def test_verdicts_name_what_failed_and_nothing_is_dropped() -> None:
    run = check_run()
    results = {v.check: v for v in gpu_check.verdicts(run)}
    assert results["batch=auto out-of-memory back-off"] == gpu_check.Verdict(
        "batch=auto out-of-memory back-off",
        "pass",
        "predicted batch 97, 2 back-off(s), ran at batch 95",
    )
    assert results["adaptive re-planning"].outcome == "pass"
    assert results["adaptive re-planning"].detail.endswith("; 1 planned again")
    assert results["fake-device prediction"].detail == "30/32 pairs lack an ok record"
    assert results["allocator memory step"].outcome == "FAIL"
    assert results["allocator memory step"].detail.endswith("; and 25 more (see the tables)")
    assert results["offload (pinned host memory)"].detail.startswith(
        "small bf16 offload: no record (none: no record)"
    )
    report = gpu_check.render_report(run)
    assert (
        "- measured-medium-fp32: 7 of 8 job(s) left no record (stopped at its limit (330 s after the start))"
        in report
    )
    assert "- adaptive-medium job 0, medium fp32 adaptive: **infeasible** — no plan fits" in report

    # a single plan within budget never exercised re-planning; one over budget is a failure
    run.sweeps = [s for s in run.sweeps if s.name != "adaptive-medium"]
    assert gpu_check.adaptive_verdict(run).outcome == "not exercised"
    (small,) = run.records(gpu_check.ADAPTIVE)
    small.peak_bytes = 700 * MIB
    assert gpu_check.adaptive_verdict(run).outcome == "FAIL"


def test_a_saved_run_renders_the_same_report(tmp_path: Path) -> None:
    run = check_run()
    gpu_check.save_run(run, tmp_path / gpu_check.RUN_FILE)
    assert gpu_check.render_report(
        gpu_check.load_run(tmp_path / gpu_check.RUN_FILE)
    ) == gpu_check.render_report(run)


@pytest.mark.gpu
def test_the_probes_see_the_gpu() -> None:
    assert gpu_check.cuda_driver_problem() is None
    info = gpu_check.probe_cuda()
    assert info["available"] and 0 < info["free_bytes"] <= info["total_bytes"]
