"""Structured configs (typed at composition) and the semantic checks that run before any model is built.

Hydra checks types when it composes; everything that depends on two fields at once (hidden
divisible by heads, sequence within the model's maximum) or on the machine (is there a GPU?)
is checked here, so a bad sweep value fails with one sentence instead of a traceback.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

ATTENTION_KINDS = ("naive", "sdpa")
DEVICE_TYPES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
OPTIMIZERS = ("adam", "adamw", "sgd")


class ConfigError(ValueError):
    """A config value that cannot run: names the field, the value, and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str) -> None:
        self.field_name = field_name
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field_name}={value!r} is not allowed: {allowed}")


@dataclass
class ModelConfig:
    name: str = MISSING
    vocab_size: int = MISSING
    hidden: int = MISSING
    layers: int = MISSING
    heads: int = MISSING
    ffn_hidden: int = MISSING
    max_seq_len: int = MISSING
    attention: str = "naive"
    # The preset's own workload, used when seq/batch are left at their `default` option.
    seq_len: int = MISSING
    batch_size: int = MISSING


@dataclass
class SeqConfig:
    len: int = MISSING


@dataclass
class BatchConfig:
    size: int = MISSING


@dataclass
class DeviceConfig:
    type: str = "auto"


@dataclass
class OptimizerConfig:
    name: str = "adam"
    lr: float = 1e-3


@dataclass
class MeasureConfig:
    warmup: int = 1
    repeat: int = 3


@dataclass
class Config:
    model: ModelConfig = MISSING
    # Each strategy brings its own schema (see memexp.strategies), so the node is untyped here.
    strategy: Any = MISSING
    seq: SeqConfig = MISSING
    batch: BatchConfig = MISSING
    device: DeviceConfig = MISSING
    logger: Any = field(default_factory=lambda: {"name": "none"})
    precision: str = "fp32"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 0
    measure: MeasureConfig = field(default_factory=MeasureConfig)


def _unique_suffix() -> str:
    """A short random tag: two sweeps started in the same second never share a folder."""
    return secrets.token_hex(3)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore so YAML files extend them and get type checks.

    Also registers `${memexp_unique:}`, cached so every job of one sweep sees the same value
    (Hydra copies the resolver cache from the sweep's config to each job's).
    """
    from memexp.strategies import STRATEGIES

    OmegaConf.register_new_resolver("memexp_unique", _unique_suffix, use_cache=True, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="memexp_schema", node=Config)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="seq", name="schema", node=SeqConfig)
    cs.store(group="batch", name="schema", node=BatchConfig)
    cs.store(group="device", name="schema", node=DeviceConfig)
    for name, strategy in STRATEGIES.items():
        cs.store(group="strategy", name=f"schema_{name}", node=strategy.config_class)


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated job: plain values, safe to hand to the model, planner and runner."""

    model: ModelConfig
    strategy: Any
    seq_len: int
    batch_size: int
    device: str
    precision: str
    optimizer: OptimizerConfig
    seed: int
    measure: MeasureConfig

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


def _require_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(name, value, "a positive integer")


def _require_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, value, "one of " + ", ".join(allowed))


def resolve_device(requested: str, cuda_available: bool) -> str:
    """`auto` means the GPU when there is one; asking for `cuda` without one is an error, not a fallback."""
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise ConfigError("device.type", requested, "cpu or auto (no CUDA device is visible here)")
    return requested


def validate(cfg: DictConfig, cuda_available: bool | None = None) -> ExperimentSpec:
    """Turn a composed config into an ExperimentSpec, or raise ConfigError naming the bad field."""
    import torch

    from memexp.strategies import STRATEGIES

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    model: ModelConfig = OmegaConf.to_object(cfg.model)  # type: ignore[assignment]
    for name in ("vocab_size", "hidden", "layers", "heads", "ffn_hidden", "max_seq_len"):
        _require_positive(f"model.{name}", getattr(model, name))
    if model.hidden % model.heads:
        divisors = [d for d in range(1, model.hidden + 1) if model.hidden % d == 0]
        shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
        raise ConfigError(
            "model.heads", model.heads, f"a divisor of model.hidden={model.hidden} ({shown})"
        )
    _require_choice("model.attention", model.attention, ATTENTION_KINDS)

    seq_len = int(cfg.seq.len)
    batch_size = int(cfg.batch.size)
    _require_positive("seq.len", seq_len)
    if seq_len > model.max_seq_len:
        raise ConfigError(
            "seq.len", seq_len, f"at most model.max_seq_len={model.max_seq_len} for {model.name}"
        )
    _require_positive("batch.size", batch_size)

    _require_choice("device.type", cfg.device.type, DEVICE_TYPES)
    device = resolve_device(cfg.device.type, cuda_available)
    _require_choice("precision", cfg.precision, PRECISIONS)

    optimizer: OptimizerConfig = OmegaConf.to_object(cfg.optimizer)  # type: ignore[assignment]
    _require_choice("optimizer.name", optimizer.name, OPTIMIZERS)
    if optimizer.lr <= 0:
        raise ConfigError("optimizer.lr", optimizer.lr, "a positive number")

    measure: MeasureConfig = OmegaConf.to_object(cfg.measure)  # type: ignore[assignment]
    if measure.warmup < 1:
        raise ConfigError(
            "measure.warmup", measure.warmup, "at least 1 (optimizer state must exist first)"
        )
    _require_positive("measure.repeat", measure.repeat)

    strategy_name = cfg.strategy.get("name")
    _require_choice("strategy.name", strategy_name, tuple(STRATEGIES))
    strategy = OmegaConf.to_object(cfg.strategy)
    STRATEGIES[strategy_name].validate(strategy, model)

    return ExperimentSpec(
        model=model,
        strategy=strategy,
        seq_len=seq_len,
        batch_size=batch_size,
        device=device,
        precision=cfg.precision,
        optimizer=optimizer,
        seed=int(cfg.seed),
        measure=measure,
    )
