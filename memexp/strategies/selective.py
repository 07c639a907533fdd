"""`selective`: recompute one part of every layer, keep the rest.

`part: attention_core` (the default) is Megatron-LM's selective recomputation (Korthikanti et
al. 2022): only QKᵀ, softmax and ·V run again in backward, so the a·b·s² attention
probabilities — the tensors that grow with the square of the sequence — are the ones dropped,
for the FLOPs of one extra QKᵀ. `part: attention` recomputes the whole attention sub-block,
`part: ffn` the whole FFN sub-block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memexp.config import ConfigError
from memexp.plan import CheckpointPlan, Part
from memexp.strategies.base import Strategy

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig

PARTS = tuple(part.value for part in Part)


@dataclass
class SelectiveConfig:
    name: str = "selective"
    part: str = Part.ATTENTION_CORE.value


def validate(cfg: SelectiveConfig, model: ModelConfig) -> None:
    if cfg.part not in PARTS:
        raise ConfigError("strategy.part", cfg.part, "one of " + ", ".join(PARTS))


def make_plan(cfg: SelectiveConfig, spec: ExperimentSpec) -> CheckpointPlan:
    layers = spec.model.layers
    return CheckpointPlan(layers, parts=tuple((layer, Part(cfg.part)) for layer in range(layers)))


STRATEGY = Strategy("selective", SelectiveConfig, make_plan, validate)
