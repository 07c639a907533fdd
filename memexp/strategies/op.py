"""`op`: an op-level policy inside every layer's checkpoint (selective activation checkpointing).

Each layer runs under `torch.utils.checkpoint` with a `create_selective_checkpoint_contexts`
policy (see `memexp.model.OP_POLICIES`): `save_matmuls` keeps the output of every matrix
product and fused attention and recomputes only the cheap operators between them (LayerNorm,
GELU, softmax, copies). FlopCounterMode counts matrix products only, so this strategy's
recompute FLOPs are 0 by construction: its cost is element-wise work, visible in step time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memexp.config import ConfigError
from memexp.plan import OP_POLICY_NAMES, CheckpointPlan
from memexp.strategies.base import Strategy

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig


@dataclass
class OpConfig:
    name: str = "op"
    policy: str = "save_matmuls"


def validate(cfg: OpConfig, model: ModelConfig) -> None:
    if cfg.policy not in OP_POLICY_NAMES:
        raise ConfigError("strategy.policy", cfg.policy, "one of " + ", ".join(OP_POLICY_NAMES))


def make_plan(cfg: OpConfig, spec: ExperimentSpec) -> CheckpointPlan:
    layers = spec.model.layers
    segments = tuple((layer, layer + 1) for layer in range(layers))
    return CheckpointPlan(layers, segments=segments, op_policy=cfg.policy)


STRATEGY = Strategy("op", OpConfig, make_plan, validate)
