"""Shared fixtures: configs composed from the package's own presets (memexp/conf/), and one tiny in-process sweep.

Configs come from Hydra's compose API, so a test of a config is a test of what a user gets. The
sweep runs the command line once per session (its one measured job takes seconds); the runner
tests and the sweep tests both read it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from memexp import CONF_DIR, callbacks, estimate, planner
from memexp.config import ExperimentSpec
from memexp.configure import register_configs, validate
from memexp.devices import BACKENDS, Backend, Figures
from memexp.measure.memory import MemoryMeasurement
from memexp.memo import workload_key
from memexp.plan import CheckpointPlan

# Every test config: the tiny model and no experiment tracker.
TINY = ("model=tiny", "logger=none")
# Measured jobs time their fewest steps (`measure.repeat`) and stop: on a shared machine a tiny
# step's time is rarely stable, so the default would time 2 s of steps per job, and no test's
# figure depends on how many steps were timed. A test that does sets its own.
BRIEF_TIMING = ("measure.max_time_s=0.01",)
# Hydra otherwise installs its own root log handlers in the test process.
QUIET_HYDRA = ("hydra/job_logging=none", "hydra/hydra_logging=none")
CONFIG_GROUPS = frozenset(path.name for path in CONF_DIR.iterdir() if path.is_dir())


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread() -> Iterator[None]:
    """Tests run tiny ops on shared cores, where intra-op threads mostly wait on each other.

    Every figure a test asserts (bytes, FLOPs, exact gradients) is independent of the count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_config(*overrides: str, hydra_config: bool = False) -> DictConfig:
    """memexp/conf/config.yaml with `overrides`, composed by Hydra's compose API."""
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=list(overrides), return_hydra_config=hydra_config)
    finally:
        GlobalHydra.instance().clear()


@functools.cache
def _composed_groups(groups: tuple[str, ...]) -> DictConfig:
    return compose_config(*TINY, *groups)


def tiny_config(*overrides: str) -> DictConfig:
    """The tiny model, no tracker, brief timing and `overrides`, as Hydra would compose them,
    only faster.

    Hydra takes a good part of a second to compose on a busy machine, so each choice of config
    groups is composed once; value overrides are then parsed by Hydra's override parser and
    applied the way its config loader applies them (`OmegaConf.update(..., merge=True)`), which
    type-checks them against the structured schema exactly as composition does.
    """
    parsed = OverridesParser.create().parse_overrides([*BRIEF_TIMING, *overrides])
    groups = tuple(o.input_line for o in parsed if o.key_or_group in CONFIG_GROUPS)
    cfg = copy.deepcopy(_composed_groups(groups))
    for override in parsed:
        if override.key_or_group not in CONFIG_GROUPS:
            OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


@pytest.fixture(scope="session", autouse=True)
def workload_figures_once() -> Iterator[None]:
    """The planner's profile and the step's FLOPs with nothing recomputed are pure functions of
    the workload (memexp.memo keeps them per sweep under the same key), and computing either on
    fake tensors takes seconds; many tests ask for the same tiny workload's. Within this session
    each is computed once and handed out as a fresh copy, decoded from its stored data as a
    sweep's later jobs get it."""
    profiles: dict[tuple[str, tuple[str, ...], bool], Any] = {}
    flops: dict[str, int] = {}
    profile, count = planner._profile_step, estimate._count_without_checkpointing

    def profile_once(
        spec: ExperimentSpec, storage_kinds: Sequence[str], operator_choices: bool
    ) -> planner.StepProfile:
        key = (workload_key(spec), tuple(storage_kinds), operator_choices)
        if key not in profiles:
            profiles[key] = planner.profile_to_data(profile(spec, storage_kinds, operator_choices))
        return planner.profile_from_data(copy.deepcopy(profiles[key]))

    def count_once(spec: ExperimentSpec) -> int:
        key = workload_key(spec)
        if key not in flops:
            flops[key] = count(spec)
        return flops[key]

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(planner, "_profile_step", profile_once)
        monkeypatch.setattr(estimate, "_count_without_checkpointing", count_once)
        yield


@pytest.fixture(scope="session")
def compose_cfg() -> Callable[..., DictConfig]:
    """`compose_cfg(*overrides, hydra_config=False)`: memexp/conf/config.yaml as the command line sees it."""
    return compose_config


@pytest.fixture(scope="session")
def tiny_cfg() -> Callable[..., DictConfig]:
    """`tiny_cfg(*overrides)`: the tiny model, no tracker, and `overrides`."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_spec() -> Callable[..., ExperimentSpec]:
    """`tiny_spec(*overrides)`: the validated tiny config, on a machine without CUDA."""

    def make(*overrides: str) -> ExperimentSpec:
        return validate(tiny_config(*overrides), cuda_available=False)

    return make


@dataclass(frozen=True)
class FailingBackend:
    """A device backend whose measurements of the named strategies' jobs raise; every other
    job is measured by `backend` as usual. The failure comes where a real one would, once the
    job is configured and its plan recorded."""

    backend: Backend
    failures: dict[str, BaseException]  # strategy name → what its jobs raise

    def measure(self, spec: ExperimentSpec, plan: CheckpointPlan) -> Figures:
        if spec.strategy.name in self.failures:
            raise self.failures[spec.strategy.name]
        return self.backend.measure(spec, plan)

    def time_units(self, spec: ExperimentSpec) -> dict[str, float]:
        return self.backend.time_units(spec)

    def theory(self, spec: ExperimentSpec, plan: CheckpointPlan) -> dict[str, Any]:
        return self.backend.theory(spec, plan)

    def memory_step(self, spec: ExperimentSpec, plan: CheckpointPlan) -> MemoryMeasurement | None:
        return self.backend.memory_step(spec, plan)


def fail_strategies(monkeypatch: pytest.MonkeyPatch, failures: dict[str, BaseException]) -> None:
    """Make the named strategies' jobs fail at their first measurement, through the backend
    registry (the seam `memexp.devices` documents); the others run as usual."""
    if not failures:
        return
    for kind, backend in list(BACKENDS.items()):
        monkeypatch.setitem(BACKENDS, kind, FailingBackend(backend, failures))


@dataclass
class SweepRun:
    exit_code: int
    stdout: str
    cwd: Path  # the folder the command was started in
    failures: dict[str, BaseException]  # strategy → what its job raised


def _run_cli(
    monkeypatch: pytest.MonkeyPatch,
    cwd: Path,
    failures: dict[str, BaseException],
    overrides: tuple[str, ...],
) -> SweepRun:
    """`python -m memexp -m <overrides>` in this process, started in `cwd`."""
    from memexp.__main__ import cli

    fail_strategies(monkeypatch, failures)
    # The sweep's tables and plots have their own tests and take seconds to draw.
    monkeypatch.setattr(callbacks, "aggregate_and_log", lambda config, sweep_dir, table: None)
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(
        sys, "argv", ["memexp", "-m", *TINY, *QUIET_HYDRA, *BRIEF_TIMING, *overrides]
    )
    out = io.StringIO()
    GlobalHydra.instance().clear()
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
            cli()
    finally:
        GlobalHydra.instance().clear()
    return SweepRun(int(exited.value.code), out.getvalue(), cwd, failures)


@pytest.fixture
def run_sweep(monkeypatch: pytest.MonkeyPatch) -> Callable[..., SweepRun]:
    """Run a sweep from the command line in this process: `run_sweep(cwd, failures, *overrides)`."""

    def run(cwd: Path, failures: dict[str, BaseException], *overrides: str) -> SweepRun:
        return _run_cli(monkeypatch, cwd, failures, overrides)

    return run


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory: pytest.TempPathFactory) -> SweepRun:
    """`-m strategy=none,full,sqrt` on the tiny model: none runs, full crashes, sqrt runs out of memory.

    Started in an empty folder with Hydra's default sweep folder, so the folder layout is the
    real one.
    """
    failures: dict[str, BaseException] = {
        "full": RuntimeError("simulated failure inside the job"),
        "sqrt": torch.OutOfMemoryError("simulated: CUDA out of memory. Tried to allocate 20 GiB"),
    }
    overrides = ("strategy=none,full,sqrt", "measure.repeat=1")
    with pytest.MonkeyPatch.context() as monkeypatch:
        return _run_cli(monkeypatch, tmp_path_factory.mktemp("sweep"), failures, overrides)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests need CUDA: without it they are reported as skipped, never silently passed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
