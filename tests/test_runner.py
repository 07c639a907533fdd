"""One job's record: what `result.json` and `timeline.json` hold, and that a failure is a record too.

The measured job is the `none` job of the session's tiny sweep (conftest.py): the runner as the
command line drives it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from omegaconf import DictConfig

from memexp import analytic, results
from memexp.callbacks import collect_results
from memexp.config import DEVICE_TYPES, ExperimentSpec
from memexp.devices import BACKENDS
from memexp.measure.tracker import CATEGORY_FIELDS, SHARDED_FIELDS
from memexp.plan import CheckpointPlan
from memexp.results import RESULT_FILE, RunResult, read_result, write_result
from memexp.runner import run_job
from memexp.sweepdir import TIMELINE_FILE

if TYPE_CHECKING:
    from conftest import SweepRun

# Fields that count things or name the workload: every other number must say its unit.
COUNTS = {
    "schema_version", "job_num", "seq_len", "batch_size", "seed", "param_count",
    "time_warmup", "time_repeats", "loss_first_step", "time_threads", "time_interop_threads",
    "time_cpus", "time_load_before", "time_load_after",  # load averages: runnable tasks
    "world_size", "peak_rank",  # ranks: how many, and which one the memory figures are
}  # fmt: skip
UNIT_NAME = re.compile(
    r".*(_bytes|_ms_median|_ms_min|_ms_max|_ms_iqr|_pct|_s|_per_s_median)$|^flops_.*"
)


def ok_job(tiny_sweep: SweepRun) -> RunResult:
    (sweep_dir,) = (tiny_sweep.cwd / "outputs" / "multirun").glob("*/*")
    (result,) = [r for r in collect_results(sweep_dir) if r.status == "ok"]
    return result


@pytest.fixture(scope="module")
def record(tiny_sweep: SweepRun) -> dict:
    """The ok job's result.json exactly as written to disk."""
    return json.loads((Path(ok_job(tiny_sweep).job_dir) / RESULT_FILE).read_text())


@pytest.mark.slow
def test_record_names_the_job(record: dict) -> None:
    assert record["status"] == "ok"
    assert record["message"] is None
    workload = {k: record[k] for k in ("model", "strategy", "attention", "seq_len", "batch_size")}
    assert workload == {
        "model": "tiny",
        "strategy": "none",
        "attention": "naive",
        "seq_len": 16,
        "batch_size": 2,
    }
    assert (record["device"], record["precision"], record["optimizer"]) == ("cpu", "fp32", "adam")
    assert (record["seed"], record["job_num"]) == (0, 0)
    assert (record["parallel"], record["world_size"]) == ("none", 1)
    assert "strategy=none" in record["overrides"]
    assert Path(record["job_dir"]) == Path(record["sweep_dir"]) / "0"
    assert record["schema_version"] == results.SCHEMA_VERSION


@pytest.mark.slow
def test_every_figure_says_its_unit_and_source(record: dict) -> None:
    numbers = {
        key
        for key, value in record.items()
        if isinstance(value, int | float) and not isinstance(value, bool) and key not in COUNTS
    }
    assert "peak_bytes" in numbers
    assert [key for key in sorted(numbers) if not UNIT_NAME.fullmatch(key)] == []
    assert record["memory_source"] == results.SOURCE_TENSOR_TRACKER
    assert record["saved_source"] == "saved_tensors_hooks"
    assert record["flops_source"] == "flop_counter_fake_tensors"
    assert record["time_source"] == "perf_counter"


@pytest.mark.slow
def test_record_holds_plan_environment_and_timestamps(record: dict) -> None:
    assert record["plan"] == CheckpointPlan.nothing(4).to_dict()
    assert record["plan_summary"] == "nothing recomputed"
    environment = record["environment"]
    assert {"python", "torch", "host", "git_commit"} <= environment.keys()
    assert environment["torch"] == torch.__version__
    started = datetime.fromisoformat(record["started_at"])
    finished = datetime.fromisoformat(record["finished_at"])
    assert started.tzinfo is not None
    assert started <= finished
    assert record["duration_s"] >= 0


@pytest.mark.slow
def test_figures_of_the_baseline_job(
    record: dict, tiny_spec: Callable[..., ExperimentSpec]
) -> None:
    spec = tiny_spec()
    plan = CheckpointPlan.nothing(spec.model.layers)
    assert record["saved_activation_bytes"] == analytic.saved_activation_bytes(spec, plan)
    assert record["flops_step"] == record["flops_step_no_checkpoint"] > 0
    assert (record["flops_recompute"], record["recompute_flops_pct"]) == (0, 0.0)
    assert record["params_bytes"] == 4 * record["param_count"]  # fp32
    # Adam: two fp32 moments per parameter and a 0-d fp32 step count per parameter tensor
    parameter_tensors = 2 + 4 * 8 + 2 + 1  # embeddings, 4 bias-free layers, final norm, head
    assert record["optimizer_state_bytes"] == 2 * record["params_bytes"] + 4 * parameter_tensors
    step = [record[f"step_ms_{s}"] for s in ("min", "median", "max")]
    assert step == sorted(step)
    assert record["tokens_per_s_median"] == pytest.approx(32 / (record["step_ms_median"] / 1000))


@pytest.mark.slow
def test_tracker_breakdown_adds_up_to_the_peak(record: dict) -> None:
    categories = set(CATEGORY_FIELDS.values()) - set(SHARDED_FIELDS)
    assert sum(record[field] for field in categories) == record["peak_bytes"]
    assert [record[field] for field in SHARDED_FIELDS] == [None] * 3  # one device: no shards
    assert record["peak_bytes"] == max(
        v for k, v in record["phase_bytes"].items() if k.endswith("_peak")
    )


@pytest.mark.slow
def test_timeline_is_written_next_to_the_record(record: dict) -> None:
    timeline = json.loads((Path(record["job_dir"]) / record["timeline_file"]).read_text())
    assert record["timeline_file"] == TIMELINE_FILE
    assert (timeline["source"], timeline["unit"]) == (record["memory_source"], "bytes")
    events = timeline["events"]
    assert [event[0] for event in events] == list(range(len(events)))
    assert max(event[1] for event in events) == record["peak_bytes"]
    phases, order = [event[2] for event in events], ["forward", "backward", "optimizer"]
    assert set(phases) == set(order)
    assert phases == sorted(phases, key=order.index)


@pytest.mark.slow
def test_record_round_trips(record: dict) -> None:
    result = RunResult.from_dict(record)
    assert result.plan == CheckpointPlan.nothing(4)
    assert result.to_dict() == record
    assert RunResult.from_dict(result.to_dict()) == result


@pytest.mark.slow
def test_records_are_written_atomically(
    tiny_sweep: SweepRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder in (tiny_sweep.cwd / "outputs").rglob("*"):
        assert not folder.name.endswith(".tmp"), folder
    first = RunResult(status="ok", model="tiny", peak_bytes=1)
    write_result(tmp_path, first)

    def dump_half(data: dict, handle: object, **kwargs: object) -> None:
        handle.write('{"status": "o')  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(results.json, "dump", dump_half)
    with pytest.raises(OSError, match="disk full"):
        write_result(tmp_path, RunResult(status="error"))
    assert read_result(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [RESULT_FILE]


def test_invalid_config_is_recorded_not_raised(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_cfg("model.heads=5", "parallel=fsdp")
    caplog.set_level(logging.INFO, logger="memexp")
    result = run_job(cfg, tmp_path, {"overrides": ["model.heads=5"]})
    assert (result.status, result.error_type) == ("error", "ConfigError")
    assert (result.model, result.strategy) == ("tiny", "none")  # what the job was asked to be
    assert (result.parallel, result.world_size) == ("fsdp", 8)
    assert (result.seq_len, result.batch_size) == (16, 2)
    assert result.message is not None and result.message.startswith("model.heads=5 ")
    assert read_result(tmp_path) == result
    assert not (tmp_path / TIMELINE_FILE).exists()
    assert "traceback" not in result.extra  # the message says it all
    assert ("memexp.runner", logging.INFO, f"error: {result.message}") in caplog.record_tuples


def test_every_device_a_job_runs_on_has_a_measurement_backend() -> None:
    assert set(BACKENDS) == set(DEVICE_TYPES) - {"auto"}  # validation resolves `auto`
