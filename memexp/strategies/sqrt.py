"""`sqrt` (Chen et al. 2016): split the L layers into ⌈√L⌉ segments and keep only segment inputs.

Activation memory then grows as O(√L) in stored segment inputs plus one segment's worth of
recomputed activations during its backward, for one extra forward pass of compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from memexp.config import ConfigError
from memexp.plan import CheckpointPlan
from memexp.strategies.base import Strategy

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig


@dataclass
class SqrtConfig:
    name: str = "sqrt"
    segments: int | None = None  # default ⌈√L⌉


def segment_count(cfg: SqrtConfig, layers: int) -> int:
    return cfg.segments if cfg.segments is not None else math.ceil(math.sqrt(layers))


def validate(cfg: SqrtConfig, model: ModelConfig) -> None:
    if cfg.segments is not None and not 1 <= cfg.segments <= model.layers:
        raise ConfigError(
            "strategy.segments", cfg.segments, f"between 1 and model.layers={model.layers}"
        )


def split_evenly(layers: int, count: int) -> tuple[tuple[int, int], ...]:
    """Contiguous ranges whose sizes differ by at most one, larger ones first."""
    base, extra = divmod(layers, count)
    bounds, start = [], 0
    for index in range(count):
        end = start + base + (1 if index < extra else 0)
        bounds.append((start, end))
        start = end
    return tuple(bounds)


def make_plan(cfg: SqrtConfig, spec: ExperimentSpec) -> CheckpointPlan:
    layers = spec.model.layers
    return CheckpointPlan(layers, segments=split_evenly(layers, segment_count(cfg, layers)))


STRATEGY = Strategy("sqrt", SqrtConfig, make_plan, validate)
