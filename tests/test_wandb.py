"""W&B logging, offline: what the runs hold is read back with `wandb leet inspect`, no network.

Logging is slow-ish (about half a second a run), so one module fixture logs a small sweep once
and the tests below read it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hydra.errors import ConfigCompositionException
from PIL import Image

from memexp import wandb_sink
from memexp.job import run_guarded
from memexp.observe import NO_OBSERVER
from memexp.plan import CheckpointPlan
from memexp.results import RunResult, read_result, write_result
from memexp.wandb_sink import log_aggregate, open_job_run, sweep_group
from tests.conftest import compose_config, fail_strategies

# Every test here logs real offline W&B runs (a service process each) or builds a report.
pytestmark = pytest.mark.slow
# memexp.wandb_report is imported inside the tests that use it: its W&B report modules take a
# second to import, and the quick loop collects this file without running any of it.


MIB = 2**20
# mode=online on purpose: WANDB_MODE=offline in the environment must win over the config.
LOGGER_CFG = {
    "name": "wandb",
    "project": "memexp-test",
    "entity": None,
    "mode": "online",
    "dir": None,
    "tags": ["ci"],
}


def _wandb_cli(*args: str) -> str:
    wandb = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb), *args], capture_output=True, text=True, check=True)
    return out.stdout


def _read_run(run_dir: Path) -> dict[str, Any]:
    """Summary, config and state (`--summary --json`), the run record (group, job type), history
    and artifacts."""
    inspected = json.loads(_wandb_cli("leet", "inspect", "--summary", "--json", str(run_dir)))
    records = [
        json.loads(line)
        for line in _wandb_cli("leet", "inspect", "--json", str(run_dir)).splitlines()
    ]
    inspected["run_record"] = next(r["run"] for r in records if r["type"] == "run")
    inspected["history"] = [r["history"]["item"] for r in records if r["type"] == "history"]
    inspected["artifacts"] = [r["artifact"] for r in records if r["type"] == "artifact"]
    inspected["dir"] = run_dir
    return inspected


def _child_processes() -> list[str]:
    """Command lines of this process's live children (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            command = (stat.parent / "cmdline").read_text()
        except OSError:
            continue
        if int(ppid) == os.getpid() and state != "Z":
            children.append(command)
    return children


@pytest.fixture(autouse=True)
def wandb_not_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test whose W&B failed leaves W&B off for the process; each test starts with it on."""
    monkeypatch.setitem(wandb_sink._GAVE_UP, "reason", None)


def _isolate_wandb(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Offline, silent, and every W&B cache or config inside `root`."""
    for name in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.setenv("NETRC", str(root / "home" / ".netrc"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(root / name.lower()))


def _results(sweep_dir: Path) -> list[RunResult]:
    """Hand-made records for the failure tests, which never reach a real W&B run."""
    common = {"sweep_dir": str(sweep_dir), "model": "tiny", "batch_size": 2}
    ok = RunResult(
        status="ok",
        job_num=0,
        job_dir=str(sweep_dir / "0"),
        overrides=["strategy=none", "seq.len=128"],
        strategy="none",
        seq_len=128,
        peak_bytes=3 * MIB,
        step_ms_median=12.5,
        plan=CheckpointPlan(2, segments=((0, 1), (1, 2))),
        **common,
    )
    return [ok]


def _log_job(logger_cfg: Any, result: RunResult, job_dir: Path) -> None:
    """A job's W&B run from its start to its record, as `memexp.job` drives it."""
    observer = open_job_run(logger_cfg, {}, job_dir, "g", "job", ("tiny", result.strategy))
    observer.on_step({"step": 1.0}, None)
    observer.on_finish(result, job_dir)


# The headline sweep's shape on the tiny model: strategies x sequence lengths, one job failing.
JOBS = (("none", 16), ("sqrt", 32), ("full", 16))
FAILING = {"full": RuntimeError("simulated failure inside the job")}
REPEAT = 3  # exactly: a cap of 1 ms stops the timed steps at the minimum


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three real tiny jobs (two ok, one error) run under the job guard, and the aggregate,
    logged offline, then read back."""
    root = tmp_path_factory.mktemp("wandb")
    sweep_dir = root / "multirun" / "2024-05-01" / "12-00-00"
    group = sweep_group(sweep_dir)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate_wandb(monkeypatch, root)
        fail_strategies(monkeypatch, FAILING)
        for num, (strategy, seq) in enumerate(JOBS):
            overrides = [f"strategy={strategy}", f"seq.len={seq}"]
            # mode=online on purpose: WANDB_MODE=offline in the environment must win.
            cfg = compose_config(
                "model=tiny", "device=cpu", f"measure.repeat={REPEAT}", "measure.max_time_s=0.001",
                "logger=wandb",
                "logger.project=memexp-test", "logger.mode=online", "logger.tags=[ci]", *overrides,
            )  # fmt: skip
            identity = {"sweep_dir": str(sweep_dir), "job_num": num, "overrides": overrides}
            run_guarded(cfg, sweep_dir / str(num), identity, sweep_dir)

        (sweep_dir / "results.csv").write_text(
            "strategy,seq_len,peak_bytes\nnone,128,3\nfull,256,\n"
        )
        # a PNG, and a PDF that wandb.Image cannot read and must be skipped
        Image.new("RGB", (4, 4)).save(sweep_dir / "peak.png")
        (sweep_dir / "peak.pdf").write_bytes(b"%PDF-1.4\n")
        aggregate_dir = root / "elsewhere"  # WANDB_DIR wins over the sweep folder
        monkeypatch.setenv("WANDB_DIR", str(aggregate_dir))
        plots = [sweep_dir / "peak.png", sweep_dir / "peak.pdf"]
        log_aggregate(LOGGER_CFG, sweep_dir, group, sweep_dir / "results.csv", plots)
        children = _child_processes()

        run_dirs = sorted((sweep_dir / "wandb").glob("offline-run-*"))
        run_dirs += sorted((aggregate_dir / "wandb").glob("offline-run-*"))
        with ThreadPoolExecutor(max_workers=len(run_dirs) or 1) as pool:
            runs = {run["name"]: run for run in pool.map(_read_run, run_dirs)}
    return {"dir": sweep_dir, "group": group, "runs": runs, "children": children}


def _job_runs(sweep: dict[str, Any]) -> list[tuple[RunResult, dict[str, Any]]]:
    results = [read_result(path) for path in sweep["dir"].glob("*/result.json")]
    return [(r, sweep["runs"][" ".join(r.overrides)]) for r in results]


def _ok_runs(sweep: dict[str, Any]) -> list[tuple[RunResult, dict[str, Any]]]:
    return [(result, run) for result, run in _job_runs(sweep) if result.status == "ok"]


def test_one_run_per_job_inside_the_sweep_folder(sweep: dict[str, Any]) -> None:
    jobs = _job_runs(sweep)
    assert sorted(r.status for r, _ in jobs) == ["error", "ok", "ok"]
    assert len({run["dir"] for _, run in jobs}) == len(JOBS)
    assert all(run["dir"].parent == sweep["dir"] / "wandb" for _, run in jobs)


def test_summary_holds_the_result_json_figures(sweep: dict[str, Any]) -> None:
    for result, run in _job_runs(sweep):
        expected = {k: v for k, v in result.to_dict().items() if v is not None}
        assert {k: run["summary"].get(k) for k in expected} == expected
        config = run["config"]  # the job's resolved config
        assert (config["strategy"]["name"], config["seq"]["len"]) == (
            result.strategy,
            result.seq_len,
        )
    for result, run in _ok_runs(sweep):
        assert run["summary"]["peak_mib"] == round(result.peak_bytes / MIB, 3)
        assert run["summary"]["phase_mib"] == {
            phase: round(count / MIB, 3) for phase, count in result.phase_bytes.items()
        }


def test_runs_are_grouped_by_sweep_with_job_type_and_tags(sweep: dict[str, Any]) -> None:
    for result, run in _job_runs(sweep):
        record = run["run_record"]
        assert (record["run_group"], record["job_type"]) == (sweep["group"], "measure")
        assert record["project"] == "memexp-test"
        assert run["tags"] == ["tiny", result.strategy, "ci"]


def test_the_run_ends_with_the_job_s_status(sweep: dict[str, Any]) -> None:
    states = {r.status: (run["state"], run["exit_code"]) for r, run in _job_runs(sweep)}
    assert states == {"ok": ("finished", 0), "error": ("failed", 1)}
    assert {run["summary"]["status"] for _, run in _job_runs(sweep)} == {"ok", "error"}


def test_every_timed_step_is_a_history_row_as_it_happens(sweep: dict[str, Any]) -> None:
    for result, run in _ok_runs(sweep):
        steps = [row for row in run["history"] if "step/step_ms" in row]
        assert len(steps) == REPEAT == result.time_repeats
        assert [row["_step"] for row in steps] == list(range(REPEAT))  # logged before the end
        for phase in ("forward", "backward", "optimizer", "step"):
            logged = statistics.median(row[f"step/{phase}_ms"] for row in steps)
            assert logged == getattr(result, f"{phase}_ms_median")  # the very samples timed
        # the CPU keeps no allocator count: no allocated bytes rather than a made-up zero
        assert all(wandb_sink.STEP_ALLOCATED_KEY not in row for row in steps)


def test_the_record_and_timeline_are_an_artifact(sweep: dict[str, Any]) -> None:
    for result, run in _job_runs(sweep):
        (artifact,) = [a for a in run["artifacts"] if a["type"] == "memexp-result"]
        files = [entry["path"] for entry in artifact["manifest"]["contents"]]
        assert files == (
            ["result.json", "timeline.json"] if result.timeline_file else ["result.json"]
        )


def test_memory_timeline_is_a_table_in_mib(sweep: dict[str, Any]) -> None:
    for result, run in _ok_runs(sweep):
        table_ref = run["summary"][wandb_sink.TIMELINE_KEY + "_table"]
        table = json.loads((run["dir"] / "files" / table_ref["path"]).read_text())
        timeline = json.loads((Path(result.job_dir) / result.timeline_file).read_text())
        assert table["columns"] == ["op_index", "allocated_mib", "phase"]
        expected = [[op, round(b / MIB, 3), phase] for op, b, phase in timeline["events"]]
        assert table["data"] == expected


def test_headline_row_puts_figures_against_seq_len_and_batch(sweep: dict[str, Any]) -> None:
    rows = {r.status: run["history"] for r, run in _job_runs(sweep)}
    assert rows["error"] == []  # nothing measured, nothing to plot
    for result, run in _ok_runs(sweep):
        row = run["history"][-1]
        assert (row["seq_len"], row["batch_size"], row["peak_mib"], row["step_ms_median"]) == (
            result.seq_len,
            result.batch_size,
            round(result.peak_bytes / MIB, 3),
            result.step_ms_median,
        )


def test_aggregate_run_holds_table_and_raster_plots(sweep: dict[str, Any]) -> None:
    aggregate = next(run for run in sweep["runs"].values() if run["name"].endswith("aggregate"))
    record = aggregate["run_record"]
    assert (record["run_group"], record["job_type"]) == (sweep["group"], "aggregate")
    assert aggregate["dir"].parent.parent.name == "elsewhere"
    assert aggregate["summary"]["results"]["_type"] == "table-file"
    assert aggregate["summary"]["results"]["nrows"] == 2
    plots = [key for key in aggregate["summary"] if key.startswith("plots/")]
    assert plots == ["plots/peak"]
    assert aggregate["summary"]["plots/peak"]["_type"] == "image-file"


def test_no_wandb_process_is_left_running(sweep: dict[str, Any]) -> None:
    assert not [c for c in sweep["children"] if "wandb" in c]


def test_wandb_failure_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    _isolate_wandb(monkeypatch, tmp_path)

    def broken_init(**_: Any) -> None:
        raise RuntimeError("no route to host\nsecond line")

    monkeypatch.setattr(wandb, "init", broken_init)
    result = _results(tmp_path)[0]
    with caplog.at_level(logging.WARNING, logger="memexp.wandb_sink"):
        _log_job(LOGGER_CFG, result, tmp_path / "0")
        log_aggregate(LOGGER_CFG, tmp_path, "g", tmp_path / "missing.csv", [])
    (message,) = [r.getMessage() for r in caplog.records]  # one warning, then W&B stays off
    assert "RuntimeError: no route to host" in message
    assert "W&B is off for the rest of this process" in message
    assert "\n" not in message


def test_missing_wandb_package_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    with caplog.at_level(logging.WARNING, logger="memexp.wandb_sink"):
        _log_job(LOGGER_CFG, _results(tmp_path)[0], tmp_path)
    assert "ModuleNotFoundError" in caplog.text


def test_logger_none_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **_: pytest.fail("wandb.init called"))
    result = _results(tmp_path)[0]
    assert open_job_run({"name": "none"}, {}, tmp_path, "g", "job") is NO_OBSERVER
    _log_job({"name": "none"}, result, tmp_path / "0")
    log_aggregate({"name": "none"}, tmp_path, "g", tmp_path / "results.csv", [])
    assert list(tmp_path.iterdir()) == []


def _headline_sweep(sweep_dir: Path) -> None:
    """Records of the headline sweep's shape: two models x two sequence lengths x two strategies
    at one batch, and one plot of the aggregate."""
    num = 0
    for model in ("small", "medium"):
        for seq in (256, 512):
            for strategy in ("none", "full"):
                job = RunResult(status="ok", job_num=num, model=model, strategy=strategy,
                                seq_len=seq, batch_size=4)  # fmt: skip
                write_result(sweep_dir / str(num), job)
                num += 1
    (sweep_dir / "plots").mkdir()
    Image.new("RGB", (4, 4)).save(sweep_dir / "plots" / "scaling_seq_len.png")


def test_report_is_faceted_by_model_and_batch_on_log_axes(tmp_path: Path) -> None:
    import wandb_workspaces.reports.v2 as wr

    sweep_dir = tmp_path / "2024-05-01" / "12-00-00"
    _headline_sweep(sweep_dir)
    from memexp.wandb_report import build_report

    report = build_report(sweep_dir, None, "memexp")
    grids = [block for block in report.blocks if isinstance(block, wr.PanelGrid)]
    runsets = [grid.runsets[0] for grid in grids]
    assert all("Metric(\"Group\") == '2024-05-01_12-00-00'" in r.filters for r in runsets)
    # per model: one scaling grid (batch 4; one batch, so no scaling against batch), one
    # workload grid per sequence length; then the aggregate
    assert [r.name for r in runsets] == [
        "medium batch=4", "medium seq=256 batch=4", "medium seq=512 batch=4",
        "small batch=4", "small seq=256 batch=4", "small seq=512 batch=4", "aggregate",
    ]  # fmt: skip
    scaling = grids[3]
    assert 'Config("model.name") == \'small\' and Config("batch.size") == 4' in (
        scaling.runsets[0].filters
    )
    lines = [p for p in scaling.panels if isinstance(p, wr.LinePlot)]
    assert [(p.x, p.y, p.log_x, p.log_y) for p in lines] == [
        ("seq_len", ["peak_mib"], True, True),
        ("seq_len", ["step_ms_median"], True, True),
    ]
    assert all(p.groupby == wr.Config("strategy.name") for p in lines)
    scatter, timeline = grids[4].panels
    assert (scatter.x, scatter.y, scatter.log_x, scatter.log_y) == (
        wr.SummaryMetric("step_ms_median"), wr.SummaryMetric("peak_mib"), True, True,
    )  # fmt: skip
    assert timeline.table_name == "memory_timeline_table"
    media, table = grids[-1].panels
    assert "Metric(\"JobType\") == 'aggregate'" in grids[-1].runsets[0].filters
    assert (media.media_keys, table.table_name) == (["plots/scaling_seq_len"], "results")


def test_report_dry_run_writes_its_specification(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from memexp import wandb_report

    _isolate_wandb(monkeypatch, tmp_path)
    sweep_dir = tmp_path / "sweep"
    _headline_sweep(sweep_dir)
    assert wandb_report.main([str(sweep_dir), "--dry-run"]) == 0
    path = sweep_dir / "wandb_report.json"
    assert capsys.readouterr().out.strip() == str(path)
    spec = json.loads(path.read_text())
    grids = [block for block in spec["blocks"] if block["type"] == "PanelGrid"]
    assert [block["text"] for block in spec["blocks"] if block["type"] == "H2"] == [
        "model medium", "model small", "sweep aggregate",
    ]  # fmt: skip
    line = grids[0]["panels"][0]
    assert line == {
        "type": "LinePlot",
        "title": "Peak memory (MiB) vs seq_len (medium batch=4)",
        "x": "seq_len",
        "y": ["peak_mib"],
        "log_x": True,
        "log_y": True,
        "groupby": "config:strategy.name",
    }
    for grid in grids[:-1]:  # every job panel is one model's
        (runset,) = grid["runsets"]
        assert runset["filters"].count('Config("model.name")') == 1
    assert [panel["type"] for panel in grids[-1]["panels"]] == [
        "MediaBrowser", "WeavePanelSummaryTable",
    ]  # fmt: skip


def test_report_cli_builds_offline_and_refuses_to_save_without_a_key(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from memexp import wandb_report

    _isolate_wandb(monkeypatch, tmp_path)
    sweep_dir = tmp_path / "sweep"
    _headline_sweep(sweep_dir)
    assert wandb_report.main([str(sweep_dir)]) == 0
    assert "LinePlot: Peak memory (MiB) vs seq_len (small batch=4)" in capsys.readouterr().out
    assert wandb_report.main([str(sweep_dir), "--save"]) == 1
    assert any("no W&B API key" in line for line in caplog.messages)
    assert "Traceback" not in capsys.readouterr().err


def test_online_without_a_key_never_prompts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """On a terminal W&B would ask "Enter your choice:" and wait; memexp asks it never to."""
    import wandb

    _isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", lambda **_: pytest.fail("wandb.init called without a key"))
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # a prompt would read end-of-input
    with caplog.at_level(logging.WARNING, logger="memexp.wandb_sink"):
        _log_job(LOGGER_CFG, _results(tmp_path)[0], tmp_path / "0")
    (message,) = [r.getMessage() for r in caplog.records]
    assert "NoCredentials: logger.mode=online needs an API key" in message


def test_a_bounded_init_time_is_passed_to_wandb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    _isolate_wandb(monkeypatch, tmp_path)
    seen: dict[str, Any] = {}

    def init(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise TimeoutError("no network")

    monkeypatch.setattr(wandb, "init", init)
    _log_job({**LOGGER_CFG, "init_timeout_s": 7}, _results(tmp_path)[0], tmp_path)
    assert seen["settings"].init_timeout == 7
    assert wandb_sink._GAVE_UP["reason"] == "could not start a run within 7 s: no network"


def test_a_logger_mode_that_w_and_b_lacks_is_refused_when_composed(
    compose_cfg: Callable[..., Any],
) -> None:
    with pytest.raises(ConfigCompositionException) as refused:
        compose_cfg("model=tiny", "logger=wandb", "logger.mode=onlin")
    assert "expected one of [online, offline, disabled]" in str(refused.value.__cause__)
