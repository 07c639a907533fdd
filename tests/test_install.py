"""memexp as a user installs it: the wheel alone runs a job from any folder.

The wheel is built from a copy of the package's sources (so the checkout stays clean) and
unpacked into a folder put first on the path; the job then runs in a folder of its own, where
only the installed copy, its presets included, can be found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memexp.results import STATUS_OK, read_result
from memexp.sweepdir import RESULT_FILE

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "memexp")


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    finished = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    return finished.stdout


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy(ROOT / name, source / name)
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-w", str(wheels)]
    run([*pip_wheel, "--quiet"], cwd=tmp_path)
    [wheel] = wheels.glob("memexp-*.whl")
    return wheel


@pytest.mark.slow
def test_the_installed_wheel_runs_a_job_from_another_folder(tmp_path: Path) -> None:
    target = tmp_path / "installed"
    pip_install = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet"]
    wheel = build_wheel(tmp_path)
    run([*pip_install, "--target", str(target), str(wheel)], cwd=tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}

    module_file = run(
        [sys.executable, "-c", "import memexp; print(memexp.__file__)"], elsewhere, env
    )
    assert Path(module_file.strip()).is_relative_to(target)
    job_dir = elsewhere / "job"
    job = ["model=tiny", "logger=none", "device=cpu", f"hydra.run.dir={job_dir}"]
    run([sys.executable, "-m", "memexp", *job], elsewhere, env)

    record = read_result(job_dir / RESULT_FILE)
    assert record.status == STATUS_OK
    wheel_version = wheel.name.split("-")[1]  # memexp-<version>-py3-none-any.whl
    assert record.environment["memexp_version"] == wheel_version
    assert record.environment["git_commit"] is None  # an installed copy has no commit of its own
