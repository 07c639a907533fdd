"""From Hydra's composed config to a validated ExperimentSpec, and the schemas Hydra composes with.

Hydra checks types when it composes; everything that depends on two fields at once (hidden
divisible by heads, the position table sized from the sequence) or on the machine (is there a
GPU?) is checked or resolved here, so a bad sweep value fails with one sentence instead of a
traceback. This room sits above the strategies because each strategy brings its own schema and
checks.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping
from dataclasses import replace

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from memexp import cli_help, launchers, resume
from memexp.buckets import (
    BUCKET_RULES,
    GIVEN,
    QUANTILE,
    Buckets,
    LengthsError,
    bucket_bounds,
    make_buckets,
    read_lengths,
)
from memexp.cli_help import SCHEMA_GROUP
from memexp.config import (
    ARCHITECTURES,
    ATTENTION_KINDS,
    DEVICE_TYPES,
    FIXED_MODEL_FIELDS,
    FULLY_SHARDED_MODES,
    IMAGINED_DEVICES,
    OBJECTIVES,
    OPTIMIZERS,
    PARALLEL_MODES,
    PARALLEL_NONE,
    PRECISIONS,
    RESHARDING_MODE,
    BatchConfig,
    Config,
    ConfigError,
    DeviceConfig,
    ExperimentSpec,
    LoggerConfig,
    MeasureConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    SeqConfig,
    require_transformers,
    resolve_device,
)
from memexp.strategies import STRATEGIES
from memexp.text import GIB


def _unique_suffix() -> str:
    """A short random tag: two sweeps started in the same second never share a folder."""
    return secrets.token_hex(3)


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore so YAML files extend them and get type checks.

    Also registers the resolvers the configs use: `${memexp_unique:}` (cached, so every job of
    one sweep sees the same value: Hydra copies the resolver cache to each job's config), and
    those of memexp.launchers, memexp.resume and memexp.cli_help.
    """
    OmegaConf.register_new_resolver("memexp_unique", _unique_suffix, use_cache=True, replace=True)
    launchers.register_resolvers()
    resume.register_resolvers()
    cli_help.register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="memexp_schema", node=Config)
    # In a group of their own, not beside the presets: `--help` does not list them, and
    # `model=schema` is Hydra's "could not find" error. A preset extends one with
    # `defaults: [/schema/model@_here_]`.
    cs.store(group=SCHEMA_GROUP, name="model", node=ModelConfig)
    cs.store(group=SCHEMA_GROUP, name="seq", node=SeqConfig)
    cs.store(group=SCHEMA_GROUP, name="batch", node=BatchConfig)
    cs.store(group=SCHEMA_GROUP, name="device", node=DeviceConfig)
    cs.store(group=SCHEMA_GROUP, name="logger", node=LoggerConfig)
    cs.store(group=SCHEMA_GROUP, name="parallel", node=ParallelConfig)
    for name, strategy in STRATEGIES.items():
        cs.store(group=f"{SCHEMA_GROUP}/strategy", name=name, node=strategy.config_class)


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
    _require_positive_number("device.memory_gbps", settings.memory_gbps, "GB/s")
    _require_positive_number("device.host_gbps", settings.host_gbps, "GB/s")
    _require_positive_number("device.disk_gbps", settings.disk_gbps, "GB/s")
    if not 0 < settings.utilization <= 1:
        raise ConfigError(
            "device.utilization", settings.utilization, "a fraction of peak in (0, 1]"
        )
    _require_choice("device.imagine", settings.imagine, IMAGINED_DEVICES)


def _validate_parallel(parallel: ParallelConfig) -> None:
    """One device, or `world_size` ranks under a sharding mode; each knob only where it acts.

    A sharding mode on one rank is allowed and means what PyTorch runs then: the mode's wrapper
    and buffers with nothing divided (every shard is the whole), the start of a world-size curve.
    """
    _require_choice("parallel.name", parallel.name, PARALLEL_MODES)
    _require_positive("parallel.world_size", parallel.world_size)
    if parallel.name == PARALLEL_NONE and parallel.world_size != 1:
        raise ConfigError(
            "parallel.world_size",
            parallel.world_size,
            "1 under parallel=none (one device); for more ranks choose parallel="
            + "|".join(mode for mode in PARALLEL_MODES if mode != PARALLEL_NONE),
        )
    if not parallel.reshard_after_forward and parallel.name != RESHARDING_MODE:
        raise ConfigError(
            "parallel.reshard_after_forward",
            parallel.reshard_after_forward,
            f"true (the default) unless parallel={RESHARDING_MODE}: zero2 never reshards "
            "between forward and backward, ddp and zero1 never shard parameters",
        )
    sharded = " or ".join(FULLY_SHARDED_MODES)
    for knob in ("param_dtype", "reduce_dtype"):
        value = getattr(parallel, knob)
        if value is None:
            continue
        _require_choice(f"parallel.{knob}", value, PRECISIONS)
        if parallel.name not in FULLY_SHARDED_MODES:
            raise ConfigError(f"parallel.{knob}", value, f"null unless parallel={sharded}")
    if parallel.cpu_offload and parallel.name not in FULLY_SHARDED_MODES:
        raise ConfigError("parallel.cpu_offload", True, f"false unless parallel={sharded}")


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
    if (batch.auto or batch.dynamic) and budget is None:
        raise ConfigError(
            "batch.budget_gb",
            None,
            "a positive number of GiB (or set device.memory_gb): batch=auto and batch=dynamic "
            "need a memory to fit",
        )
    return budget


def _bucket_bounds(batch: BatchConfig, counts: Mapping[int, int]) -> list[int]:
    """Given upper bounds (positive, increasing), else the rule's."""
    if batch.buckets:
        if any(b <= 0 for b in batch.buckets) or list(batch.buckets) != sorted(set(batch.buckets)):
            raise ConfigError(
                "batch.buckets", list(batch.buckets), "positive, strictly increasing lengths"
            )
    else:
        _require_choice("batch.bucket_rule", batch.bucket_rule, BUCKET_RULES)
        _require_positive("batch.bucket_count", batch.bucket_count)
    return bucket_bounds(counts, batch.buckets, batch.bucket_rule, batch.bucket_count)


def _buckets(batch: BatchConfig, model: ModelConfig) -> Buckets | None:
    """batch=dynamic's lengths in buckets, read now so a bad file fails before anything runs;
    None for other batch options, which must not name a lengths file they would ignore."""
    if not batch.dynamic:
        if batch.lengths is not None:
            raise ConfigError("batch.lengths", batch.lengths, "only read under batch=dynamic")
        return None
    if batch.auto:
        raise ConfigError("batch.auto", True, "false under batch=dynamic (it searches per bucket)")
    if batch.lengths is None:
        raise ConfigError(
            "batch.lengths", None, "a file of sequence lengths, one a line, or length:count lines"
        )
    try:
        counts = read_lengths(batch.lengths)
    except LengthsError as error:
        raise ConfigError("batch.lengths", batch.lengths, str(error)) from None
    positions = model.max_seq_len
    assert positions is not None, "validate() sizes the position table first"
    if max(counts) > positions:
        raise ConfigError(
            "batch.lengths",
            batch.lengths,
            f"lengths of at most {positions}, the rows of {model.name}'s position table "
            f"(model.max_seq_len, else seq.len); it holds {max(counts)}",
        )
    bounds = _bucket_bounds(batch, counts)
    rule = GIVEN if batch.buckets else batch.bucket_rule
    if rule == QUANTILE:
        rule = f"{QUANTILE} {batch.bucket_count}"
    return make_buckets(counts, bounds, rule, batch.lengths)


def _position_rows(model: ModelConfig, seq_len: int) -> int:
    """Rows of the position table: exactly `seq_len`, as the seed builds its model, unless the
    preset fixes a table (GPT-2's 1024 positions), which `seq_len` may not outgrow."""
    if model.max_seq_len is None:
        return seq_len
    if seq_len > model.max_seq_len:
        raise ConfigError(
            "seq.len", seq_len, f"at most model.max_seq_len={model.max_seq_len} for {model.name}"
        )
    return model.max_seq_len


def _validate_architecture(model: ModelConfig) -> None:
    """The architecture is known and installed; the fields its layer has no choice in keep their
    value; grouped-query heads divide the heads."""
    _require_choice("model.architecture", model.architecture, ARCHITECTURES)
    for name, value in FIXED_MODEL_FIELDS[model.architecture].items():
        if getattr(model, name) != value:
            raise ConfigError(
                f"model.{name}",
                getattr(model, name),
                f"{value!r}: the {model.architecture} architecture's layer has no such choice",
            )
    if model.kv_heads is not None:
        _require_positive("model.kv_heads", model.kv_heads)
        if model.heads % model.kv_heads:
            raise ConfigError(
                "model.kv_heads", model.kv_heads, f"a divisor of model.heads={model.heads}"
            )
    for name in ("norm_eps", "rope_theta"):
        if getattr(model, name) <= 0:
            raise ConfigError(f"model.{name}", getattr(model, name), "a positive number")
    if model.sliding_window is not None:
        _require_positive("model.sliding_window", model.sliding_window)
    require_transformers(model.architecture)


# The config groups and sections whose keys are closed: each node holds its schema's fields only.
SCHEMAS = {
    "model": ModelConfig,
    "seq": SeqConfig,
    "batch": BatchConfig,
    "device": DeviceConfig,
    "logger": LoggerConfig,
    "parallel": ParallelConfig,
    "optimizer": OptimizerConfig,
    "measure": MeasureConfig,
}


def _require_known_keys(section: str, node: DictConfig, schema: type) -> None:
    """`+model.hiden=64` adds a key that nothing reads: refuse it, naming the keys there are."""
    known = [f.name for f in dataclasses.fields(schema)]
    unknown = [key for key in node if key not in known]
    if unknown:
        raise ConfigError(
            f"{section}.{unknown[0]}",
            OmegaConf.to_container(node, resolve=False)[unknown[0]],  # type: ignore[index]
            f"a key {section} knows: {', '.join(known)}",
        )


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys still `???`, found without resolving anything (an interpolation may need them)."""
    found = []
    for key in node:
        child = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            found.append(f"{prefix}{key}")
        elif isinstance(child, DictConfig):
            found += _missing_keys(child, f"{prefix}{key}.")
    return found


def require_values(cfg: DictConfig) -> None:
    """A `???` left in the config (e.g. `model=schema`, the schema rather than a preset)."""
    missing = _missing_keys(cfg)
    if missing:
        raise ConfigError(
            missing[0],
            "???",
            "a value: choose a preset (e.g. model=tiny) or set it on the command line",
        )


def validate(cfg: DictConfig, cuda_available: bool | None = None) -> ExperimentSpec:
    """Turn a composed config into an ExperimentSpec, or raise ConfigError naming the bad field."""
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    require_values(cfg)
    for section, schema in SCHEMAS.items():
        _require_known_keys(section, cfg[section], schema)
    model: ModelConfig = OmegaConf.to_object(cfg.model)  # type: ignore[assignment]
    for name in ("vocab_size", "hidden", "layers", "heads", "ffn_hidden"):
        _require_positive(f"model.{name}", getattr(model, name))
    if model.max_seq_len is not None:
        _require_positive("model.max_seq_len", model.max_seq_len)
    if model.hidden % model.heads:
        divisors = [d for d in range(1, model.hidden + 1) if model.hidden % d == 0]
        shown = ", ".join(map(str, divisors[:12])) + (", ..." if len(divisors) > 12 else "")
        raise ConfigError(
            "model.heads", model.heads, f"a divisor of model.hidden={model.hidden} ({shown})"
        )
    _require_choice("model.attention", model.attention, ATTENTION_KINDS)
    _validate_architecture(model)

    seq_len = int(cfg.seq.len)
    batch_size = int(cfg.batch.size)
    _require_positive("seq.len", seq_len)
    model = replace(model, max_seq_len=_position_rows(model, seq_len))
    _require_positive("batch.size", batch_size)

    _require_choice("device.type", cfg.device.type, DEVICE_TYPES)
    device = resolve_device(cfg.device.type, cuda_available)
    device_settings: DeviceConfig = OmegaConf.to_object(cfg.device)  # type: ignore[assignment]
    _validate_device(device_settings)
    device_memory = device_memory_bytes(device, device_settings)
    batch: BatchConfig = OmegaConf.to_object(cfg.batch)  # type: ignore[assignment]
    memory_budget = _memory_budget_bytes(batch, device_memory)
    buckets = _buckets(batch, model)
    _require_choice("precision", cfg.precision, PRECISIONS)
    parallel: ParallelConfig = OmegaConf.to_object(cfg.parallel)  # type: ignore[assignment]
    _validate_parallel(parallel)
    _require_choice("objective", cfg.objective, OBJECTIVES)

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
    if measure.max_time_s <= 0:
        raise ConfigError("measure.max_time_s", measure.max_time_s, "a positive number of seconds")
    if measure.stable_iqr <= 0:
        raise ConfigError(
            "measure.stable_iqr", measure.stable_iqr, "a positive fraction of the median"
        )
    if measure.threads is not None:
        _require_positive("measure.threads", measure.threads)
    if measure.rank_timeout_s <= 0:
        raise ConfigError(
            "measure.rank_timeout_s", measure.rank_timeout_s, "a positive number of seconds"
        )

    strategy_name = cfg.strategy.get("name")
    _require_choice("strategy.name", strategy_name, tuple(STRATEGIES))
    _require_known_keys("strategy", cfg.strategy, STRATEGIES[strategy_name].config_class)
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
        buckets=buckets,
        parallel=parallel,
    )
