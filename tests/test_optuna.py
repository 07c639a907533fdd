"""`hydra/sweeper=optuna`: a search over memexp jobs finishes and names its best trial."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from memexp.objective import PENALTY

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[optuna]'")


@pytest.mark.slow
def test_optuna_finds_the_fastest_tiny_job_within_the_budget(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "search"
    command = [
        sys.executable,
        "-m",
        "memexp",
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.seed=0",
        f"hydra.sweep.dir={sweep_dir}",
        "model=tiny",
        "device=cpu",
        "logger=none",
        "measure.repeat=1",
        "batch.budget_gb=1",
        "strategy=choice(none,full)",
        "batch.size=range(1,2)",
    ]
    finished = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"strategy", "batch.size"}
    assert 0 < best["best_value"] < PENALTY
    assert len(list(sweep_dir.glob("*/result.json"))) == 3
