"""The sweep table: hand-made records in, exact baseline-relative numbers and honest notes out."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from memexp import aggregate, summarize
from memexp.aggregate import load_results
from memexp.plan import CheckpointPlan, Part
from memexp.results import RunResult, write_result
from memexp.summarize import summarize_sweep
from memexp.sweepdir import RESULTS_PARQUET
from tests import records

WORKLOAD = {
    "model": "small",
    "seq_len": 256,
    "batch_size": 4,
    "device": "cpu",
    "precision": "fp32",
    "attention": "naive",
    "memory_source": "tensor_tracker",
}


def write_job(sweep: Path, num: int, strategy: str, status: str = "ok", **fields: Any) -> Path:
    return records.write_job(sweep, num, strategy, WORKLOAD, status, **fields)


def row(frame: pd.DataFrame, strategy: str, **where: Any) -> pd.Series:
    rows = frame[frame.strategy.eq(strategy)]
    for key, value in where.items():
        rows = rows[rows[key].eq(value)]
    assert len(rows) == 1
    return rows.iloc[0]


@pytest.fixture
def pair(tmp_path: Path) -> Path:
    """A baseline and a full-checkpoint job of one workload with round numbers."""
    write_job(
        tmp_path, 0, "none", peak_bytes=1000, forward_backward_peak_bytes=800,
        activations_bytes=500, saved_activation_bytes=400,
        step_ms_median=100.0, step_ms_min=90.0, step_ms_max=110.0, recompute_flops_pct=0.0,
    )  # fmt: skip
    write_job(
        tmp_path, 1, "full", peak_bytes=600, forward_backward_peak_bytes=200,
        activations_bytes=100, saved_activation_bytes=100,
        step_ms_median=125.0, step_ms_min=120.0, step_ms_max=130.0, recompute_flops_pct=33.0,
    )  # fmt: skip
    return tmp_path


def test_relative_columns_equal_hand_computed_values(pair: Path) -> None:
    full = row(load_results([pair]), "full")
    assert full.peak_saved_pct == 40.0  # 100 * (1000 - 600) / 1000
    assert full.forward_backward_peak_saved_pct == 75.0  # 100 * (800 - 200) / 800
    assert full.activation_saved_pct == 80.0  # 100 * (500 - 100) / 500
    assert full.saved_activation_saved_pct == 75.0  # 100 * (400 - 100) / 400
    assert full.time_overhead_pct == 25.0  # 100 * (125 - 100) / 100
    assert full.efficiency == 1.6  # 40 % saved / 25 % slower
    assert full.recompute_flops_pct == 33.0
    assert full.baseline_job_num == 0
    assert full.peak_mib == 600 / 2**20


def test_baseline_row_is_zero_and_its_efficiency_undefined(pair: Path) -> None:
    none = row(load_results([pair]), "none")
    assert none.peak_saved_pct == 0.0
    assert none.time_overhead_pct == 0.0
    assert math.isnan(none.efficiency)


def test_efficiency_is_nan_when_a_strategy_is_not_slower(tmp_path: Path) -> None:
    write_job(tmp_path, 0, "none", peak_bytes=1000, step_ms_median=100.0)
    write_job(tmp_path, 1, "sqrt", peak_bytes=800, step_ms_median=90.0)
    sqrt = row(load_results([tmp_path]), "sqrt")
    assert sqrt.time_overhead_pct == -10.0
    assert sqrt.peak_saved_pct == 20.0
    assert math.isnan(sqrt.efficiency)


def test_each_group_is_compared_with_its_own_baseline(tmp_path: Path) -> None:
    write_job(tmp_path, 0, "none", peak_bytes=1000, step_ms_median=10.0)
    write_job(tmp_path, 1, "none", seq_len=512, peak_bytes=4000, step_ms_median=20.0)
    write_job(tmp_path, 2, "full", peak_bytes=500, step_ms_median=15.0)
    write_job(tmp_path, 3, "full", seq_len=512, peak_bytes=1000, step_ms_median=30.0)
    frame = load_results([tmp_path])
    columns = ["baseline_job_num", "peak_saved_pct", "time_overhead_pct"]
    assert list(row(frame, "full", seq_len=256)[columns]) == [0, 50.0, 50.0]
    assert list(row(frame, "full", seq_len=512)[columns]) == [1, 75.0, 50.0]


def test_missing_baseline_gives_nan_and_a_note(tmp_path: Path) -> None:
    write_job(tmp_path, 0, "full", peak_bytes=600, step_ms_median=125.0)
    frame = load_results([tmp_path])
    full = row(frame, "full")
    assert all(math.isnan(full[c]) for c in aggregate.RELATIVE_COLUMNS)
    assert aggregate.data_notes(frame) == [
        "no baseline for small 256\u00d74 (no strategy=none job ran): its relative columns are empty"
    ]


def test_failed_jobs_stay_as_rows_and_are_named_in_the_notes(tmp_path: Path) -> None:
    write_job(tmp_path, 0, "none", status="oom", message="CUDA out of memory.\nTraceback ...")
    write_job(tmp_path, 1, "full", peak_bytes=600, step_ms_median=125.0)
    frame = load_results([tmp_path])
    assert list(frame.status) == ["oom", "ok"]
    assert math.isnan(row(frame, "none").peak_saved_pct)
    assert aggregate.failure_notes(frame) == [
        "job 0 (small 256\u00d74, none): oom \u2014 CUDA out of memory."
    ]
    assert "the none job ended oom" in aggregate.baseline_notes(frame)[0]


def test_nested_fields_are_flattened_into_prefixed_columns(tmp_path: Path) -> None:
    write_job(
        tmp_path, 0, "full", peak_bytes=2**20,
        overrides=["strategy=full", "strategy.granularity=sublayer"],
        plan=CheckpointPlan(4, segments=((0, 2), (2, 4))), environment={"torch": "2.6.0"},
        extra={"budget_bytes": 5, "adaptive": {"units": {"ffn": {"recompute_flops": 7}}}},
        phase_bytes={"forward_peak": 3 * 2**20},
    )  # fmt: skip
    frame = load_results([tmp_path])
    job = frame.iloc[0]
    assert (job.plan_num_layers, job.plan_storage) == (4, "keep")
    assert "plan_segments" not in frame  # a list: plans.csv holds it, one row per layer x unit
    assert "sweep_dir" not in frame  # `sweep` says it
    assert (job.env_torch, job.extra_budget_bytes) == ("2.6.0", 5)
    assert job.extra_adaptive_units_ffn_recompute_flops == 7
    assert (job.phase_forward_peak_bytes, job.phase_forward_peak_mib) == (3 * 2**20, 3.0)
    assert job.overrides == "strategy=full strategy.granularity=sublayer"
    assert (job.strategy_label, job.config, job.workload) == (
        "full granularity=sublayer",
        "small 256\u00d74",
        "256\u00d74",
    )


def test_config_label_names_workload_keys_that_vary(tmp_path: Path) -> None:
    write_job(tmp_path, 0, "none", precision="fp32")
    write_job(tmp_path, 1, "none", precision="bf16")
    configs = set(load_results([tmp_path]).config)
    assert configs == {"small 256\u00d74 fp32", "small 256\u00d74 bf16"}


def test_pareto_marks_the_strategies_no_other_beats_in_both(tmp_path: Path) -> None:
    write_job(tmp_path, 0, "none", peak_bytes=1000, step_ms_median=100.0)
    write_job(tmp_path, 1, "full", peak_bytes=500, step_ms_median=130.0)
    write_job(tmp_path, 2, "sqrt", peak_bytes=600, step_ms_median=140.0)  # beaten by full
    optimal = load_results([tmp_path]).set_index("strategy").pareto_optimal
    assert optimal.to_dict() == {"none": True, "full": True, "sqrt": False}


@pytest.mark.slow
def test_summarize_sweep_writes_csv_plots_and_summary(pair: Path) -> None:
    output = summarize_sweep(pair)
    assert (pair / "results.csv") in output.written and (pair / "summary.md") in output.written
    assert (pair / "plots" / "comparison.png") in output.written
    assert all(path.is_file() for path in output.written)
    table = pd.read_csv(pair / "results.csv")
    assert table.set_index("strategy").peak_saved_pct.to_dict() == {"none": 0.0, "full": 40.0}
    assert "scaling vs seq_len skipped: only one sequence length in the sweep" in output.notes


@pytest.mark.slow
def test_summarize_sweep_survives_one_job_bad_files_and_dead_jobs(tmp_path: Path) -> None:
    write_job(tmp_path, 0, "full", peak_bytes=600)
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "result.json").write_text("{not json")
    (tmp_path / "2" / ".hydra").mkdir(parents=True)
    (tmp_path / "2" / ".hydra" / "overrides.yaml").write_text("- strategy=sqrt\n")
    output = summarize_sweep(tmp_path)
    assert len(output.frame) == 1
    notes = "\n".join(output.notes)
    damaged = tmp_path / "1" / "result.json"
    assert f"{damaged} is not a readable record (JSONDecodeError" in notes
    assert "job folder 2 has no result.json" in notes and "overrides: strategy=sqrt" in notes
    assert (tmp_path / "summary.md").is_file()


def test_summarize_sweep_of_an_empty_folder_says_so(tmp_path: Path) -> None:
    output = summarize_sweep(tmp_path)
    assert output.frame.empty
    assert "no result.json found" in output.notes
    assert "No job wrote a result." in (tmp_path / "summary.md").read_text()


@pytest.fixture
def two_sweeps(tmp_path: Path) -> Path:
    for name in ("sweep_a", "sweep_b"):
        write_job(tmp_path / name, 0, "none", peak_bytes=1000, step_ms_median=100.0)
        write_job(tmp_path / name, 1, "full", peak_bytes=600, step_ms_median=125.0)
    return tmp_path


@pytest.mark.slow
def test_cli_on_a_parent_folder_aggregates_every_sweep(two_sweeps: Path, capsys) -> None:
    out = two_sweeps / "all.csv"
    assert summarize.main([str(two_sweeps), "--out", str(out)]) == 0
    for name in ("sweep_a", "sweep_b"):
        assert (two_sweeps / name / "summary.md").is_file()
        assert (two_sweeps / name / "results.csv").is_file()
    combined = pd.read_csv(out)
    assert len(combined) == 4
    assert sorted(combined.sweep.map(lambda s: Path(s).name).unique()) == ["sweep_a", "sweep_b"]
    assert "2 jobs (2 ok)" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_expands_a_quoted_glob(two_sweeps: Path) -> None:
    assert summarize.main([str(two_sweeps / "*_b")]) == 0
    assert (two_sweeps / "sweep_b" / "summary.md").is_file()
    assert not (two_sweeps / "sweep_a" / "summary.md").exists()


def test_cli_fails_when_nothing_is_found(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert summarize.main([str(tmp_path)]) == 1
    assert caplog.messages == [f"no result.json under {tmp_path}"]


@pytest.fixture
def two_different_sweeps(tmp_path: Path) -> Path:
    """Two sweeps of one workload whose baselines differ: A's machine is twice as fast as B's."""
    for name, scale in (("sweep_a", 1.0), ("sweep_b", 2.0)):
        write_job(tmp_path / name, 0, "none", peak_bytes=1000, step_ms_median=100.0 * scale)
        write_job(tmp_path / name, 1, "full", peak_bytes=600, step_ms_median=125.0 * scale)
        write_job(tmp_path / name, 2, "sqrt", peak_bytes=700, step_ms_median=110.0 * scale)
    return tmp_path


def test_sweeps_read_together_compare_each_job_within_its_own_sweep(
    two_different_sweeps: Path,
) -> None:
    frame = load_results([two_different_sweeps])
    frame = frame.assign(sweep=frame.sweep.map(lambda s: Path(s).name))
    columns = ["sweep", "strategy", "time_overhead_pct", "peak_saved_pct", "baseline_job_num"]
    assert frame[columns].values.tolist() == [
        ["sweep_a", "none", 0.0, 0.0, 0],
        ["sweep_a", "full", 25.0, 40.0, 0],
        ["sweep_a", "sqrt", 10.0, 30.0, 0],
        ["sweep_b", "none", 0.0, 0.0, 0],  # not 100 % slower than A's none
        ["sweep_b", "full", 25.0, 40.0, 0],
        ["sweep_b", "sqrt", 10.0, 30.0, 0],
    ]
    assert list(frame.baseline_sweep.map(lambda s: Path(s).name)) == list(frame.sweep)


def test_pareto_marks_are_found_within_each_sweep(two_different_sweeps: Path) -> None:
    frame = load_results([two_different_sweeps])
    optimal = frame.assign(sweep=frame.sweep.map(lambda s: Path(s).name))
    marked = optimal.groupby("sweep").apply(
        lambda rows: sorted(rows.strategy[rows.pareto_optimal]), include_groups=False
    )
    # Mixed, A's jobs would beat every job of B and B would have no Pareto point at all.
    assert marked.to_dict() == {
        "sweep_a": ["full", "none", "sqrt"],
        "sweep_b": ["full", "none", "sqrt"],
    }


@pytest.mark.slow
def test_a_single_run_folder_is_summarized_into_itself(tmp_path: Path) -> None:
    """`python -m memexp` without -m writes `<date>/<time>/result.json`: outputs go beside it."""
    run = tmp_path / "2026-12-01" / "12-00-00"
    write_result(run, RunResult(status="ok", job_num=None, strategy="none", peak_bytes=1000,
                                step_ms_median=10.0, **WORKLOAD))  # fmt: skip
    assert summarize.main([str(tmp_path / "2026-12-01")]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name != RESULTS_PARQUET) == [
        "index.jsonl",
        "plots",
        "result.json",
        "results.csv",
        "summary.md",
    ]
    assert sorted(p.name for p in run.parent.iterdir()) == ["12-00-00"]
    table = pd.read_csv(run / "results.csv")
    assert (table.sweep.tolist(), table.baseline_sweep.tolist()) == ([str(run)], [str(run)])


def test_lists_are_tidy_tables_and_no_cell_of_results_csv_holds_json(tmp_path: Path) -> None:
    plan = CheckpointPlan(3, segments=((0, 2),), parts=((2, Part.FFN),))
    rounds = [{"predicted_peak_bytes": 9, "plan_layers": ["layer", "layer", "ffn"]}]
    write_job(tmp_path, 0, "none")
    write_job(
        tmp_path, 1, "adaptive", plan=plan,
        extra={"auto_batch_probes": [[1, 100], [2, 180]], "adaptive": {"rounds": rounds}},
    )  # fmt: skip
    output = summarize_sweep(tmp_path, draw=summarize.no_figures)
    sweep = str(tmp_path.resolve())
    plans = pd.read_csv(tmp_path / "plans.csv").fillna(-1)  # a part lies in no segment
    assert plans.values.tolist() == [
        [sweep, 1, 0, "segment", 0, 1],
        [sweep, 1, 1, "segment", 0, 1],
        [sweep, 1, 2, "ffn", -1, -1],
    ]
    assert list(plans) == ["sweep", "job_num", "layer", "unit", "segment_first", "segment_last"]
    probes = pd.read_csv(tmp_path / "auto_batch_probes.csv")
    assert probes[["job_num", "item", "value_0", "value_1"]].values.tolist() == [
        [1, 0, 1, 100],
        [1, 1, 2, 180],
    ]
    (round_row,) = pd.read_csv(tmp_path / "adaptive_rounds.csv").to_dict("records")
    assert (round_row["predicted_peak_bytes"], round_row["plan_layers"]) == (9, "layer layer ffn")
    assert {p.name for p in output.written} >= {"plans.csv", "auto_batch_probes.csv"}
    table = pd.read_csv(tmp_path / "results.csv", dtype=str)
    cells = table.stack()
    assert not cells[cells.str.match(r"^\s*[\[{]")].tolist()


def test_results_parquet_holds_the_table_when_pyarrow_is_installed(pair: Path) -> None:
    pytest.importorskip("pyarrow")
    summarize_sweep(pair, draw=summarize.no_figures)
    written = pd.read_parquet(pair / "results.parquet")
    assert written.peak_bytes.tolist() == pd.read_csv(pair / "results.csv").peak_bytes.tolist()
    assert str(written.peak_bytes.dtype) == "Int64"


def test_summarize_sweep_takes_the_figure_drawer_as_a_parameter(pair: Path) -> None:
    output = summarize_sweep(pair, draw=summarize.no_figures)
    written = [path for path in output.written if path.name != RESULTS_PARQUET]
    assert written == [pair / "results.csv", pair / "summary.md"]
    assert not (pair / "plots").exists()
    assert "## Plots" in (pair / "summary.md").read_text()


def test_a_time_difference_inside_both_ranges_is_within_noise(tmp_path: Path) -> None:
    """The issue's case: one plan under two names, the second's steps spread over the first's."""
    write_job(
        tmp_path, 0, "none", peak_bytes=1000, step_ms_median=100.0, step_ms_min=90.0,
        step_ms_max=110.0,
    )  # fmt: skip
    write_job(
        tmp_path, 1, "adaptive", peak_bytes=1000, step_ms_median=60.0, step_ms_min=50.0,
        step_ms_max=95.0,
    )  # fmt: skip
    write_job(
        tmp_path, 2, "full", peak_bytes=600, step_ms_median=150.0, step_ms_min=111.0,
        step_ms_max=160.0,
    )  # fmt: skip
    frame = load_results([tmp_path]).set_index("strategy")
    assert frame.time_within_noise.to_dict() == {"none": False, "adaptive": True, "full": False}
    assert frame.time_overhead_pct["adaptive"] == -40.0  # kept, but said as noise
    assert math.isnan(frame.efficiency["adaptive"])
    assert frame.efficiency["full"] == 0.8  # 40 % saved / 50 % overhead
    # adaptive's shorter median is a tie with none: neither beats the other on time.
    assert frame.pareto_optimal.to_dict() == {"none": True, "adaptive": True, "full": True}


def test_a_time_difference_beyond_both_ranges_decides_the_pareto_mark(tmp_path: Path) -> None:
    write_job(
        tmp_path, 0, "none", peak_bytes=1000, step_ms_median=100.0, step_ms_min=90.0,
        step_ms_max=110.0,
    )  # fmt: skip
    write_job(
        tmp_path, 1, "adaptive", peak_bytes=1000, step_ms_median=60.0, step_ms_min=50.0,
        step_ms_max=70.0,
    )  # fmt: skip
    frame = load_results([tmp_path]).set_index("strategy")
    assert frame.time_within_noise.to_dict() == {"none": False, "adaptive": False}
    assert frame.pareto_optimal.to_dict() == {"none": False, "adaptive": True}


def test_a_busy_machine_is_load_from_others_of_half_the_cpus(tmp_path: Path) -> None:
    """Load 2 of the job's own 2 threads on 2 CPUs is not busy; one more runnable task is."""
    timed = {"step_ms_median": 10.0, "time_threads": 2, "time_cpus": 2}
    write_job(tmp_path, 0, "none", time_load_before=2.0, time_load_after=1.9, **timed)
    write_job(tmp_path, 1, "full", time_load_before=2.0, time_load_after=3.0, **timed)
    write_job(tmp_path, 2, "sqrt", step_ms_median=10.0)  # no load recorded: no claim
    frame = load_results([tmp_path])
    assert frame.set_index("strategy").time_machine_busy.to_dict() == {
        "none": False,
        "full": True,
        "sqrt": False,
    }
    assert aggregate.busy_notes(frame) == [
        "job 1 (small 256\u00d74, full) was timed on a busy machine: load average 2.00 before, "
        "3.00 after its timed steps, with 2 thread(s) of its own on 2 CPU(s); its step times "
        "are not comparable"
    ]
