"""summary.md's prediction sections on hand-made records: sequence-length exponents, the largest
batch that fits, kept-for-backward bytes beside the closed form, and estimated step times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from memexp import aggregate, plots
from memexp.aggregate import load_results
from memexp.analysis import auto_batch_table, seq_len_exponents
from memexp.figures import PlotOutcome
from memexp.report import render_summary
from tests import records

GIB = 2**30
MIB = 2**20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WORKLOAD = {
    "model": "small",
    "seq_len": 256,
    "batch_size": 4,
    "device": "fake",
    "precision": "fp32",
    "attention": "naive",
    "memory_source": "fake_tensors",
}


def write_job(sweep: Path, num: int, strategy: str, status: str = "ok", **fields: Any) -> Path:
    return records.write_job(sweep, num, strategy, WORKLOAD, status, **fields)


def summary(sweep: Path, figures: list[PlotOutcome] | None = None) -> str:
    frame = load_results([sweep])
    return render_summary(sweep, frame, aggregate.data_notes(frame), figures or [])


def section(text: str, title: str) -> str:
    """The text of one `## title` section, up to the next `## ` heading."""
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_row(text: str, *cells: str) -> str:
    """The one table line that starts with these cells."""
    start = "| " + " | ".join(cells) + " |"
    (line,) = [line for line in text.splitlines() if line.startswith(start)]
    return line


# --- how memory grows with sequence length ------------------------------------------------------


@pytest.fixture
def seq_sweep(tmp_path: Path) -> Path:
    """`none` at four lengths with peak = c·s^1.7 and saved = c·s; `full` at two lengths only."""
    lengths = (64, 128, 256, 512)
    for num, s in enumerate(lengths):
        write_job(
            tmp_path, num, "none", seq_len=s,
            peak_bytes=round(1000 * s**1.7), saved_activation_bytes=300 * s,
        )  # fmt: skip
    for num, s in enumerate(lengths[:2], start=len(lengths)):
        write_job(tmp_path, num, "full", seq_len=s, peak_bytes=5000 * s)
    return tmp_path


@pytest.mark.slow
def test_scaling_exponent_of_a_synthetic_power_law_reads_1_70(seq_sweep: Path) -> None:
    fits = seq_len_exponents(load_results([seq_sweep]))
    assert list(fits.strategy_label) == ["none"]  # full ran at two lengths: too few
    assert fits.peak_bytes_exponent.iloc[0] == pytest.approx(1.7, abs=1e-6)
    figure = PlotOutcome(
        "Scaling with sequence length", seq_sweep / "plots" / "scaling_seq_len.png"
    )
    text = section(summary(seq_sweep, [figure]), "How memory grows with sequence length")
    # model, strategy, attention, batch, precision, device, k of peak, k of saved, fit range
    assert table_row(text, "small", "none") == (
        "| small | none | naive | 4 | fp32 | fake | 1.70 | 1.00 | 128\u2013512 (3 lengths) |"
    )
    assert "tends to 2 at long sequences" in text and "stay near 1" in text
    assert "Figure: [Scaling with sequence length](plots/scaling_seq_len.png)" in text


def test_scaling_section_is_skipped_with_a_note_below_three_lengths(tmp_path: Path) -> None:
    write_job(tmp_path, 0, "none", seq_len=64, peak_bytes=1000)
    write_job(tmp_path, 1, "none", seq_len=128, peak_bytes=3000)
    text = summary(tmp_path)
    assert "## How memory grows with sequence length" not in text
    assert (
        "- How memory grows with sequence length: needs 3 or more sequence lengths of one "
        "configuration (model, strategy, attention, batch, precision, device) with ok "
        "jobs; the most in this sweep is 2." in section(text, "Sections not shown")
    )


# --- largest batch that fits ----------------------------------------------------------------------


def auto_job(sweep: Path, num: int, strategy: str, batch: int, peak: int, **fields: Any) -> None:
    """A fake-device batch=auto job that found `batch`, predicted at `peak` of a 2 GiB budget."""
    extra = {
        "auto_batch_budget_bytes": 2 * GIB,
        "auto_batch_size": batch,
        "auto_batch_predicted_peak_bytes": peak,
        "auto_batch_headroom_bytes": 2 * GIB - peak,
        "auto_batch_next_peak_bytes": peak + 100 * MIB,
        "auto_batch_limit_reached": False,
        "auto_batch_imagines": "cuda",
    }
    write_job(sweep, num, strategy, batch_size=batch, peak_bytes=peak, extra=extra, **fields)


@pytest.fixture
def auto_sweep(tmp_path: Path) -> Path:
    """small: none 8, full 20, sqrt 26, selective infeasible; tiny: full 64 without a none."""
    auto_job(tmp_path, 0, "none", 8, 2 * GIB - 512 * MIB)
    auto_job(tmp_path, 1, "full", 20, 2 * GIB - 256 * MIB)
    auto_job(tmp_path, 2, "sqrt", 26, 2 * GIB - 128 * MIB)
    infeasible = {"auto_batch_budget_bytes": 2 * GIB, "auto_batch_probes": [[1, 3 * GIB]]}
    write_job(
        tmp_path, 3, "selective", status="infeasible", batch_size=1, peak_bytes=3 * GIB,
        message="batch 1 already needs 3.00 GiB (predicted peak, fake_tensors)", extra=infeasible,
    )  # fmt: skip
    auto_job(tmp_path, 4, "full", 64, GIB, model="tiny")
    return tmp_path


def test_times_none_equals_the_hand_computed_ratios(auto_sweep: Path) -> None:
    table = auto_batch_table(load_results([auto_sweep])).set_index(["model", "strategy"])
    assert table.times_none[("small", "none")] == 1.0
    assert table.times_none[("small", "full")] == 2.5  # 20 / 8
    assert table.times_none[("small", "sqrt")] == 3.25  # 26 / 8
    assert pd.isna(table.times_none[("small", "selective")])  # nothing fit
    assert pd.isna(table.times_none[("tiny", "full")])  # no none job for tiny


def test_auto_batch_table_in_the_summary(auto_sweep: Path) -> None:
    text = section(summary(auto_sweep), "Largest batch that fits")
    # strategy, status, batch, predicted peak, headroom, batch + 1 needs, x none
    assert "### small \u00b7 seq 256 \u00b7 fake \u00b7 fp32 \u00b7 naive" in text
    assert "Budget 2.00 GiB" in text
    rows = {
        "none": "| none | ok | 8 | 1.50 GiB | 512.00 MiB | 1.60 GiB | 1.00 |",
        "full": "| full | ok | 20 | 1.75 GiB | 256.00 MiB | 1.85 GiB | 2.50 |",
        "sqrt": "| sqrt | ok | 26 | 1.88 GiB | 128.00 MiB | 1.97 GiB | 3.25 |",
        "selective": "| selective | infeasible | none fits | 3.00 GiB at batch 1 | over by 1.00 GiB"
        " | \u2014 | \u2014 |",
    }
    small = text.split("### small")[1].split("###")[0]
    assert [table_row(small, s) for s in rows] == list(rows.values())
    tiny = text.split("### tiny")[1]
    assert table_row(tiny, "full") == "| full | ok | 64 | 1.00 GiB | 1.00 GiB | 1.10 GiB | \u2014 |"


def test_auto_batch_jobs_get_one_note_instead_of_empty_baselines(auto_sweep: Path) -> None:
    notes = aggregate.data_notes(load_results([auto_sweep]))
    assert len(notes) == 1
    assert notes[0].startswith("batch=auto: 3 job(s) ran at a batch no ok `none` job")
    assert "compares their batches" in notes[0]


@pytest.mark.slow
def test_auto_batch_section_and_figure_are_skipped_without_batch_auto(
    seq_sweep: Path, tmp_path: Path
) -> None:
    assert "- Largest batch that fits: no job ran with `batch=auto`." in summary(seq_sweep)
    outcome = plots.plot_auto_batch(load_results([seq_sweep]), tmp_path / "plots")
    assert (outcome.path, outcome.note) == (
        None,
        "largest batch skipped: no job ran with batch=auto",
    )


@pytest.mark.slow
def test_auto_batch_figure_is_drawn_and_linked(auto_sweep: Path) -> None:
    outcome = plots.plot_auto_batch(load_results([auto_sweep]), auto_sweep / "plots")
    assert outcome.path == auto_sweep / "plots" / "auto_batch.png"
    assert outcome.path.read_bytes().startswith(PNG_SIGNATURE)
    drawn = outcome.data.set_index(["model", "strategy_label"])
    # One bar per ok job at the batch it found; the infeasible job is a status, not a bar.
    assert drawn.batch.dropna().to_dict() == {
        ("small", "none"): 8.0,
        ("small", "full"): 20.0,
        ("small", "sqrt"): 26.0,
        ("tiny", "full"): 64.0,
    }
    assert drawn.status[("small", "selective")] == "infeasible"
    assert drawn.times_none.dropna().to_dict() == {
        ("small", "none"): 1.0,
        ("small", "full"): 2.5,
        ("small", "sqrt"): 3.25,
    }
    assert set(drawn.panel) == {"seq 256 \u00b7 fake \u00b7 fp32 \u00b7 naive"}
    text = section(summary(auto_sweep, [outcome]), "Largest batch that fits")
    assert "Figure: [Largest batch that fits](plots/auto_batch.png)" in text


# --- kept for backward: measured or predicted, beside the closed form -------------------------------


@pytest.fixture
def mixed_sweep(tmp_path: Path) -> Path:
    """Measured cpu jobs and one fake job: equal, unequal and no closed form."""
    cpu = {"device": "cpu", "memory_source": "tensor_tracker", "step_ms_median": 10.0}
    write_job(tmp_path, 0, "none", saved_activation_bytes=5 * MIB,
              extra={"analytic_saved_activation_bytes": 5 * MIB}, **cpu)  # fmt: skip
    write_job(tmp_path, 1, "full", saved_activation_bytes=MIB + 4096,
              extra={"analytic_saved_activation_bytes": MIB}, **cpu)  # fmt: skip
    write_job(
        tmp_path, 2, "full", precision="bf16", saved_activation_bytes=MIB, **cpu,
        extra={"analytic_saved_activation_bytes": None,
               "analytic_saved_activation_note": "precision='bf16' is not allowed: fp32"},
    )  # fmt: skip
    write_job(tmp_path, 3, "none", saved_activation_bytes=5 * MIB,
              extra={"analytic_saved_activation_bytes": 5 * MIB})  # fmt: skip
    return tmp_path


def test_equality_mark_and_differences_beside_the_closed_form(mixed_sweep: Path) -> None:
    text = section(summary(mixed_sweep), "Kept for backward: measured or predicted, beside the "
                   "closed form")  # fmt: skip
    measured = text.split("### Measured on a real step")[1].split("###")[0]
    predicted = text.split("### Predicted on fake tensors")[1]
    # config, strategy, run (MiB), closed form (MiB), run - closed form
    assert table_row(measured, "small 256\u00d74 cpu fp32", "none").endswith(
        "| 5.00 | 5.00 | = analytic |"
    )
    assert table_row(measured, "small 256\u00d74 cpu fp32", "full").endswith(
        "| 1.00 | 1.00 | +4,096 B (+0.39 %) |"
    )
    assert table_row(measured, "small 256\u00d74 cpu bf16", "full").endswith(
        "| 1.00 | \u2014 | no closed form: precision='bf16' is not allowed: fp32 |"
    )
    assert table_row(predicted, "small 256\u00d74 fake fp32", "none").endswith("| = analytic |")
    # Each kind in its own table: the fake row is never in the measured one, nor cpu in predicted.
    assert "fake" not in measured and "cpu" not in predicted
    assert "| config | strategy | predicted (MiB) |" in predicted


def test_fake_configs_say_their_figures_are_predictions(mixed_sweep: Path) -> None:
    results = section(summary(mixed_sweep), "Results")
    fake = results.split("### small 256\u00d74 fake fp32")[1].split("###")[0]
    assert "Predicted, not measured: the step ran on fake tensors" in fake
    cpu = results.split("### small 256\u00d74 cpu fp32")[1].split("###")[0]
    assert "Predicted" not in cpu


# --- estimated step time ------------------------------------------------------------------------


def test_estimated_step_time_is_labelled_and_kept_out_of_measured_columns(tmp_path: Path) -> None:
    estimate = {
        "estimated_step_ms": 12.5,
        "estimated_tokens_per_s": 81920.0,
        "estimate_utilization": 0.4,
        "estimate_peak_tflops": 989.0,
    }
    write_job(
        tmp_path, 0, "none", peak_bytes=MIB, time_source="estimate_from_flops", extra=estimate
    )
    text = summary(tmp_path)
    estimated = section(text, "Estimated step time (fake device)")
    assert table_row(estimated, "small 256\u00d74", "none") == (
        "| small 256\u00d74 | none | 12.5 | FLOPs at 40% of 989 TFLOP/s | 81,920 |"
    )
    assert "Not measured" in estimated
    results = section(text, "Results")
    assert "Step time: not measured" in results
    # step (ms) and time overhead (%) stay empty in the measured table
    assert "| \u2014 | \u2014 | \u2014 | \u2014 | \u2014 |" in table_row(results, "none", "ok")
    assert "12.5" not in results


@pytest.mark.slow
def test_estimated_step_time_is_skipped_with_a_note(
    mixed_sweep: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    title = "Estimated step time (fake device)"
    assert f"- {title}: the fake-device jobs had no `device.peak_tflops`" in summary(mixed_sweep)
    measured = tmp_path_factory.mktemp("measured")
    write_job(measured, 0, "none", device="cpu", memory_source="tensor_tracker", peak_bytes=MIB)
    assert f"- {title}: no fake-device job: every step time in this summary is measured." in (
        summary(measured)
    )
