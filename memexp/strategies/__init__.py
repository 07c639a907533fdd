"""The strategy registry: one module per strategy, each exporting `STRATEGY`.

`STRATEGIES` is where configuration, validation and the runner (`strategy_for`) look a
strategy up by its name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from memexp.strategies import (
    adaptive,
    compile_budget,
    compress,
    every_n,
    full,
    none,
    offload,
    op,
    sac_milp,
    selective,
    sqrt,
)
from memexp.strategies.base import Strategy

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec
    from memexp.plan import CheckpointPlan

STRATEGIES: dict[str, Strategy] = {
    module.STRATEGY.name: module.STRATEGY
    for module in (
        none,
        full,
        sqrt,
        selective,
        every_n,
        op,
        offload,
        compress,
        adaptive,
        sac_milp,
        compile_budget,
    )
}


def make_plan(spec: ExperimentSpec) -> CheckpointPlan:
    return STRATEGIES[spec.strategy.name].make_plan(spec.strategy, spec)


def strategy_for(spec: ExperimentSpec) -> Strategy:
    return STRATEGIES[spec.strategy.name]
