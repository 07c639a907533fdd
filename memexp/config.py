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
DEVICE_TYPES = ("auto", "cpu", "cuda", "fake")
IMAGINED_DEVICES = ("cuda", "cpu")
GIB = 2**30
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
    # auto: the largest batch whose predicted peak fits the budget (searched from `size` up).
    auto: bool = False
    budget_gb: float | None = None  # GiB; None: the device's memory


@dataclass
class DeviceConfig:
    type: str = "auto"
    # The device a step must fit on, in GiB (2**30 bytes); None: the GPU's own, unknown on a CPU.
    memory_gb: float | None = None
    # For step-time estimates from FLOPs (fake device): peak TFLOP/s and the fraction reached.
    peak_tflops: float | None = None
    utilization: float = 0.4
    # Fake device: whose default code paths the step follows where PyTorch lets us choose.
    imagine: str = "cuda"


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
    # A sweep (or run) folder to finish in place; see memexp.resume.
    resume: str | None = None


def _unique_suffix() -> str:
    """A short random tag: two sweeps started in the same second never share a folder."""
    return secrets.token_hex(3)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore so YAML files extend them and get type checks.

    Also registers the resolvers the configs use: `${memexp_unique:}` (cached, so every job of
    one sweep sees the same value: Hydra copies the resolver cache to each job's config), and
    those of memexp.launchers and memexp.resume.
    """
    from memexp import launchers, resume
    from memexp.strategies import STRATEGIES

    OmegaConf.register_new_resolver("memexp_unique", _unique_suffix, use_cache=True, replace=True)
    launchers.register_resolvers()
    resume.register_resolvers()
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
    device_settings: DeviceConfig = field(default_factory=DeviceConfig)
    auto_batch: bool = False
    # The memory of the device the job runs on or imagines (device.memory_gb, else the GPU's),
    # and what one step may use of it (batch.budget_gb, else all of it); None when unknown.
    # Planners that fit a budget and the batch search read `memory_budget_bytes`.
    device_memory_bytes: int | None = None
    memory_budget_bytes: int | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


def _require_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(name, value, "a positive integer")


def _require_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, value, "one of " + ", ".join(allowed))


def _require_positive_number(name: str, value: float | None, unit: str) -> None:
    if value is not None and value <= 0:
        raise ConfigError(name, value, f"a positive number of {unit}, or null")


def _validate_device(settings: DeviceConfig) -> None:
    _require_positive_number("device.memory_gb", settings.memory_gb, "GiB")
    _require_positive_number("device.peak_tflops", settings.peak_tflops, "TFLOP/s")
    if not 0 < settings.utilization <= 1:
        raise ConfigError(
            "device.utilization", settings.utilization, "a fraction of peak in (0, 1]"
        )
    _require_choice("device.imagine", settings.imagine, IMAGINED_DEVICES)


def device_memory_bytes(device: str, settings: DeviceConfig) -> int | None:
    """`device.memory_gb` when given, else the GPU's own memory; a CPU or fake device has none."""
    if settings.memory_gb is not None:
        return int(settings.memory_gb * GIB)
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return None


def _memory_budget_bytes(batch: BatchConfig, device_memory: int | None) -> int | None:
    _require_positive_number("batch.budget_gb", batch.budget_gb, "GiB")
    budget = int(batch.budget_gb * GIB) if batch.budget_gb is not None else device_memory
    if batch.auto and budget is None:
        raise ConfigError(
            "batch.budget_gb",
            None,
            "a positive number of GiB (or set device.memory_gb): batch=auto needs a memory to fit",
        )
    return budget


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
    device_settings: DeviceConfig = OmegaConf.to_object(cfg.device)  # type: ignore[assignment]
    _validate_device(device_settings)
    device_memory = device_memory_bytes(device, device_settings)
    batch: BatchConfig = OmegaConf.to_object(cfg.batch)  # type: ignore[assignment]
    memory_budget = _memory_budget_bytes(batch, device_memory)
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
        device_settings=device_settings,
        auto_batch=batch.auto,
        device_memory_bytes=device_memory,
        memory_budget_bytes=memory_budget,
    )
