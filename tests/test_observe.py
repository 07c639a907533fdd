"""The job observer: measurement reports each timed step to whoever listens, and to no one by default."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from memexp.config import ExperimentSpec
from memexp.measure.timing import StoppingRule, time_steps
from memexp.observe import NO_OBSERVER, JobObserver, current_observer, observing
from memexp.plan import CheckpointPlan
from memexp.results import RunResult
from memexp.training import build_workload


class Recorder(JobObserver):
    def __init__(self) -> None:
        self.steps: list[tuple[dict[str, float], int | None]] = []

    def on_step(self, phase_ms: Mapping[str, float], allocated_bytes: int | None) -> None:
        self.steps.append((dict(phase_ms), allocated_bytes))


def test_each_timed_step_is_reported_with_the_very_samples_timed(
    tiny_spec: Callable[..., ExperimentSpec],
) -> None:
    spec = tiny_spec("device=cpu")
    work = build_workload(spec, CheckpointPlan.nothing(spec.model.layers), "cpu")
    recorder = Recorder()
    with observing(recorder):
        timings = time_steps(work, warmup=1, rule=StoppingRule.fixed(3))
    assert current_observer() is NO_OBSERVER  # the listener leaves with the block
    assert len(recorder.steps) == 3 == timings.steps  # timed steps only, not the warm-up
    for phase, samples in timings.samples_ms.items():
        assert [phase_ms[phase] for phase_ms, _ in recorder.steps] == samples
    assert {allocated for _, allocated in recorder.steps} == {None}  # the CPU keeps no count


def test_the_default_observer_hears_nothing(tmp_path: Path) -> None:
    NO_OBSERVER.on_step({"step": 1.0}, 5)
    NO_OBSERVER.on_finish(RunResult(status="ok"), tmp_path)
    assert list(tmp_path.iterdir()) == []
