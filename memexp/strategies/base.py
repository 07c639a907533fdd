"""What a strategy is: a typed config, a planner that turns it into a CheckpointPlan, and its own checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memexp.plan import CheckpointPlan

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig


def _accept_any(strategy_cfg: Any, model: ModelConfig) -> None:
    """Strategies without cross-field constraints need no checks beyond their schema's types."""


@dataclass(frozen=True)
class Strategy:
    name: str
    config_class: type
    make_plan: Callable[[Any, ExperimentSpec], CheckpointPlan]
    validate: Callable[[Any, ModelConfig], None] = _accept_any
