"""The sweep index: rows appended as jobs finish, read instead of the records, rebuilt when
damaged or stale; and the vectorised derived columns equal their row-by-row definitions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from memexp import aggregate, sweepindex
from memexp.aggregate import load_results
from memexp.results import RunResult, read_result, write_result
from memexp.summarize import no_figures, summarize_sweep
from memexp.sweepdir import HYDRA_DIR, INDEX_FILE, SUMMARY_MD
from tests import records

WORKLOAD = {"model": "tiny", "seq_len": 16, "batch_size": 2, "device": "cpu",
            "precision": "fp32", "attention": "naive"}  # fmt: skip
STRATEGIES = ("none", "full", "sqrt")


def write_job(sweep: Path, num: int, strategy: str, **fields: Any) -> Path:
    figures = {"peak_bytes": 1000 + 100 * num, "step_ms_median": 10.0 + num}
    return records.write_job(sweep, num, strategy, WORKLOAD, **{**figures, **fields})


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Three finished jobs, each having appended its row as `memexp.job` does."""
    for num, strategy in enumerate(STRATEGIES):
        sweepindex.append_row(write_job(tmp_path, num, strategy))
    return tmp_path


def index_lines(sweep: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (sweep / INDEX_FILE).read_text().splitlines()]


def direct_rows(sweep: Path) -> list[dict[str, Any]]:
    """Every record read and flattened, no index: what the index must give back."""
    files = sorted(sweep.resolve().glob("*/result.json"))
    return [sweepindex.flatten_record(read_result(f), f) for f in files]


def test_each_finished_job_appends_one_row(sweep: Path) -> None:
    lines = index_lines(sweep)
    assert [line[sweepindex.RECORD_KEY] for line in lines] == [
        "0/result.json",
        "1/result.json",
        "2/result.json",
    ]
    assert [line["peak_bytes"] for line in lines] == [1000, 1100, 1200]


def test_indexed_records_are_not_read_again(sweep: Path) -> None:
    files = sorted(sweep.glob("*/result.json"))
    before = (sweep / INDEX_FILE).read_bytes()
    read = sweepindex.read_rows(sweep, files)
    assert (read.from_index, read.read, read.notes) == (3, 0, [])
    assert read.rows == direct_rows(sweep)
    assert (sweep / INDEX_FILE).read_bytes() == before  # nothing to rewrite


def test_a_record_missing_from_the_index_is_read_and_added(sweep: Path) -> None:
    write_job(sweep, 3, "sqrt")  # a job that died before appending its row
    read = sweepindex.read_rows(sweep, sorted(sweep.glob("*/result.json")))
    assert (read.from_index, read.read) == (3, 1)
    assert read.rows == direct_rows(sweep)
    assert len(index_lines(sweep)) == 4


def test_a_damaged_index_is_rebuilt_from_the_records(sweep: Path) -> None:
    path = sweep / INDEX_FILE
    path.write_bytes(path.read_bytes()[:-40] + b"\n{not json\n")  # a torn last line
    read = sweepindex.read_rows(sweep, sorted(sweep.glob("*/result.json")))
    assert (read.from_index, read.read) == (2, 1)
    assert read.rows == direct_rows(sweep)
    assert [line["peak_bytes"] for line in index_lines(sweep)] == [1000, 1100, 1200]


def test_a_rewritten_record_replaces_its_stale_row(sweep: Path) -> None:
    write_job(sweep, 1, "full", peak_bytes=123_456_789)  # a resumed job measured again
    read = sweepindex.read_rows(sweep, sorted(sweep.glob("*/result.json")))
    assert (read.from_index, read.read) == (2, 1)
    assert [row["peak_bytes"] for row in read.rows] == [1000, 123_456_789, 1200]
    assert [line["peak_bytes"] for line in index_lines(sweep)] == [1000, 123_456_789, 1200]


def test_a_copied_sweep_keeps_using_its_index(sweep: Path, tmp_path_factory: Any) -> None:
    copy = tmp_path_factory.mktemp("copy") / "sweep"
    copy.mkdir()
    for path in [*sweep.glob("*/result.json"), sweep / INDEX_FILE]:
        target = copy / path.relative_to(sweep)
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(path.read_bytes())
        target.touch()
    index = json.loads((copy / INDEX_FILE).read_text().splitlines()[0])
    assert index[sweepindex.RECORD_KEY] == "0/result.json"  # relative: no absolute path kept
    table = load_results([copy])
    assert table.result_file.tolist() == [
        str(copy.resolve() / f"{n}/result.json") for n in range(3)
    ]


def test_the_table_is_the_same_with_and_without_the_index(sweep: Path) -> None:
    from_index = load_results([sweep])
    (sweep / INDEX_FILE).unlink()
    pd.testing.assert_frame_equal(from_index, load_results([sweep]))


@pytest.mark.slow
def test_a_summary_during_the_sweep_says_it_is_partial(sweep: Path) -> None:
    (sweep / "3" / HYDRA_DIR).mkdir(parents=True)  # job 3 has started, not finished
    summarize_sweep(sweep, draw=no_figures)
    page = (sweep / SUMMARY_MD).read_text()
    assert "3 job(s) with a result: 3 ok." in page
    assert "**Partial summary:** 1 job folder(s) hold no `result.json` yet" in page
    sweepindex.append_row(write_job(sweep, 3, "sqrt"))
    output = summarize_sweep(sweep, draw=no_figures)
    page = (sweep / SUMMARY_MD).read_text()
    assert "4 job(s) with a result: 4 ok." in page
    assert "Partial summary" not in page
    assert output.frame.job_num.tolist() == [0, 1, 2, 3]


# --- vectorised derived columns against their row-by-row definitions ---------------------------


def pareto_by_pairs(times: list[float], memory: list[float]) -> list[bool]:
    """The definition: no other point at least as good in both and strictly better in one."""
    return [
        not any(
            tj <= ti and mj <= mi and (tj < ti or mj < mi)
            for tj, mj in zip(times, memory, strict=True)
        )
        for ti, mi in zip(times, memory, strict=True)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_pareto_mask_equals_the_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    count = 60
    groups = pd.Series(rng.integers(0, 4, count))
    times = pd.Series(rng.integers(1, 8, count).astype(float))  # small ranges: many ties
    memory = pd.Series(rng.integers(1, 8, count).astype(float))
    mask = aggregate.pareto_mask(groups, times, memory)
    for group in range(4):
        at = groups.eq(group)
        expected = pareto_by_pairs(times[at].tolist(), memory[at].tolist())
        assert mask[at].tolist() == expected


def test_labels_equal_the_row_by_row_labels(tmp_path: Path) -> None:
    overrides = [["strategy=full", "strategy.granularity=sublayer", "seq.len=32"],
                 ["strategy=sqrt", "model=tiny"],
                 ["mystrategy.x=1", "strategy=none", "strategy.a=1", "strategy.b=2"]]  # fmt: skip
    for num, (strategy, said) in enumerate(zip(STRATEGIES, overrides, strict=True)):
        write_job(tmp_path, num, strategy, overrides=said, precision=["fp32", "bf16"][num % 2])
    write_result(tmp_path / "3", RunResult(status="oom", job_num=3, strategy="none"))
    table = load_results([tmp_path])
    assert table.strategy_label.tolist() == [
        "none granularity=sublayer",
        "full",
        "sqrt a=1 b=2",
        "none",
    ]
    assert table.workload.tolist() == [
        "16\u00d72 fp32",
        "16\u00d72 bf16",
        "16\u00d72 fp32",
        "?\u00d7? ?",
    ]
    assert table.config.tolist() == [
        f"{m} {w}" for m, w in zip(["tiny"] * 3 + ["?"], table.workload, strict=True)
    ]
