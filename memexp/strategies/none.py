"""`none`: keep every activation; the baseline every other strategy is compared against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memexp.plan import CheckpointPlan
from memexp.strategies.base import Strategy

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec


@dataclass
class NoneConfig:
    name: str = "none"


def make_plan(cfg: NoneConfig, spec: ExperimentSpec) -> CheckpointPlan:
    return CheckpointPlan.nothing(spec.model.layers)


STRATEGY = Strategy("none", NoneConfig, make_plan)
