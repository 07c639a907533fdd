"""Launcher presets: what each one sets, and that a sweep's figures do not depend on the launcher."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SweepRun, compose_config
from omegaconf import DictConfig, OmegaConf

from memexp import launchers, reproduce
from memexp.job import run_guarded
from memexp.results import read_result
from memexp.sweepdir import RESULT_FILE


def hydra_config(*overrides: str) -> DictConfig:
    launchers.register_resolvers()
    return compose_config("model=tiny", "logger=none", *overrides, hydra_config=True).hydra


def test_process_per_job_runs_one_job_at_a_time_and_sees_the_gpu() -> None:
    hydra = hydra_config("hydra/launcher=process_per_job")
    assert hydra.launcher._target_ == launchers.SUBMITIT_LOCAL
    assert hydra.launcher.gpus_per_node == 1
    assert hydra.sweeper.max_batch_size == 1


@pytest.mark.slow
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
    ("preset", "target_class"),
    [
        pytest.param("parallel", "JoblibLauncher", marks=pytest.mark.slow),
        ("basic", "BasicLauncher"),
    ],
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


def sbatch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *overrides: str) -> str:
    """The job script hydra/launcher=slurm would submit for a job of `overrides`: the launcher
    built from the composed config, its parameters handed to submitit's SLURM executor as the
    plugin hands them. A stand-in `srun` on PATH is all the executor asks of the machine."""
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit import AutoExecutor

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    launchers.register_resolvers()
    cfg = compose_config(
        "model=tiny", "logger=none", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}",
        *overrides, hydra_config=True,
    )  # fmt: skip
    params = instantiate(cfg.hydra.launcher).params
    executor = AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    params.pop("max_num_timeout")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m memexp", "uid")


@pytest.mark.parametrize(
    ("overrides", "gpus_per_node", "nodes", "tasks_per_node"),
    [
        pytest.param((), None, 1, 1, marks=pytest.mark.slow),  # one device: one task, one GPU
        pytest.param(("parallel=ddp", "parallel.world_size=4"), None, 1, 4, marks=pytest.mark.slow),
        # nodes of 8 GPUs by default
        pytest.param(
            ("parallel=fsdp", "parallel.world_size=16"), None, 2, 8, marks=pytest.mark.slow
        ),
        pytest.param(
            ("parallel=fsdp", "parallel.world_size=16"), "4", 4, 4, marks=pytest.mark.slow
        ),
    ],
)
def test_slurm_asks_for_a_task_and_a_gpu_per_rank_on_whole_nodes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    overrides: tuple[str, ...],
    gpus_per_node: str | None,
    nodes: int,
    tasks_per_node: int,
) -> None:
    if gpus_per_node is None:
        monkeypatch.delenv("MEMEXP_GPUS_PER_NODE", raising=False)
    else:
        monkeypatch.setenv("MEMEXP_GPUS_PER_NODE", gpus_per_node)
    script = sbatch_script(tmp_path, monkeypatch, *overrides).splitlines()
    assert f"#SBATCH --nodes={nodes}" in script
    assert f"#SBATCH --ntasks-per-node={tasks_per_node}" in script
    assert f"#SBATCH --gpus-per-node={tasks_per_node}" in script
    # srun starts every task, each running the job as one rank (memexp.ranks reads SLURM's ids).
    (command,) = [line for line in script if line.startswith("srun ")]
    assert command.endswith("python -m memexp")


def test_slurm_refuses_a_world_that_does_not_fill_whole_nodes() -> None:
    with pytest.raises(ValueError, match=r"world_size=12 does not fill nodes of 8 GPUs"):
        launchers.nodes_for(12, "8")
    assert (launchers.nodes_for(24, "8"), launchers.ranks_per_node(24, "8")) == (3, 8)


@pytest.mark.slow
def test_only_rank_zero_of_a_cluster_started_job_writes_its_record(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under srun every task runs the job; the others run it beside rank 0 and write nothing
    into the job's folder. The job fails its validation here, before any rank needs another."""
    cfg = tiny_cfg("model.heads=5")
    ids = {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu01"}
    for name, value in ids.items():
        monkeypatch.setenv(name, value)
    for rank in ("1", "0"):
        monkeypatch.setenv("SLURM_PROCID", rank)
        monkeypatch.setenv("SLURM_LOCALID", rank)
        folder = tmp_path / rank
        folder.mkdir()
        returned = run_guarded(cfg, folder, {"overrides": [], "sweep_dir": None}, folder)
        assert (folder / RESULT_FILE).is_file() == (rank == "0")
        assert (returned is None) == (rank == "1")
