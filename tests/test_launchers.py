"""Launcher presets: what each one sets, and that a sweep's figures do not depend on the launcher."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SweepRun, compose_config
from omegaconf import DictConfig

from memexp import launchers, reproduce
from memexp.results import read_result


def hydra_config(*overrides: str) -> DictConfig:
    launchers.register_resolvers()
    return compose_config("model=tiny", "logger=none", *overrides, hydra_config=True).hydra


def test_process_per_job_runs_one_job_at_a_time_and_sees_the_gpu() -> None:
    hydra = hydra_config("hydra/launcher=process_per_job")
    assert hydra.launcher._target_ == launchers.SUBMITIT_LOCAL
    assert hydra.launcher.gpus_per_node == 1
    assert hydra.sweeper.max_batch_size == 1


def test_slurm_takes_partition_and_account_from_sbatch_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SBATCH_PARTITION", "gpu-short")
    monkeypatch.setenv("SBATCH_ACCOUNT", "proj42")
    hydra = hydra_config("hydra/launcher=slurm")
    assert hydra.launcher._target_.endswith("SlurmLauncher")
    assert (hydra.launcher.partition, hydra.launcher.account) == ("gpu-short", "proj42")
    assert (hydra.launcher.gpus_per_node, hydra.launcher.tasks_per_node) == (1, 1)
    assert hydra.sweeper.max_batch_size is None  # the whole sweep is one job array
    monkeypatch.delenv("SBATCH_PARTITION")
    assert hydra_config("hydra/launcher=slurm").launcher.partition is None


@pytest.mark.parametrize(
    ("preset", "target_class"), [("parallel", "JoblibLauncher"), ("basic", "BasicLauncher")]
)
def test_other_launchers_get_the_whole_sweep(preset: str, target_class: str) -> None:
    hydra = hydra_config(f"hydra/launcher={preset}")
    assert hydra.launcher._target_.endswith(target_class)
    assert hydra.sweeper.max_batch_size is None


@pytest.mark.slow
def test_a_basic_sweep_rerun_with_a_process_per_job_gives_the_same_figures(
    run_sweep: Callable[..., SweepRun], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reproduction of a sweep run in this process, each of its jobs in a process of its own."""
    original = tmp_path / "basic"
    run = run_sweep(
        tmp_path, {}, "strategy=none,full", "measure.repeat=1", f"hydra.sweep.dir={original}"
    )
    assert run.exit_code == 0
    rerun = tmp_path / "process_per_job"
    # One thread per process: on two shared cores, a process's threads mostly wait on each other.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    exit_code = reproduce.main(
        [str(original), "--launcher", "process_per_job", "--out", str(rerun)]
    )

    assert exit_code == 0
    assert "Every deterministic figure matches" in (rerun / reproduce.REPORT_FILE).read_text()
    records = [read_result(rerun / str(num)) for num in (0, 1)]
    assert [(r.job_num, r.sweep_dir, r.strategy) for r in records] == [
        (0, str(rerun), "none"),
        (1, str(rerun), "full"),
    ]
    submitted = [p for p in (rerun / ".submitit").iterdir() if p.name.isdigit()]
    assert len(submitted) == 2  # one submitit job, so one process, per sweep job
    assert (rerun / "results.csv").is_file()  # the rerun is a sweep of its own, aggregated
