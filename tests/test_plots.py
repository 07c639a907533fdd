"""Each figure is drawn when the sweep's data supports it and skipped with a reason when not."""

from __future__ import annotations

from pathlib import Path

import matplotlib as mpl
import pandas as pd
import pytest
from PIL import Image

from memexp import aggregate, plots, summarize
from memexp.aggregate import load_results
from memexp.results import RunResult, write_json_atomic, write_result

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STRATEGIES = {"none": 1.0, "full": 0.4, "sqrt": 0.6}  # activation memory kept, vs none
PARAMETER_BYTES = {"tiny": 50_000, "small": 200_000}


def peak_bytes(model: str, seq_len: int, batch: int, strategy: str) -> int:
    """What `write_job` records: parameters, gradients and optimizer state, then activations."""
    return 4 * PARAMETER_BYTES[model] + int(seq_len * batch * 1000 * STRATEGIES[strategy])


def forward_backward_peak_bytes(model: str, seq_len: int, batch: int, strategy: str) -> int:
    """The step's peak less a params-sized scratch the optimizer step alone holds."""
    return peak_bytes(model, seq_len, batch, strategy) - PARAMETER_BYTES[model]


def write_job(sweep: Path, num: int, model: str, seq_len: int, batch: int, strategy: str) -> None:
    """A plausible ok job with a breakdown, step times and a three-phase timeline."""
    activations = seq_len * batch * 1000 * STRATEGIES[strategy]
    params = PARAMETER_BYTES[model]
    step = seq_len * batch * (2 - STRATEGIES[strategy]) / 100
    job_dir = sweep / str(num)
    events = [[0, params, "forward"], [1, params + int(activations), "forward"]]
    events += [[2, params + int(activations / 2), "backward"], [3, 2 * params, "optimizer"]]
    write_json_atomic(
        job_dir / "timeline.json", {"source": "tensor_tracker", "unit": "bytes", "events": events}
    )
    result = RunResult(
        status="ok", job_num=num, model=model, strategy=strategy, seq_len=seq_len,
        batch_size=batch, device="cpu", precision="fp32", attention="naive",
        param_count=params // 4, memory_source="tensor_tracker",
        peak_bytes=peak_bytes(model, seq_len, batch, strategy),
        forward_backward_peak_bytes=forward_backward_peak_bytes(model, seq_len, batch, strategy),
        params_bytes=params, grads_bytes=params,
        optimizer_state_bytes=2 * params, activations_bytes=int(activations),
        step_ms_median=step, step_ms_min=0.9 * step, step_ms_max=1.1 * step,
        time_repeats=3, timeline_file="timeline.json",
    )  # fmt: skip
    write_result(job_dir, result)


@pytest.fixture(scope="module")
def frame(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """tiny at 2 sequence lengths and 2 batch sizes, small at one, 3 strategies each, one OOM."""
    sweep = tmp_path_factory.mktemp("sweep")
    workloads = [("tiny", 256, 4), ("tiny", 512, 4), ("tiny", 256, 8), ("small", 256, 4)]
    jobs = [(w, s) for w in workloads for s in STRATEGIES]
    for num, ((model, seq_len, batch), strategy) in enumerate(jobs):
        write_job(sweep, num, model, seq_len, batch, strategy)
    write_result(
        sweep / str(len(jobs)),
        RunResult(status="oom", job_num=len(jobs), model="small", strategy="none", seq_len=1024,
                  batch_size=4, device="cpu", precision="fp32", attention="naive"),
    )  # fmt: skip
    return load_results([sweep])


def one_workload(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame.config.eq("tiny 256\u00d74")]


FIGURES = {
    "comparison.png": "Strategies compared",
    "scaling_seq_len.png": "Scaling with sequence length",
    "scaling_batch_size.png": "Scaling with batch size",
    "tradeoff.png": "Memory\u2013time trade-off",
    "breakdown.png": "Where the memory goes at the peak",
    "timeline.png": "Memory over one training step",
}


@pytest.fixture(scope="module")
def drawn(frame: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> list[plots.PlotOutcome]:
    """Every figure drawn once (drawing is the slow part, seconds), for the slow tests below to
    inspect."""
    return plots.draw_all(frame, tmp_path_factory.mktemp("out") / "plots")


@pytest.mark.slow
def test_every_figure_is_written_when_its_data_exists(drawn: list[plots.PlotOutcome]) -> None:
    written = [o for o in drawn if o.path]
    assert {o.path.name: o.title for o in written} == FIGURES
    assert [o.note for o in written] == [None] * len(FIGURES)
    assert all(o.path.read_bytes().startswith(PNG_SIGNATURE) for o in written)
    # No job of this sweep ran with batch=auto (tests/test_report_predictions.py draws that one).
    assert [o.note for o in drawn if not o.path] == [
        "largest batch skipped: no job ran with batch=auto",
        "world size skipped: no job ran with parallel other than none",
    ]


@pytest.mark.slow
def test_figures_are_readable_sizes(drawn: list[plots.PlotOutcome]) -> None:
    for outcome in (o for o in drawn if o.path):
        with Image.open(outcome.path) as image:
            width, height = image.size
        assert 600 <= width <= 4000 and 400 <= height <= 4000, outcome.path.name


def figure(drawn: list[plots.PlotOutcome], name: str) -> pd.DataFrame:
    """The data the figure saved as `name` drew."""
    (outcome,) = [o for o in drawn if o.path and o.path.name == name]
    return outcome.data


@pytest.mark.slow
def test_comparison_draws_a_bar_per_ok_job_with_its_peak_and_savings(drawn) -> None:
    data = figure(drawn, "comparison.png").set_index(["model", "workload", "strategy_label"])
    data = data.sort_index()
    workloads = {("tiny", 256, 4), ("tiny", 512, 4), ("tiny", 256, 8), ("small", 256, 4)}
    expected = {
        (m, f"{s}\u00d7{b}", strategy): peak_bytes(m, s, b, strategy) / 2**20
        for m, s, b in workloads
        for strategy in STRATEGIES
    }
    assert data.peak_mib.to_dict() == expected  # the OOM job has no bar
    assert data.forward_backward_peak_mib.to_dict() == {
        (m, f"{s}\u00d7{b}", strategy): forward_backward_peak_bytes(m, s, b, strategy) / 2**20
        for m, s, b in workloads
        for strategy in STRATEGIES
    }
    fwd_bwd_saved = data.forward_backward_peak_saved_pct.xs(("tiny", "256\u00d74"))
    assert fwd_bwd_saved.to_dict() == pytest.approx(
        {"none": 0.0, "full": 100 * 614_400 / 1_174_000, "sqrt": 100 * 409_600 / 1_174_000}
    )
    saved = data.peak_saved_pct.xs(("tiny", "256\u00d74"))
    assert saved.to_dict() == pytest.approx(
        {"none": 0.0, "full": 100 * 614_400 / 1_224_000, "sqrt": 100 * 409_600 / 1_224_000}
    )
    overhead = data.time_overhead_pct.xs(("tiny", "256\u00d74"))
    assert overhead.to_dict() == pytest.approx({"none": 0.0, "full": 60.0, "sqrt": 40.0})


@pytest.mark.slow
def test_scaling_draws_one_line_per_strategy_and_batch(drawn) -> None:
    data = figure(drawn, "scaling_seq_len.png")
    none = data[data.strategy_label.eq("none")]
    assert none[["model", "batch_size", "seq_len"]].values.tolist() == [
        ["tiny", 4, 256],
        ["tiny", 4, 512],
        ["tiny", 8, 256],
    ]
    assert none.peak_mib.tolist() == [
        peak_bytes("tiny", 256, 4, "none") / 2**20,
        peak_bytes("tiny", 512, 4, "none") / 2**20,
        peak_bytes("tiny", 256, 8, "none") / 2**20,
    ]
    assert set(data.model) == {"tiny"}  # small ran at one length only


@pytest.mark.slow
def test_tradeoff_draws_each_config_and_marks_its_pareto_points(drawn) -> None:
    data = figure(drawn, "tradeoff.png").set_index(["config", "strategy_label"])
    assert sorted(set(data.index.get_level_values("config"))) == [
        "small 256\u00d74",
        "tiny 256\u00d74",
        "tiny 256\u00d78",
        "tiny 512\u00d74",
    ]
    tiny = data.xs("tiny 256\u00d74")
    assert tiny.step_ms_median.to_dict() == pytest.approx(
        {"none": 10.24, "full": 16.384, "sqrt": 14.336}
    )
    # sqrt's steps (±10 %) overlap full's, a tie within noise, and full is smaller: full beats it.
    assert tiny.pareto_optimal.to_dict() == {"none": True, "full": True, "sqrt": False}


@pytest.mark.slow
def test_tradeoff_leaves_a_beaten_strategy_off_the_frontier(frame, tmp_path: Path) -> None:
    """sqrt slower than full at a larger peak: the table's frontier leaves it off, and so does the
    figure."""
    slower = frame.assign(
        step_ms_median=frame.step_ms_median.where(frame.strategy.ne("sqrt"), 100.0)
    ).drop(columns="pareto_optimal")
    beaten = aggregate.add_pareto_column(slower)
    data = plots.plot_tradeoff(one_workload(beaten), tmp_path).data
    assert data.set_index("strategy_label").pareto_optimal.to_dict() == {
        "none": True,
        "full": True,
        "sqrt": False,
    }


@pytest.mark.slow
def test_breakdown_stacks_the_recorded_parts_under_the_peak(drawn) -> None:
    data = figure(drawn, "breakdown.png").set_index(["config", "strategy_label"])
    full = data.loc[("tiny 256\u00d74", "full")]
    parts = ["params_mib", "grads_mib", "optimizer_state_mib", "activations_mib"]
    assert full[parts].tolist() == [v / 2**20 for v in (50_000, 50_000, 100_000, 409_600)]
    assert full.peak_mib == peak_bytes("tiny", 256, 4, "full") / 2**20
    assert len(data) == 12


@pytest.mark.slow
def test_timeline_draws_each_recorded_event_through_the_step(drawn) -> None:
    data = figure(drawn, "timeline.png")
    none = data[data.config.eq("tiny 256\u00d74") & data.strategy_label.eq("none")]
    assert none.fraction.tolist() == [0.0, 1 / 3, 2 / 3, 1.0]
    allocated = [50_000, 50_000 + 1_024_000, 50_000 + 512_000, 100_000]
    assert none.allocated_mib.tolist() == [b / 2**20 for b in allocated]
    assert none.phase.tolist() == ["forward", "forward", "backward", "optimizer"]
    assert none.phase_starts.tolist() == [True, False, True, True]


@pytest.mark.parametrize(
    ("draw", "note"),
    [
        (
            lambda f, d: plots.plot_scaling(f, d, "seq_len"),
            "scaling vs seq_len skipped: only one sequence length in the sweep",
        ),
        (
            lambda f, d: plots.plot_scaling(f, d, "batch_size"),
            "scaling vs batch_size skipped: only one batch size in the sweep",
        ),
    ],
)
def test_scaling_is_skipped_for_a_single_value(
    frame: pd.DataFrame, tmp_path: Path, draw, note: str
) -> None:
    outcome = draw(one_workload(frame), tmp_path)
    assert (outcome.path, outcome.note) == (None, note)
    assert not list(tmp_path.iterdir())


def test_scaling_is_skipped_when_no_model_has_two_values(frame: pd.DataFrame, tmp_path: Path):
    mixed = frame[frame.config.isin(["tiny 256\u00d74", "small 256\u00d74"])].copy()
    mixed.loc[mixed.model.eq("small"), "seq_len"] = 512
    outcome = plots.plot_scaling(mixed, tmp_path, "seq_len")
    assert (
        outcome.note
        == "scaling vs seq_len skipped: no strategy of a model ran at two values of sequence length"
    )


def test_scaling_needs_one_strategy_at_two_values(frame: pd.DataFrame, tmp_path: Path) -> None:
    """batch=auto runs each strategy at its own batch: no line to draw, whatever the batches."""
    own_batch = frame[
        (frame.config.eq("tiny 256\u00d74") & frame.strategy.eq("none"))
        | (frame.config.eq("tiny 256\u00d78") & frame.strategy.eq("full"))
    ]
    outcome = plots.plot_scaling(own_batch, tmp_path, "batch_size")
    assert outcome.note == (
        "scaling vs batch_size skipped: no strategy of a model ran at two values of batch size"
    )


def test_panels_without_any_figure_are_left_out(frame: pd.DataFrame) -> None:
    """A fake-device sweep predicts memory only: no step-time panels, no empty axes."""
    untimed = frame.assign(
        step_ms_median=float("nan"), time_overhead_pct=float("nan"), saved_activation_mib=1.0
    )
    memory_panels = [
        "peak_mib",
        "peak_saved_pct",
        "forward_backward_peak_mib",
        "forward_backward_peak_saved_pct",
    ]
    assert [c for c, _ in plots.comparison_panels(untimed)] == memory_panels
    assert [c for c, _ in plots.scaling_panels(untimed)] == ["peak_mib", "saved_activation_mib"]
    assert [c for c, _ in plots.comparison_panels(frame)] == [
        *memory_panels,
        "step_ms_median",
        "time_overhead_pct",
    ]
    assert [c for c, _ in plots.scaling_panels(frame)] == ["peak_mib", "step_ms_median"]


def test_relative_panels_need_a_strategy_besides_the_baseline(frame: pd.DataFrame) -> None:
    """batch=auto: every strategy at its own batch, so only `none` rows carry a relative 0 %."""
    only_baselines = frame.assign(
        peak_saved_pct=frame.peak_saved_pct.where(frame.strategy.eq("none")),
        forward_backward_peak_saved_pct=frame.forward_backward_peak_saved_pct.where(
            frame.strategy.eq("none")
        ),
        time_overhead_pct=frame.time_overhead_pct.where(frame.strategy.eq("none")),
    )
    assert [c for c, _ in plots.comparison_panels(only_baselines)] == [
        "peak_mib",
        "forward_backward_peak_mib",
        "step_ms_median",
    ]


def test_tradeoff_needs_two_strategies_in_a_config(frame: pd.DataFrame, tmp_path: Path) -> None:
    outcome = plots.plot_tradeoff(frame[frame.strategy.eq("full")], tmp_path)
    assert outcome.path is None
    assert outcome.note.startswith("trade-off skipped: no config has two strategies")


def test_breakdown_is_skipped_without_parts_of_the_peak(frame: pd.DataFrame, tmp_path: Path):
    parts = ["params_mib", "grads_mib", "optimizer_state_mib", "activations_mib"]
    outcome = plots.plot_breakdown(frame.assign(**{c: float("nan") for c in parts}), tmp_path)
    assert outcome.note == "memory breakdown skipped: no ok job recorded parts of its peak"


def test_timeline_is_skipped_without_timeline_files(frame: pd.DataFrame, tmp_path: Path):
    outcome = plots.plot_timeline(frame.assign(timeline_file=None), tmp_path)
    assert outcome.note == "memory over one step skipped: no ok job wrote timeline.json"


@pytest.mark.slow
def test_unreadable_timeline_is_reported_beside_the_figure(frame: pd.DataFrame, tmp_path: Path):
    broken = one_workload(frame).copy()
    broken.loc[broken.index[0], "timeline_file"] = "missing.json"
    outcome = plots.plot_timeline(broken, tmp_path)
    assert outcome.path is not None
    assert outcome.note == f"timelines unreadable: job {broken.job_num.iloc[0]}: FileNotFoundError"


def test_comparison_is_skipped_when_no_job_finished_ok(frame: pd.DataFrame, tmp_path: Path):
    outcome = plots.plot_comparison(frame[frame.status.ne("ok")], tmp_path)
    assert outcome.note == "comparison skipped: no job finished ok with a peak memory"


def test_a_failing_figure_becomes_a_note(
    frame: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(frame: pd.DataFrame, out_dir: Path) -> plots.PlotOutcome:
        raise ValueError("odd data")

    monkeypatch.setattr(plots, "figures", lambda timelines=(): (("broken figure", broken),))
    outcomes = plots.draw_all(frame, tmp_path)
    assert [o.note for o in outcomes] == ["broken figure failed: ValueError: odd data"]


def test_drawing_leaves_global_matplotlib_settings_alone(frame: pd.DataFrame, tmp_path: Path):
    before = dict(mpl.rcParams)
    plots.plot_breakdown(one_workload(frame), tmp_path)
    assert dict(mpl.rcParams) == before


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """20 workloads of one model (20 sequence lengths), 2 strategies each: more than a figure
    can show as panels."""
    sweep = tmp_path_factory.mktemp("many")
    for index in range(20):
        for offset, strategy in enumerate(("none", "full")):
            write_job(sweep, 2 * index + offset, "tiny", 16 * (index + 1), 2, strategy)
    return load_results([sweep])


@pytest.mark.slow
def test_a_comparison_of_many_configs_draws_at_most_the_cap_and_says_so(
    many: pd.DataFrame, tmp_path: Path
) -> None:
    cap = plots.style.MAX_PANELS
    # Evenly spaced over the 20 configs in reading order, first and last included.
    expected = [f"{16 * (i + 1)}\u00d72" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19)]
    assert cap == len(expected)
    outcome = plots.plot_comparison(many, tmp_path)
    assert outcome.path is not None
    assert list(dict.fromkeys(outcome.data.workload)) == expected
    assert outcome.note == (
        f"{cap} of 20 configs drawn, evenly spaced from the smallest to the largest "
        "workload; every config is in results.csv and summary.md"
    )


@pytest.mark.slow
@pytest.mark.parametrize("draw", [plots.plot_breakdown, plots.plot_tradeoff])
def test_lengths_of_one_model_share_one_panel_capped_and_said(
    many: pd.DataFrame, tmp_path: Path, draw
) -> None:
    """20 lengths of one model and batch: one panel, lengths beside each other, 5 of them."""
    outcome = draw(many, tmp_path)
    assert outcome.path is not None
    lengths = [16, 96, 176, 240, 320]  # indices 0, 5, 10, 14, 19 of 16, 32, ... 320
    assert list(dict.fromkeys(outcome.data.config)) == [f"tiny {n}\u00d72" for n in lengths]
    assert outcome.note == (
        f"5 of 20 values of seq ({', '.join(map(str, lengths))}), evenly spaced; every job is in "
        "results.csv and summary.md"
    )


@pytest.mark.slow
def test_a_breakdown_panel_gives_up_lengths_before_it_holds_too_many_bars(
    many: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for 4 bars a panel, 2 strategies leave room for 2 of the 20 lengths: the
    first and the last, said in the note."""
    monkeypatch.setattr(plots.breakdown, "MAX_PANEL_BARS", 4)
    outcome = plots.plot_breakdown(many, tmp_path)
    assert list(dict.fromkeys(outcome.data.config)) == ["tiny 16\u00d72", "tiny 320\u00d72"]
    assert len(outcome.data) == 4
    assert outcome.note == (
        "2 of 20 values of seq (16, 320), evenly spaced; every job is in results.csv and summary.md"
    )


def test_panels_are_what_varies_and_the_rest_is_said_once(frame: pd.DataFrame) -> None:
    layout = plots.style.facets(frame)
    assert layout.panel_keys == ["model", "batch_size"]
    assert list(layout.panels) == [
        "model tiny, batch 4",
        "model tiny, batch 8",
        "model small, batch 4",
    ]
    assert layout.inner_values == [256, 512, 1024]  # 1024: small's job that ran out of memory
    assert sorted(layout.panels["model tiny, batch 4"].seq_len.unique()) == [256, 512]
    assert sorted(layout.panels["model small, batch 4"].seq_len.unique()) == [256, 1024]
    assert layout.shared == (
        "device cpu, precision fp32, attention naive, parallel none, world_size 1"
    )
    assert layout.note is None


def test_too_many_panels_keep_an_evenly_spaced_subset_and_name_the_rest(
    frame: pd.DataFrame,
) -> None:
    layout = plots.style.facets(frame, cap=2)
    assert list(layout.panels) == ["model tiny, batch 4", "model small, batch 4"]
    assert layout.note == (
        "2 of 3 panels (model × batch), evenly spaced from the smallest to the largest; left "
        "out: model tiny, batch 8; every job is in results.csv and summary.md"
    )


@pytest.mark.slow
def test_the_timeline_draws_a_few_configs_or_the_ones_named(
    many: pd.DataFrame, tmp_path: Path
) -> None:
    default = plots.plot_timeline(many, tmp_path)
    assert list(dict.fromkeys(default.data.config)) == [
        "tiny 16\u00d72",
        "tiny 112\u00d72",
        "tiny 224\u00d72",
        "tiny 320\u00d72",
    ]
    assert default.note.startswith("4 of 20 configs drawn")
    named = [plots.parse_selection("model=tiny,seq=64"), plots.parse_selection("seq=128")]
    chosen = plots.plot_timeline(many, tmp_path, select=named)
    assert list(dict.fromkeys(chosen.data.config)) == ["tiny 64\u00d72", "tiny 128\u00d72"]
    assert chosen.note == "2 of 20 configs drawn, as named: model=tiny,seq_len=64; seq_len=128"
    with pytest.raises(ValueError, match="'colour=red'"):
        plots.parse_selection("model=tiny,colour=red")


@pytest.mark.slow
def test_summarize_passes_named_timelines_to_the_figure(tmp_path: Path) -> None:
    for num, strategy in enumerate(("none", "full")):
        for seq_len in (32, 64):
            write_job(tmp_path, 2 * num + seq_len // 64, "tiny", seq_len, 2, strategy)
    assert summarize.main([str(tmp_path), "--timeline", "seq=64"]) == 0
    page = (tmp_path / "summary.md").read_text()
    assert "Note: 1 of 2 configs drawn, as named: seq_len=64" in page


# --- many GPUs -------------------------------------------------------------------------------


def per_rank_peak(mode: str, strategy: str, world_size: int) -> int:
    """A per-rank peak that falls with the ranks under fsdp and stays under ddp."""
    states = 16_000_000 // world_size if mode == "fsdp" else 16_000_000
    return states + (1_000_000 if strategy == "none" else 400_000)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """tiny predicted under ddp and fsdp at 8 and 64 ranks, two strategies, one one-device job."""
    sweep = tmp_path_factory.mktemp("ranks")
    jobs = [
        (mode, world_size, strategy)
        for mode in ("ddp", "fsdp")
        for world_size in (8, 64)
        for strategy in ("none", "selective")
    ]
    for num, (mode, world_size, strategy) in enumerate(jobs):
        write_result(
            sweep / str(num),
            RunResult(status="ok", job_num=num, model="tiny", strategy=strategy, seq_len=256,
                      batch_size=4, device="fake", precision="bf16", attention="naive",
                      parallel=mode, world_size=world_size, memory_source="fake_tensors",
                      peak_bytes=per_rank_peak(mode, strategy, world_size),
                      extra={"device_memory_bytes": 12_000_000}),
        )  # fmt: skip
    write_result(
        sweep / str(len(jobs)),
        RunResult(status="oom", job_num=len(jobs), model="tiny", strategy="none", seq_len=256,
                  batch_size=4, device="fake", precision="bf16", attention="naive",
                  parallel="fsdp", world_size=512),
    )  # fmt: skip
    return load_results([sweep])


def test_sharded_jobs_are_labelled_and_compared_within_their_mode_and_world_size(
    sharded: pd.DataFrame,
) -> None:
    rows = sharded[sharded.status.eq("ok")]
    assert sorted(set(rows.workload)) == ["256\u00d74 ddp/64", "256\u00d74 ddp/8",
                                          "256\u00d74 fsdp/64", "256\u00d74 fsdp/8"]  # fmt: skip
    selective = rows[rows.strategy.eq("selective")].set_index("workload")
    expected = 100 * 600_000 / (16_000_000 // 64 + 1_000_000)
    assert selective.loc["256\u00d74 fsdp/64", "peak_saved_pct"] == pytest.approx(expected)


@pytest.mark.slow
def test_world_size_draws_a_line_per_mode_and_strategy(sharded: pd.DataFrame, tmp_path: Path):
    outcome = plots.plot_world_size(sharded, tmp_path)
    assert outcome.path is not None and outcome.path.name == "world_size.png"
    data = outcome.data
    assert len(data) == 8  # the oom job is not drawn
    for row in data.itertuples():
        assert row.peak_mib * 2**20 == per_rank_peak(
            row.parallel, row.strategy_label, row.world_size
        )
    assert set(data.panel) == {"tiny 256\u00d74"}
    assert sorted(set(zip(data.parallel, data.world_size, strict=True))) == [
        ("ddp", 8), ("ddp", 64), ("fsdp", 8), ("fsdp", 64)
    ]  # fmt: skip


def test_world_size_is_skipped_without_sharded_jobs(frame: pd.DataFrame, tmp_path: Path) -> None:
    outcome = plots.plot_world_size(frame, tmp_path)
    assert outcome.path is None
    assert outcome.note == "world size skipped: no job ran with parallel other than none"
