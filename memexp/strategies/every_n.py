"""`every_n`: checkpoint every n-th layer (layers n, 2n, 3n, … counting from one).

Each chosen layer keeps only its input and is recomputed whole in backward; the others keep
everything. `n: 1` is `full`; larger n trades memory back for compute in steps of one layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memexp.config import ConfigError
from memexp.plan import CheckpointPlan
from memexp.strategies.base import Strategy

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig


@dataclass
class EveryNConfig:
    name: str = "every_n"
    n: int = 2


def validate(cfg: EveryNConfig, model: ModelConfig) -> None:
    if not 1 <= cfg.n <= model.layers:
        raise ConfigError("strategy.n", cfg.n, f"between 1 and model.layers={model.layers}")


def make_plan(cfg: EveryNConfig, spec: ExperimentSpec) -> CheckpointPlan:
    layers = spec.model.layers
    chosen = [layer for layer in range(layers) if (layer + 1) % cfg.n == 0]
    return CheckpointPlan(layers, segments=tuple((layer, layer + 1) for layer in chosen))


STRATEGY = Strategy("every_n", EveryNConfig, make_plan, validate)
