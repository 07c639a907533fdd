"""What every strategy is: a name, a config schema, its checks, a plan, and how a job runs it.

The runner calls `execute` for every strategy, with a `measure` function of its own: measuring a
plan runs (or predicts) its step on the job's device and records the figures. Most strategies
plan once and measure once; a strategy that checks its plan against measured figures (adaptive,
held to a memory budget) overrides `execute`, so the runner never needs to know it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig
    from memexp.devices import Figures
    from memexp.plan import CheckpointPlan

Measure = Callable[["CheckpointPlan"], "Figures"]


def _accept_any(strategy_cfg: Any, model: ModelConfig) -> None:
    """Strategies without cross-field constraints need no checks beyond their schema's types."""


@dataclass
class Outcome:
    """What executing a strategy adds to the job's record besides the measured figures.

    `extra`: the strategy's own record content (adaptive's planning rounds), as plain data.
    `verdict`: when set, the job's answer is this error (adaptive's budget not met), raised by
    the runner once the record holds everything measured.
    """

    extra: dict[str, Any] = field(default_factory=dict)
    verdict: Exception | None = None


@dataclass(frozen=True)
class Strategy:
    name: str
    config_class: type
    make_plan: Callable[[Any, ExperimentSpec], CheckpointPlan]
    validate: Callable[[Any, ModelConfig], None] = _accept_any

    def execute(self, spec: ExperimentSpec, measure: Measure) -> Outcome:
        """Plan once, measure once."""
        measure(self.make_plan(spec.strategy, spec))
        return Outcome()
