"""`compress`: store what a checkpoint plan saves at lower precision (bf16, fp8 or int8).

Any of the fixed plans (`base`: none, full, sqrt or selective, each with its default settings)
decides what is recomputed; `dtype` decides how everything it still saves is stored
(memexp.storage): bf16 halves fp32 activations, fp8 (e4m3, one scale per tensor) and int8 (one
scale per last-dim channel) quarter them. The forward is unchanged, so the loss is exactly the
base plan's; the backward reads rounded activations, so the gradients are not: a measured job
records their relative error against the same step stored as made (same seed, same batch).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from memexp.config import ConfigError
from memexp.plan import CheckpointPlan
from memexp.storage import COMPRESSED_KINDS
from memexp.strategies.base import Strategy
from memexp.strategies.full import STRATEGY as FULL
from memexp.strategies.none import STRATEGY as NONE
from memexp.strategies.selective import STRATEGY as SELECTIVE
from memexp.strategies.sqrt import STRATEGY as SQRT

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig

BASES: dict[str, Strategy] = {base.name: base for base in (NONE, FULL, SQRT, SELECTIVE)}


@dataclass
class CompressConfig:
    name: str = "compress"
    dtype: str = "int8"
    base: str = "none"


def validate(cfg: CompressConfig, model: ModelConfig) -> None:
    if cfg.dtype not in COMPRESSED_KINDS:
        raise ConfigError("strategy.dtype", cfg.dtype, "one of " + ", ".join(COMPRESSED_KINDS))
    if cfg.base not in BASES:
        raise ConfigError("strategy.base", cfg.base, "one of " + ", ".join(BASES))


def make_plan(cfg: CompressConfig, spec: ExperimentSpec) -> CheckpointPlan:
    base = BASES[cfg.base]
    return replace(base.make_plan(base.config_class(), spec), storage=cfg.dtype)


STRATEGY = Strategy("compress", CompressConfig, make_plan, validate)
