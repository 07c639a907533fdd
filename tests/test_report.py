"""summary.md: readable alone, with units, sources, the command, the failures and the figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from memexp.aggregate import data_notes, load_results
from memexp.figures import PlotOutcome
from memexp.report import render_summary, write_summary
from memexp.results import RunResult, write_result
from memexp.sweepdir import read_sweep_overrides
from memexp.text import markdown_table

MULTIRUN_YAML = """\
hydra:
  mode: MULTIRUN
  overrides:
    hydra:
    - hydra.sweep.dir=multirun/x
    task:
    - model=small
    - strategy=none,full
    - seq.len=256
model:
  name: small
"""
WORKLOAD = {
    "model": "small",
    "seq_len": 256,
    "batch_size": 4,
    "device": "cpu",
    "precision": "fp32",
    "attention": "naive",
    "environment": {"python": "3.12.3", "torch": "2.6.0", "git_commit": "abc1234"},
}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """none and full measured, sqrt out of memory, and Hydra's multirun.yaml."""
    timing = {"time_repeats": 5, "time_source": "perf_counter", "memory_source": "tensor_tracker"}
    none = {"peak_bytes": 1000 * 2**20, "forward_backward_peak_bytes": 900 * 2**20}
    full = {"peak_bytes": 600 * 2**20, "forward_backward_peak_bytes": 450 * 2**20}
    jobs = [
        ("none", "ok", {**none, "step_ms_median": 100.0, **timing}),
        ("full", "ok", {**full, "step_ms_median": 125.0, **timing}),
        ("sqrt", "oom", {"message": "CUDA out of memory. Tried to allocate 2.00 GiB\nmore"}),
    ]
    for num, (strategy, status, fields) in enumerate(jobs):
        overrides = ["model=small", f"strategy={strategy}", "seq.len=256"]
        result = RunResult(
            status=status,
            job_num=num,
            strategy=strategy,
            overrides=overrides,
            started_at=f"2026-01-01T00:0{num}:00+00:00",
            finished_at=f"2026-01-01T00:0{num}:30+00:00",
            **WORKLOAD,
            **fields,
        )
        write_result(tmp_path / str(num), result)
    (tmp_path / "multirun.yaml").write_text(MULTIRUN_YAML)
    return tmp_path


FIGURES = [
    PlotOutcome("Strategies compared", Path("plots/comparison.png")),
    PlotOutcome("Scaling with sequence length", note="scaling vs seq_len skipped: only one"),
]


def summary_of(sweep: Path, notes: list[str] | None = None) -> str:
    figures = [PlotOutcome(f.title, f.path and sweep / f.path, f.note) for f in FIGURES]
    return render_summary(sweep, load_results([sweep]), notes or [], figures)


def test_summary_shows_the_reconstructed_command_and_each_job(sweep: Path) -> None:
    text = summary_of(sweep)
    assert "python -m memexp -m model=small strategy=none,full seq.len=256" in text
    assert "Hydra overrides: `hydra.sweep.dir=multirun/x`" in text
    assert "| 2 | oom | `model=small strategy=sqrt seq.len=256` |" in text


def test_summary_states_the_wall_time_and_the_share_of_training_steps(sweep: Path) -> None:
    # 2 min 30 s from job 0's start to job 2's finish; none and full ran 5 timed steps and one
    # memory step each (no warm-up recorded: none counted) at 100 and 125 ms: 1.35 s.
    assert (
        "\nTime: wall time 2 min 30 s from the first job's start to the last job's finish; "
        "training steps 1.4 s (1% of the wall time)"
    ) in summary_of(sweep)


def test_summary_survives_a_missing_multirun_yaml(sweep: Path) -> None:
    (sweep / "multirun.yaml").unlink()
    assert read_sweep_overrides(sweep) is None
    assert "No readable `multirun.yaml` here" in summary_of(sweep)


def test_summary_lists_the_environment(sweep: Path) -> None:
    text = summary_of(sweep)
    assert "| torch | 2.6.0 |" in text
    assert "| git_commit | abc1234 |" in text


def test_summary_table_has_units_in_headers_and_the_relative_numbers(sweep: Path) -> None:
    text = summary_of(sweep)
    assert "### small 256\u00d74" in text
    header = next(line for line in text.splitlines() if line.startswith("| strategy | status"))
    for unit in (
        "| step peak (MiB) | step peak saved (%) | fwd+bwd peak (MiB) | fwd+bwd peak saved (%) |",
        "step (ms): median (min\u2013max)",
    ):
        assert unit in header
    # step peak MiB, saved %, fwd+bwd peak MiB, saved %, ..., step, overhead %, ...,
    # efficiency 40 / 25, Pareto
    assert (
        "| full | ok | 600.0 | 40.0 | 450.0 | 50.0 | \u2014 | \u2014 | \u2014 | \u2014 | 125.0 "
        "| 25.0 |" in text
    )
    assert "| 1.60 | yes |" in text
    assert "| sqrt | oom | \u2014 |" in text


def test_summary_names_its_sources_and_how_times_were_taken(sweep: Path) -> None:
    text = summary_of(sweep)
    assert "tensor tracker (exact bytes, CPU)" in text
    assert "median of 5 repeats (min\u2013max)" in text
    assert "perf_counter" in text


def test_summary_lists_failed_jobs_with_status_and_message(sweep: Path) -> None:
    section = summary_of(sweep).split("## Jobs that did not finish ok")[1].split("## Notes")[0]
    assert "| 2 | small 256\u00d74 | sqrt | oom | \u2014 | CUDA out of memory." in section
    assert "more" not in section  # only the first line of a traceback-like message


def test_summary_links_plots_relatively_and_explains_skipped_ones(sweep: Path) -> None:
    text = summary_of(sweep, notes=["no baseline for x"])
    assert "![Strategies compared](plots/comparison.png)" in text
    assert "- Scaling with sequence length: scaling vs seq_len skipped: only one" in text
    assert "## Notes\n\n- no baseline for x" in text


def test_write_summary_writes_summary_md(sweep: Path) -> None:
    path = write_summary(sweep, load_results([sweep]), [], [])
    assert path == sweep / "summary.md"
    assert path.read_text().startswith(f"# Sweep summary: {sweep.name}")


def test_summary_of_a_sweep_without_results(tmp_path: Path) -> None:
    text = render_summary(tmp_path, load_results([tmp_path]), ["no result.json found"], [])
    assert "No job wrote a result." in text
    assert "## Results" not in text


def test_markdown_table_escapes_pipes_and_line_breaks() -> None:
    table = markdown_table(["a", "b"], [["x|y", "line\nbreak"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | line break |"]


def test_all_ok_sweep_says_so(sweep: Path) -> None:
    frame = load_results([sweep])
    text = render_summary(sweep, frame[frame.status.eq("ok")], [], [])
    assert "Every job with a result (2) finished ok." in text


def test_a_difference_within_noise_is_said_so_and_a_busy_machine_is_warned_of(
    tmp_path: Path,
) -> None:
    """The issue's page: same plan, a shorter median inside the baseline's spread, a busy CPU."""
    busy = {"time_threads": 2, "time_cpus": 2, "time_load_before": 3.5, "time_load_after": 4.0}
    busy |= {"time_stable": False, "time_repeats": 5}
    jobs = [
        ("none", {"step_ms_median": 273.0, "step_ms_min": 100.0, "step_ms_max": 2800.0}),
        ("adaptive", {"step_ms_median": 2736.0, "step_ms_min": 250.0, "step_ms_max": 3000.0}),
    ]
    for num, (strategy, fields) in enumerate(jobs):
        result = RunResult(
            status="ok", job_num=num, strategy=strategy, peak_bytes=2**20, **WORKLOAD, **busy,
            **fields,
        )  # fmt: skip
        write_result(tmp_path / str(num), result)
    text = summary_of(tmp_path)
    adaptive_row = next(line for line in text.splitlines() if line.startswith("| adaptive"))
    assert "| within noise |" in adaptive_row and "902.2" not in adaptive_row
    assert "2,736.0 (250.0\u20133,000.0); busy machine" in adaptive_row
    assert "(0 of 2 job(s)) or `measure.max_time_s` ran out; 2 intra-op thread(s)" in text
    assert "**Warning: 2 of 2 timed job(s) ran on a busy machine**" in text
    notes = data_notes(load_results([tmp_path]))
    assert sum("was timed on a busy machine" in note for note in notes) == 2
    assert text.count("| yes |") == 2  # a time difference within noise beats no one
