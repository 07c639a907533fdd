"""Reproduction: replayed jobs get their saved configs, and the comparison fails on what must not move.

The rerun itself (a subprocess sweep) is exercised in test_launchers.py, under another launcher;
here the session's tiny sweep (none ok, full error, sqrt oom) is compared with copies of itself.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import CONF_DIR, SweepRun
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from memexp import reproduce
from memexp.configure import register_configs
from memexp.reproduce import (
    EXACT_FIGURES,
    LOSS_RTOL,
    TRACKED_MEMORY_FIGURES,
    JobComparison,
    compare_records,
    compare_sweeps,
    launch_settings,
    read_saved_jobs,
    render,
    replay_command,
    replay_config,
)
from memexp.results import RESULT_FILE, read_result


def copy_sweep(sweep: SweepRun, to: Path) -> Path:
    (folder,) = (sweep.cwd / "outputs" / "multirun").glob("*/*")
    return Path(shutil.copytree(folder, to))


def edit_record(job_dir: Path, **changes: Any) -> None:
    path = job_dir / RESULT_FILE
    record = json.loads(path.read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            record[outer][inner] = value
        else:
            record[key] = value
    path.write_text(json.dumps(record))


@pytest.fixture
def pair(tiny_sweep: SweepRun, tmp_path: Path) -> tuple[Path, Path]:
    """Two private copies of the tiny sweep: an original and a perfect reproduction of it."""
    return copy_sweep(tiny_sweep, tmp_path / "original"), copy_sweep(tiny_sweep, tmp_path / "rerun")


@pytest.mark.slow
def test_a_replayed_job_composes_to_its_saved_config_whatever_the_presets_say(
    tiny_sweep: SweepRun, tmp_path: Path
) -> None:
    sweep_dir = copy_sweep(tiny_sweep, tmp_path / "original")
    saved = sweep_dir / "0" / ".hydra" / "config.yaml"
    config = OmegaConf.load(saved)
    config.model.hidden = 64  # as if memexp/conf/model/tiny.yaml had said 64 when the sweep ran
    OmegaConf.save(config, saved)
    (job, *_) = read_saved_jobs(sweep_dir)
    group_dir = tmp_path / "replay_conf" / reproduce.REPLAY_GROUP
    group_dir.mkdir(parents=True)
    (group_dir / "job_0.yaml").write_text(replay_config(job, sweep_dir))

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            replayed = compose(
                "config", [f"hydra.searchpath=[file://{group_dir.parent}]", "+replay=job_0"]
            )
    finally:
        GlobalHydra.instance().clear()

    assert replayed.model.hidden == 64
    assert OmegaConf.to_container(replayed, enum_to_str=True) == {
        **OmegaConf.to_container(config),
        "resume": None,
    }


@pytest.mark.slow
def test_the_rerun_keeps_the_original_launcher_and_its_settings(
    tiny_sweep: SweepRun, tmp_path: Path
) -> None:
    jobs = read_saved_jobs(copy_sweep(tiny_sweep, tmp_path / "original"))
    assert [job.num for job in jobs] == [0, 1, 2]
    assert (jobs[0].launcher, jobs[0].launcher_target.rsplit(".", 1)[1]) == (
        "basic",
        "BasicLauncher",
    )
    slurm = [
        dataclasses.replace(
            jobs[0], launcher="slurm", launcher_overrides=["hydra.launcher.partition=gpu"]
        )
    ]
    assert launch_settings(slurm, None) == ("slurm", ["hydra.launcher.partition=gpu"])
    assert launch_settings(slurm, "slurm") == ("slurm", ["hydra.launcher.partition=gpu"])
    assert launch_settings(slurm, "process_per_job") == ("process_per_job", [])

    command = replay_command(
        jobs, tmp_path / "original", tmp_path / "c", tmp_path / "o", "basic", []
    )
    assert "+replay=job_0,job_1,job_2" in command
    assert "hydra/launcher=basic" in command
    assert {"model=tiny", "logger=none", "measure.repeat=1"} <= set(command)
    assert not any(part.startswith("strategy=") for part in command)  # the sweep is the replay's


@pytest.mark.slow
def test_an_identical_sweep_compares_clean(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    original, rerun = pair
    assert reproduce.main([str(original), "--compare-with", str(rerun)]) == 0
    report = capsys.readouterr().out
    assert not (rerun / reproduce.REPORT_FILE).exists()  # nothing written into the other folder
    assert "Every deterministic figure matches" in report
    assert "ok / ok" in report and "error / error" in report and "oom / oom" in report


@pytest.mark.slow
def test_a_doctored_figure_in_the_original_fails_and_is_named(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    original, rerun = pair
    saved = read_result(original / "0").saved_activation_bytes
    edit_record(original / "0", saved_activation_bytes=saved + 4)

    assert reproduce.main([str(original), "--compare-with", str(rerun)]) == 1
    overrides = " ".join(read_result(original / "0").overrides)
    expected = (
        f"job 0 ({overrides}): saved_activation_bytes: original {saved + 4}, reproduction {saved}"
    )
    assert expected in capsys.readouterr().out
    assert f"not reproduced: {expected}" in caplog.messages


@pytest.mark.slow
def test_the_loss_is_compared_within_its_stated_tolerance(tiny_sweep: SweepRun) -> None:
    (folder,) = (tiny_sweep.cwd / "outputs" / "multirun").glob("*/*")
    record = read_result(folder / "0")
    for factor, differs in ((1 + LOSS_RTOL / 10, False), (1 + LOSS_RTOL * 10, True)):
        rerun = dataclasses.replace(record, loss_first_step=record.loss_first_step * factor)
        comparison = JobComparison(0, [], "ok")
        compare_records(comparison, record, rerun)
        assert bool(comparison.differences) is differs, factor
        assert comparison.checked == len(EXACT_FIGURES) + 1 + len(TRACKED_MEMORY_FIGURES)


@pytest.mark.slow
def test_time_and_environment_are_reported_never_failed(pair: tuple[Path, Path]) -> None:
    original, rerun = pair
    step = read_result(original / "0").step_ms_median
    edit_record(rerun / "0", step_ms_median=step * 10, **{"environment.torch": "0.0.1"})

    comparison = compare_sweeps(original, rerun)
    text = render(comparison)
    assert not comparison.differences
    assert "10.00×" in text and "(outside)" in text
    assert "warning: torch differs" in text and "reproduction 0.0.1" in text


@pytest.mark.slow
def test_jobs_pair_by_config_whatever_their_folder_numbers(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The rerun's folders 0 and 2 swapped, as a sweep with its overrides in another order."""
    original, rerun = pair
    (rerun / "0").rename(rerun / "swap")
    (rerun / "2").rename(rerun / "0")
    (rerun / "swap").rename(rerun / "2")
    assert reproduce.main([str(original), "--compare-with", str(rerun)]) == 0
    assert "ok / ok" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("side", ["original", "rerun"])
def test_a_damaged_record_is_named_and_exits_2(
    pair: tuple[Path, Path],
    side: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    original, rerun = pair
    damaged = dict(zip(("original", "rerun"), pair, strict=True))[side] / "1" / RESULT_FILE
    damaged.write_text('{"status": "ok", "peak_')
    assert reproduce.main([str(original), "--compare-with", str(rerun)]) == 2
    assert any(f"{damaged} is not a readable record" in line for line in caplog.messages)
    assert "could not be read" in capsys.readouterr().out


@pytest.mark.slow
def test_a_folder_without_its_config_is_named_never_dropped(
    pair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    original, rerun = pair
    shutil.rmtree(original / "1" / ".hydra")
    shutil.rmtree(rerun / "2" / ".hydra")
    # compared by their records' config hashes: nothing is lost, nothing is renumbered
    assert reproduce.main([str(original), "--compare-with", str(rerun)]) == 0
    jobs = compare_sweeps(original, rerun, replayed=True).jobs
    assert [job.num for job in jobs] == [0, 1, 2]
    assert jobs[1].unreadable == [
        "cannot be replayed: no readable .hydra/hydra.yaml and .hydra/config.yaml "
        "(FileNotFoundError)"
    ]
    assert not jobs[0].unreadable and not jobs[2].unreadable


@pytest.mark.slow
def test_compare_with_a_missing_folder_exits_2_before_any_report(
    pair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    original, _ = pair
    assert reproduce.main([str(original), "--compare-with", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().out == ""
    assert caplog.messages == [f"--compare-with {tmp_path / 'nowhere'}: no such folder"]
