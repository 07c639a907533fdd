"""Composition of memexp/conf/ and every validation error: a bad value fails early, naming itself."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from conftest import CONFIG_GROUPS
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import ValidationError

from memexp import CONF_DIR
from memexp.config import (
    PARALLEL_MODES,
    ConfigError,
    ExperimentSpec,
    ParallelConfig,
    resolve_device,
)
from memexp.configure import require_values, validate
from memexp.strategies import STRATEGIES

ComposeFn = Callable[..., DictConfig]
SpecFn = Callable[..., ExperimentSpec]

STRATEGY_OPTIONS = sorted(path.stem for path in (CONF_DIR / "strategy").glob("*.yaml"))
PARALLEL_OPTIONS = sorted(path.stem for path in (CONF_DIR / "parallel").glob("*.yaml"))
# Each option composes a group of its own (half a second): the quick loop composes those the
# other tests compose too, the slow set every one.
QUICK_OPTIONS = {"none", "full", "sqrt", "adaptive", "fsdp"}


def quick_or_slow(options: list[str]) -> list[object]:
    return [o if o in QUICK_OPTIONS else pytest.param(o, marks=pytest.mark.slow) for o in options]


def quick_or_slow_marks(overrides: list[str]) -> tuple[pytest.MarkDecorator, ...]:
    """Slow where the overrides choose an option of a group outside QUICK_OPTIONS."""
    chosen = [o.split("=", 1) for o in overrides if o.split("=", 1)[0] in CONFIG_GROUPS]
    return () if all(option in QUICK_OPTIONS for _, option in chosen) else (pytest.mark.slow,)


def test_default_composes_to_the_seed_small_workload(compose_cfg: ComposeFn) -> None:
    cfg = compose_cfg("logger=none")
    assert (cfg.model.name, cfg.model.hidden, cfg.model.layers) == ("small", 512, 6)
    assert (cfg.seq.len, cfg.batch.size) == (256, 4)
    assert cfg.strategy.name == "none"


@pytest.mark.slow
def test_medium_brings_its_own_workload(compose_cfg: ComposeFn) -> None:
    cfg = compose_cfg("model=medium", "logger=none")
    assert (cfg.model.name, cfg.model.hidden, cfg.model.layers) == ("medium", 1024, 12)
    assert (cfg.seq.len, cfg.batch.size) == (512, 2)


def test_seq_and_batch_overrides_win_over_the_preset(compose_cfg: ComposeFn) -> None:
    cfg = compose_cfg("logger=none", "seq.len=1024", "batch.size=8")
    assert (cfg.seq.len, cfg.batch.size) == (1024, 8)
    spec = validate(cfg, cuda_available=False)
    assert (spec.seq_len, spec.batch_size, spec.tokens_per_step) == (1024, 8, 8192)


@pytest.mark.parametrize(
    ("overrides", "positions"),
    [
        (("model=small",), 256),
        (("model=small", "seq.len=1024"), 1024),  # a seq.len sweep needs no max_seq_len
        pytest.param(("model=medium", "seq.len=4096"), 4096, marks=pytest.mark.slow),
        pytest.param(("model=seed_llama7b",), 4096, marks=pytest.mark.slow),
        (("model=gpt2_medium", "seq.len=256"), 1024),  # GPT-2's table is fixed
        (("model=small", "model.max_seq_len=2048"), 2048),
    ],
)
def test_the_position_table_follows_the_workload_unless_the_preset_fixes_it(
    overrides: tuple[str, ...], positions: int, tiny_spec: SpecFn
) -> None:
    """The spec's model holds the resolved rows: the model, the closed form, the planner and
    the fake device all read this one number."""
    assert tiny_spec(*overrides).model.max_seq_len == positions


@pytest.mark.parametrize(
    ("preset", "bias"),
    [
        ("tiny", False),
        ("small", False),
        pytest.param("medium", False, marks=pytest.mark.slow),
        pytest.param("seed_llama7b", False, marks=pytest.mark.slow),
        ("gpt2_medium", True),
    ],
)
def test_only_gpt2_has_biases(preset: str, bias: bool, tiny_spec: SpecFn) -> None:
    assert tiny_spec(f"model={preset}").model.bias is bias


def test_every_strategy_option_is_a_registered_strategy() -> None:
    assert set(STRATEGY_OPTIONS) == set(STRATEGIES)


@pytest.mark.parametrize("option", quick_or_slow(STRATEGY_OPTIONS))
def test_every_strategy_option_composes_and_validates(option: str, tiny_spec: SpecFn) -> None:
    spec = tiny_spec(f"strategy={option}")
    assert spec.strategy.name == option
    assert isinstance(spec.strategy, STRATEGIES[option].config_class)


def test_every_parallel_option_is_a_mode() -> None:
    assert set(PARALLEL_OPTIONS) == set(PARALLEL_MODES)


@pytest.mark.parametrize("option", quick_or_slow(PARALLEL_OPTIONS))
def test_every_parallel_option_composes_and_validates(option: str, tiny_spec: SpecFn) -> None:
    parallel = tiny_spec(f"parallel={option}").parallel
    assert parallel.name == option
    assert parallel.world_size == (1 if option == "none" else 8)


def test_one_device_is_the_default(tiny_spec: SpecFn) -> None:
    assert tiny_spec().parallel == ParallelConfig()
    assert (ParallelConfig().name, ParallelConfig().world_size) == ("none", 1)


@pytest.mark.parametrize(
    "overrides",
    [
        ("parallel=fsdp", "parallel.world_size=1"),  # the mode's machinery, nothing divided
        ("parallel=fsdp", "parallel.world_size=512", "parallel.reshard_after_forward=false"),
        pytest.param(
            ("parallel=zero2", "parallel.param_dtype=bf16", "parallel.reduce_dtype=fp32"),
            marks=pytest.mark.slow,
        ),
        pytest.param(("parallel=zero2", "parallel.cpu_offload=true"), marks=pytest.mark.slow),
    ],
)
def test_parallel_knobs_are_accepted_where_they_act(
    overrides: tuple[str, ...], tiny_spec: SpecFn
) -> None:
    parallel = tiny_spec(*overrides).parallel
    assert f"parallel={parallel.name}" == overrides[0]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["model.hidden=abc"], "model.hidden"),
        # Each composes afresh (half a second): the slow set tries every type.
        pytest.param(["seq.len=long"], "seq.len", marks=pytest.mark.slow),
        pytest.param(["batch.size=1.5"], "batch.size", marks=pytest.mark.slow),
        pytest.param(["measure.repeat=many"], "measure.repeat", marks=pytest.mark.slow),
        pytest.param(
            ["strategy=sqrt", "strategy.segments=two"], "strategy.segments", marks=pytest.mark.slow
        ),
    ],
)
def test_type_errors_fail_at_composition_naming_the_key(
    compose_cfg: ComposeFn, overrides: list[str], key: str
) -> None:
    with pytest.raises(ConfigCompositionException, match=f"override {overrides[-1]}") as error:
        compose_cfg("model=tiny", "logger=none", *overrides)
    cause = error.value.__cause__
    assert isinstance(cause, ValidationError)
    assert cause.full_key == key


POSITIVE = ["a positive integer"]
CHOICE_ERRORS = [
    # (overrides, field, value, fragments of the allowed text)
    (["model.heads=5"], "model.heads", 5, ["a divisor of model.hidden=32", "1, 2, 4, 8, 16, 32"]),
    (
        ["model.max_seq_len=128", "seq.len=129"],
        "seq.len",
        129,
        ["at most model.max_seq_len=128", "tiny"],
    ),
    (["model=gpt2_medium", "seq.len=1025"], "seq.len", 1025, ["at most model.max_seq_len=1024"]),
    (["model.vocab_size=0"], "model.vocab_size", 0, POSITIVE),
    (["model.hidden=-32"], "model.hidden", -32, POSITIVE),
    (["model.layers=0"], "model.layers", 0, POSITIVE),
    (["model.heads=0"], "model.heads", 0, POSITIVE),
    (["model.ffn_hidden=0"], "model.ffn_hidden", 0, POSITIVE),
    (["model.max_seq_len=0"], "model.max_seq_len", 0, POSITIVE),
    (["seq.len=0"], "seq.len", 0, POSITIVE),
    (["batch.size=-1"], "batch.size", -1, POSITIVE),
    (["device.type=tpu"], "device.type", "tpu", ["auto", "cpu", "cuda"]),
    (["device=cuda"], "device.type", "cuda", ["cpu or auto", "no CUDA device"]),
    (["precision=fp16"], "precision", "fp16", ["fp32", "bf16"]),
    (["optimizer.name=lamb"], "optimizer.name", "lamb", ["adam", "adamw", "sgd"]),
    (["optimizer.lr=0"], "optimizer.lr", 0.0, ["a positive number"]),
    (["optimizer.lr=-0.1"], "optimizer.lr", -0.1, ["a positive number"]),
    (["measure.warmup=0"], "measure.warmup", 0, ["at least 1"]),
    (["measure.repeat=0"], "measure.repeat", 0, POSITIVE),
    (["measure.max_time_s=0"], "measure.max_time_s", 0.0, ["a positive number of seconds"]),
    (["measure.stable_iqr=-0.1"], "measure.stable_iqr", -0.1, ["a positive fraction"]),
    (["measure.threads=0"], "measure.threads", 0, POSITIVE),
    (["model.attention=flash"], "model.attention", "flash", ["naive", "sdpa"]),
    (["strategy.name=magic"], "strategy.name", "magic", sorted(STRATEGIES)),
    (
        ["strategy=full", "strategy.granularity=block"],
        "strategy.granularity",
        "block",
        ["layer", "sublayer"],
    ),
    (["strategy=sqrt", "strategy.segments=0"], "strategy.segments", 0, ["between 1 and", "=4"]),
    (["strategy=sqrt", "strategy.segments=5"], "strategy.segments", 5, ["between 1 and", "=4"]),
    (["parallel.name=zero3"], "parallel.name", "zero3", ["none", "ddp", "zero1", "fsdp"]),
    (["parallel=fsdp", "parallel.world_size=0"], "parallel.world_size", 0, POSITIVE),
    (["parallel.world_size=8"], "parallel.world_size", 8, ["1 under parallel=none", "ddp|"]),
    (
        ["parallel=zero2", "parallel.reshard_after_forward=false"],
        "parallel.reshard_after_forward",
        False,
        ["unless parallel=fsdp", "zero2 never reshards"],
    ),
    (
        ["parallel=fsdp", "parallel.param_dtype=fp16"],
        "parallel.param_dtype",
        "fp16",
        ["fp32", "bf16"],
    ),
    (
        ["parallel=ddp", "parallel.reduce_dtype=bf16"],
        "parallel.reduce_dtype",
        "bf16",
        ["null unless parallel=zero2 or fsdp"],
    ),
    (
        ["parallel=zero1", "parallel.cpu_offload=true"],
        "parallel.cpu_offload",
        True,
        ["false unless parallel=zero2 or fsdp"],
    ),
]


@pytest.mark.parametrize(
    ("overrides", "field", "value", "allowed"),
    [
        pytest.param(*case, id=" ".join(case[0]), marks=quick_or_slow_marks(case[0]))
        for case in CHOICE_ERRORS
    ],
)
def test_validation_error_names_field_value_and_allowed(
    tiny_cfg: ComposeFn, overrides: list[str], field: str, value: object, allowed: list[str]
) -> None:
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError) as error:
        validate(cfg, cuda_available=False)
    assert error.value.field_name == field
    assert error.value.value == value
    message = str(error.value)
    assert message.startswith(f"{field}={value!r} ")
    for fragment in allowed:
        assert fragment in message


@pytest.mark.parametrize(
    ("requested", "cuda_available", "device"),
    [("auto", True, "cuda"), ("auto", False, "cpu"), ("cuda", True, "cuda"), ("cpu", True, "cpu")],
)
def test_device_follows_the_request_and_the_machine(
    requested: str, cuda_available: bool, device: str
) -> None:
    assert resolve_device(requested, cuda_available) == device


@pytest.mark.parametrize(
    ("overrides", "field", "value", "known"),
    [
        (["+model.hiden=64"], "model.hiden", 64, "name, vocab_size, hidden, layers"),
        # Each composes afresh (half a second): the slow set tries every group.
        pytest.param(
            ["strategy=sqrt", "+strategy.segmnts=2"],
            "strategy.segmnts",
            2,
            "name, segments",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["+logger.modee=online"],
            "logger.modee",
            "online",
            "name, project, entity, mode",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["+parallel.ranks=8"],
            "parallel.ranks",
            8,
            "name, world_size, reshard_after_forward",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_key_the_schema_lacks_is_refused_naming_the_known_keys(
    compose_cfg: ComposeFn, overrides: list[str], field: str, value: object, known: str
) -> None:
    """`+group.key=...` adds a key nothing reads: a typo would otherwise be silently ignored."""
    with pytest.raises(ConfigError) as error:
        validate(compose_cfg("model=tiny", "logger=none", *overrides), cuda_available=False)
    assert (error.value.field_name, error.value.value) == (field, value)
    assert known in str(error.value)


def test_a_value_left_missing_is_named(compose_cfg: ComposeFn) -> None:
    """A user's preset that leaves a schema field `???` fails naming it, before anything runs."""
    with pytest.raises(ConfigError) as error:
        require_values(compose_cfg("model.vocab_size=???", "logger=none"))
    assert (error.value.field_name, error.value.value) == ("model.vocab_size", "???")
