"""`full`: recompute every layer in backward.

`granularity: layer` checkpoints whole layers (only each layer's input is kept);
`granularity: sublayer` checkpoints the attention and FFN sub-blocks separately, which also
keeps the residual stream between them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memexp.config import ConfigError
from memexp.plan import CheckpointPlan, Part
from memexp.strategies.base import Strategy

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig

GRANULARITIES = ("layer", "sublayer")


@dataclass
class FullConfig:
    name: str = "full"
    granularity: str = "layer"


def validate(cfg: FullConfig, model: ModelConfig) -> None:
    if cfg.granularity not in GRANULARITIES:
        raise ConfigError("strategy.granularity", cfg.granularity, "one of layer, sublayer")


def make_plan(cfg: FullConfig, spec: ExperimentSpec) -> CheckpointPlan:
    layers = spec.model.layers
    if cfg.granularity == "layer":
        return CheckpointPlan(layers, segments=tuple((i, i + 1) for i in range(layers)))
    parts = tuple((i, part) for i in range(layers) for part in (Part.ATTENTION, Part.FFN))
    return CheckpointPlan(layers, parts=parts)


STRATEGY = Strategy("full", FullConfig, make_plan, validate)
