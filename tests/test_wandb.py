"""W&B logging, offline: what the runs hold is read back with `wandb leet inspect`, no network.

Logging is slow-ish (about half a second a run), so one module fixture logs a small sweep once
and the tests below read it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from memexp import wandb_report, wandb_sink
from memexp.plan import CheckpointPlan
from memexp.results import RunResult, read_result, write_result
from memexp.wandb_report import build_report
from memexp.wandb_sink import log_aggregate, log_job, sweep_group

# Every test here logs real offline W&B runs (a service process each) or builds a report.
pytestmark = pytest.mark.slow

MIB = 2**20
TIMELINE = [[0, 1 * MIB, "forward"], [1, 3 * MIB, "forward"], [2, 2 * MIB, "backward"]]
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
    """Summary, config and state (`--summary --json`), the run record (group, job type), history."""
    inspected = json.loads(_wandb_cli("leet", "inspect", "--summary", "--json", str(run_dir)))
    records = [
        json.loads(line)
        for line in _wandb_cli("leet", "inspect", "--json", str(run_dir)).splitlines()
    ]
    inspected["run_record"] = next(r["run"] for r in records if r["type"] == "run")
    inspected["history"] = [r["history"]["item"] for r in records if r["type"] == "history"]
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
    common = {"sweep_dir": str(sweep_dir), "model": "tiny", "batch_size": 2}
    ok = RunResult(
        status="ok",
        job_num=0,
        job_dir=str(sweep_dir / "0"),
        overrides=["strategy=none", "seq.len=128"],
        strategy="none",
        seq_len=128,
        peak_bytes=3 * MIB,
        activations_bytes=MIB + 512,
        phase_bytes={"forward_peak": 3 * MIB, "after_step": 2 * MIB},
        timeline_file="timeline.json",
        step_ms_median=12.5,
        flops_step=123_456_789,
        plan=CheckpointPlan(2, segments=((0, 1), (1, 2))),
        **common,
    )
    error = RunResult(
        status="error",
        message="RuntimeError: boom",
        error_type="RuntimeError",
        job_num=1,
        job_dir=str(sweep_dir / "1"),
        overrides=["strategy=full", "seq.len=256"],
        strategy="full",
        seq_len=256,
        **common,
    )
    return [ok, error]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two jobs (ok, error) and the aggregate, logged offline, then read back."""
    root = tmp_path_factory.mktemp("wandb")
    sweep_dir = root / "multirun" / "2024-05-01" / "12-00-00"
    group = sweep_group(sweep_dir)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate_wandb(monkeypatch, root)
        for result in _results(sweep_dir):
            job_dir = Path(result.job_dir)
            write_result(job_dir, result)
            if result.timeline_file:
                timeline = {"source": "test", "unit": "bytes", "events": TIMELINE}
                (job_dir / result.timeline_file).write_text(json.dumps(timeline))
            config = {"strategy": {"name": result.strategy}, "seq": {"len": result.seq_len}}
            cfg = OmegaConf.create(LOGGER_CFG)  # what Hydra hands over
            log_job(cfg, config, result, job_dir, group, " ".join(result.overrides))

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


def test_one_run_per_job_inside_the_sweep_folder(sweep: dict[str, Any]) -> None:
    jobs = _job_runs(sweep)
    assert len(jobs) == 2
    assert len({run["dir"] for _, run in jobs}) == 2
    assert all(run["dir"].parent == sweep["dir"] / "wandb" for _, run in jobs)


def test_summary_holds_the_result_json_figures(sweep: dict[str, Any]) -> None:
    for result, run in _job_runs(sweep):
        expected = {k: v for k, v in result.to_dict().items() if v is not None}
        assert {k: run["summary"].get(k) for k in expected} == expected
        assert run["config"] == {
            "strategy": {"name": result.strategy},
            "seq": {"len": result.seq_len},
        }
    ok = next(run for result, run in _job_runs(sweep) if result.status == "ok")
    assert ok["summary"]["peak_mib"] == 3.0
    assert ok["summary"]["activations_mib"] == round((MIB + 512) / MIB, 3)
    assert ok["summary"]["phase_mib"] == {"forward_peak": 3.0, "after_step": 2.0}


def test_runs_are_grouped_by_sweep_with_job_type_and_tags(sweep: dict[str, Any]) -> None:
    for result, run in _job_runs(sweep):
        record = run["run_record"]
        assert (record["run_group"], record["job_type"]) == (sweep["group"], "measure")
        assert record["project"] == "memexp-test"
        assert run["tags"] == ["tiny", result.strategy, "ci"]


def test_failed_job_is_marked_failed(sweep: dict[str, Any]) -> None:
    states = {r.status: (run["state"], run["exit_code"]) for r, run in _job_runs(sweep)}
    assert states == {"ok": ("finished", 0), "error": ("failed", 1)}


def test_memory_timeline_is_a_table_in_mib(sweep: dict[str, Any]) -> None:
    ok = next(run for result, run in _job_runs(sweep) if result.status == "ok")
    table_ref = ok["summary"][wandb_sink.TIMELINE_KEY + "_table"]
    table = json.loads((ok["dir"] / "files" / table_ref["path"]).read_text())
    assert table["columns"] == ["op_index", "allocated_mib", "phase"]
    assert table["data"] == [[op, b / MIB, phase] for op, b, phase in TIMELINE]


def test_headline_row_puts_figures_against_seq_len(sweep: dict[str, Any]) -> None:
    rows = {r.status: run["history"] for r, run in _job_runs(sweep)}
    assert rows["error"] == []  # nothing measured, nothing to plot
    (row,) = rows["ok"]
    assert (row["seq_len"], row["peak_mib"], row["step_ms_median"]) == (128, 3.0, 12.5)


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
        log_job(LOGGER_CFG, {}, result, tmp_path / "0", "g", "job")
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
        log_job(LOGGER_CFG, {}, _results(tmp_path)[0], tmp_path, "g", "job")
    assert "ModuleNotFoundError" in caplog.text


def test_logger_none_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **_: pytest.fail("wandb.init called"))
    result = _results(tmp_path)[0]
    log_job({"name": "none"}, {}, result, tmp_path / "0", "g", "job")
    log_aggregate({"name": "none"}, tmp_path, "g", tmp_path / "results.csv", [])
    assert list(tmp_path.iterdir()) == []


def test_report_builds_offline_with_the_expected_panels(tmp_path: Path) -> None:
    import wandb_workspaces.reports.v2 as wr

    report = build_report(tmp_path / "2024-05-01" / "12-00-00", None, "memexp")
    (grid,) = [block for block in report.blocks if isinstance(block, wr.PanelGrid)]
    lines = [p for p in grid.panels if isinstance(p, wr.LinePlot)]
    assert [(p.x, p.y) for p in lines] == [
        ("seq_len", ["peak_mib"]),
        ("seq_len", ["step_ms_median"]),
    ]
    assert all(p.groupby == wr.Config("strategy.name") for p in lines)
    (scatter,) = [p for p in grid.panels if isinstance(p, wr.ScatterPlot)]
    assert (scatter.x, scatter.y) == (
        wr.SummaryMetric("step_ms_median"),
        wr.SummaryMetric("peak_mib"),
    )
    (runset,) = grid.runsets
    assert runset.project == "memexp"
    assert "Metric(\"Group\") == '2024-05-01_12-00-00'" in runset.filters
    assert "Metric(\"JobType\") == 'measure'" in runset.filters


def test_report_cli_builds_offline_and_refuses_to_save_without_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _isolate_wandb(monkeypatch, tmp_path)
    assert wandb_report.main([str(tmp_path)]) == 0
    assert "LinePlot" in capsys.readouterr().out
    assert wandb_report.main([str(tmp_path), "--save"]) == 1
    err = capsys.readouterr().err
    assert "no W&B API key" in err
    assert "Traceback" not in err


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
        log_job(LOGGER_CFG, {}, _results(tmp_path)[0], tmp_path / "0", "g", "job")
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
    log_job({**LOGGER_CFG, "init_timeout_s": 7}, {}, _results(tmp_path)[0], tmp_path, "g", "job")
    assert seen["settings"].init_timeout == 7
    assert wandb_sink._GAVE_UP["reason"] == "could not start a run within 7 s: no network"


def test_a_logger_mode_that_w_and_b_lacks_is_refused_when_composed(
    compose_cfg: Callable[..., Any],
) -> None:
    with pytest.raises(ConfigCompositionException) as refused:
        compose_cfg("model=tiny", "logger=wandb", "logger.mode=onlin")
    assert "expected one of [online, offline, disabled]" in str(refused.value.__cause__)
