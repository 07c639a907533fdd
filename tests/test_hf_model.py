"""Real architectures (memexp.hf_model): the published sizes, the library's own forward, and
every checkpoint plan computing exactly what no plan computes.

The published parameter counts are the models' own (their model cards and `num_parameters()`
of the published checkpoints), written here as figures, never derived from memexp's code.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memexp import analytic, sharded_states
from memexp.config import ARCHITECTURES, ConfigError, ExperimentSpec
from memexp.estimate import predict
from memexp.model import parameter_count
from memexp.plan import LAYER, CheckpointPlan, Part
from memexp.runner import run_job
from memexp.training import MODEL_BUILDERS, backward, build_model, build_workload, forward_loss

SpecFn = Callable[..., ExperimentSpec]

PUBLISHED_PARAMETERS = {
    "llama3_8b": 8_030_261_248,  # Meta-Llama-3-8B
    "mistral_7b": 7_241_732_096,  # Mistral-7B-v0.1
    "gpt2": 124_439_808,  # GPT-2 (small), head tied to the token embedding
}
SMALL_MEMBERS = ("llama_tiny", "mistral_tiny", "gpt2_tiny")
STRATEGIES = (
    "none",
    "full",
    "sqrt",
    "selective",
    "every_n",
    "op",
    "offload",
    "compress",
    "adaptive",
)


@pytest.mark.parametrize(
    ("preset", "published"),
    [
        pytest.param(preset, published, marks=pytest.mark.slow)
        if preset != "gpt2"
        else (preset, published)
        for preset, published in PUBLISHED_PARAMETERS.items()
    ],
)
def test_the_closed_form_counts_the_published_parameters(
    preset: str, published: int, tiny_spec: SpecFn
) -> None:
    assert analytic.parameter_count(tiny_spec(f"model={preset}").model) == published


@pytest.mark.slow
@pytest.mark.parametrize(("preset", "published"), PUBLISHED_PARAMETERS.items())
def test_the_built_model_has_the_published_parameters(
    preset: str, published: int, tiny_spec: SpecFn
) -> None:
    """Built by transformers on fake tensors (nothing allocated), in the order the closed form
    lists them, tensor by tensor and shape by shape (the shapes sharding splits)."""
    spec = tiny_spec(f"model={preset}", "device=fake")
    with FakeTensorMode():
        model = build_model(spec.model, initialise=False)
    assert parameter_count(model) == published
    shapes = [tuple(parameter.shape) for parameter in model.parameters()]
    assert shapes == analytic.parameter_shapes(spec.model)


def test_every_architecture_has_a_builder() -> None:
    assert tuple(MODEL_BUILDERS) == ARCHITECTURES


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (("model=llama_tiny", "model.kv_heads=3"), "model.kv_heads"),
        (("model=llama_tiny", "model.kv_heads=0"), "model.kv_heads"),
        (("model=llama_tiny", "model.architecture=falcon"), "model.architecture"),
        (("model=llama_tiny", "model.sliding_window=8"), "model.sliding_window"),
        (("model=mistral_tiny", "model.bias=true"), "model.bias"),
        (("model=gpt2_tiny", "model.bias=false"), "model.bias"),
        (("model=gpt2_tiny", "model.kv_heads=2"), "model.kv_heads"),
        (("model=tiny", "model.act=silu"), "model.act"),
        (("model=tiny", "model.tie_embeddings=true"), "model.tie_embeddings"),
        (("model=llama_tiny", "model.norm_eps=0"), "model.norm_eps"),
        (("model=mistral_tiny", "model.sliding_window=0"), "model.sliding_window"),
        (("model=llama_tiny", "seq.len=65"), "seq.len"),
    ],
)
def test_bad_architecture_values_name_their_field(
    overrides: tuple[str, ...], field: str, tiny_spec: SpecFn
) -> None:
    with pytest.raises(ConfigError) as caught:
        tiny_spec(*overrides)
    assert caught.value.field_name == field


def test_a_real_architecture_without_transformers_is_one_line(
    tiny_spec: SpecFn, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "transformers" else find_spec(name, *args),
    )
    with pytest.raises(ConfigError) as caught:
        tiny_spec("model=llama_tiny")
    assert str(caught.value) == (
        "model.architecture='llama' is not allowed: seed (the others need transformers: "
        "pip install 'memexp[hf]')"
    )
    assert tiny_spec("model=tiny").model.architecture == "seed"


def library_model(spec: ExperimentSpec) -> torch.nn.Module:
    """The library's own model for `spec`, with the library's own attention implementation."""
    import importlib

    from memexp.hf_model import ARCHITECTURES as BUILT
    from memexp.hf_model import IMPLEMENTATIONS

    architecture = BUILT[spec.model.architecture]
    library = importlib.import_module(architecture.module)
    implementation = IMPLEMENTATIONS[spec.model.attention][1]
    config = getattr(library, architecture.config_class)(
        **architecture.config(spec.model, implementation)
    )
    return getattr(library, architecture.model_class)(config)


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["naive", "sdpa"])
@pytest.mark.parametrize("preset", SMALL_MEMBERS)
def test_the_model_computes_what_the_library_computes(
    preset: str, attention: str, tiny_spec: SpecFn
) -> None:
    """Same seed, same weights: memexp's forward (its own loop over the library's layers, its
    attention implementation) gives the library's logits exactly."""
    spec = tiny_spec(f"model={preset}", f"model.attention={attention}")
    torch.manual_seed(0)
    theirs = library_model(spec)
    torch.manual_seed(0)
    ours = build_model(spec.model)
    tokens = torch.randint(spec.model.vocab_size, (spec.batch_size, spec.seq_len))
    assert torch.equal(ours(tokens), theirs(tokens).logits)


def loss_and_grads(
    spec: ExperimentSpec, plan: CheckpointPlan
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    work = build_workload(spec, plan, "cpu")
    loss = forward_loss(work)
    backward(loss)
    return loss.detach(), {name: p.grad for name, p in work.model.named_parameters()}


# Every unit recomputed element-wise somewhere (the core under its own policy, beside a whole
# FFN), and layers stored their own way under a plan-wide storage: lossless kinds, so the
# step's figures stay exact.
SELECTIVE_AND_STORED = CheckpointPlan(
    4,
    parts=((0, Part.FFN),),
    selective=(
        (0, Part.ATTENTION_CORE.value, "save_matmuls"),
        (1, Part.ATTENTION.value, "save_matmuls"),
        (1, Part.FFN.value, "save_matmuls"),
        (2, LAYER, "save_matmuls"),
    ),
    storage="host",
    stored=((0, "disk"), (3, "keep")),
)

PLANS = {
    "full": CheckpointPlan(4, segments=tuple((i, i + 1) for i in range(4))),
    "sqrt": CheckpointPlan(4, segments=((0, 2), (2, 4))),
    "every part": CheckpointPlan(
        4,
        segments=((3, 4),),
        parts=((0, Part.ATTENTION_CORE), (0, Part.FFN), (1, Part.ATTENTION), (2, Part.FFN)),
    ),
    "op": CheckpointPlan(4, segments=tuple((i, i + 1) for i in range(4)), op_policy="save_matmuls"),
    "offload": CheckpointPlan(4, storage="host"),
    "selective units, stored layers": SELECTIVE_AND_STORED,
}


@pytest.mark.slow
def test_a_real_layer_executes_selective_units_and_stored_layers(tiny_spec: SpecFn) -> None:
    """A real layer runs main's per-unit plan features (the test below runs every plan on
    every member); slow: building a transformers layer takes seconds."""
    spec = tiny_spec("model=llama_tiny")
    expected_loss, expected_grads = loss_and_grads(spec, CheckpointPlan.nothing(4))
    loss, grads = loss_and_grads(spec, SELECTIVE_AND_STORED)
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(grad, expected_grads[key]) for key, grad in grads.items())


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["naive", "sdpa"])
@pytest.mark.parametrize("preset", SMALL_MEMBERS)
def test_checkpointing_changes_neither_loss_nor_gradients(
    preset: str, attention: str, tiny_spec: SpecFn
) -> None:
    spec = tiny_spec(f"model={preset}", f"model.attention={attention}")
    expected_loss, expected_grads = loss_and_grads(spec, CheckpointPlan.nothing(4))
    for name, plan in PLANS.items():
        loss, grads = loss_and_grads(spec, plan)
        assert torch.equal(loss, expected_loss), name
        assert grads.keys() == expected_grads.keys()
        differing = [
            key for key, grad in grads.items() if not torch.equal(grad, expected_grads[key])
        ]
        assert differing == [], name


@pytest.mark.slow
@pytest.mark.parametrize("preset", SMALL_MEMBERS)
def test_every_strategy_runs_on_the_small_members(
    preset: str, tiny_cfg: Callable, tmp_path: Path
) -> None:
    """Each strategy's job, measured on the CPU, ends ok (offload, which has nothing to move on
    a CPU, on the fake device imagining a GPU)."""
    for strategy in STRATEGIES:
        cfg = tiny_cfg(
            f"model={preset}",
            f"strategy={strategy}",
            f"device={'fake' if strategy == 'offload' else 'cpu'}",
            "measure.repeat=1",
            "measure.max_time_s=0.01",
        )
        result = run_job(cfg, tmp_path / strategy, {"overrides": [strategy]})
        assert result.status == "ok", (strategy, result.message)
        assert result.peak_bytes > 0


@pytest.mark.slow
@pytest.mark.parametrize("preset", SMALL_MEMBERS)
def test_each_unit_is_timed_on_the_real_layer(preset: str, tiny_spec: SpecFn) -> None:
    """The adaptive strategy's record times the layer's own sub-blocks and attention core."""
    from memexp.measure.timing import time_units

    spec = tiny_spec(f"model={preset}", "device=cpu")
    units = time_units(spec)
    assert set(units) == {"attention_core", "attention", "ffn", "layer"}
    assert all(ms >= 0 for ms in units.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ("model=llama_tiny",),
        ("model=mistral_tiny", "model.sliding_window=17"),  # a window the sequence fits in
    ],
)
def test_the_closed_form_counts_the_saved_bytes_under_every_plan(
    overrides: tuple[str, ...], tiny_spec: SpecFn
) -> None:
    """RMSNorm, rotary, grouped-query sdpa and SwiGLU, derived by hand (memexp.analytic), equal
    the bytes the forward saves, counted by saved-tensor hooks on the CPU."""
    from memexp.measure.timing import first_step

    spec = tiny_spec(*overrides, "device=cpu")
    for name, plan in {"none": CheckpointPlan.nothing(4), **PLANS}.items():
        if plan.uses_op_policy:
            continue  # no closed form per operator
        _, measured = first_step(build_workload(spec, plan, "cpu"))
        assert analytic.saved_activation_bytes(spec, plan) == measured, name


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (("model=gpt2_tiny",), "model.architecture"),
        (("model=mistral_tiny",), "model.attention"),  # its window (8) masks seq 16
        (("model=llama_tiny", "model.attention=naive"), "model.attention"),
    ],
)
def test_no_closed_form_is_given_where_the_saved_tensors_differ(
    overrides: tuple[str, ...], field: str, tiny_spec: SpecFn
) -> None:
    spec = tiny_spec(*overrides)
    with pytest.raises(ConfigError) as caught:
        analytic.saved_activation_bytes(spec, CheckpointPlan.nothing(4))
    assert caught.value.field_name == field


@pytest.mark.slow
@pytest.mark.parametrize("preset", SMALL_MEMBERS)
def test_the_fake_device_predicts_the_cpu_step_to_the_byte(preset: str, tiny_spec: SpecFn) -> None:
    """Fake tensors imagining the CPU give the CPU tracker's peak, breakdown and saved bytes: the
    library's masks come out the same on fake tensors as on real ones."""
    from memexp.estimate import predict
    from memexp.measure.memory import measure_memory
    from memexp.measure.timing import first_step

    spec = tiny_spec(f"model={preset}", "device=cpu")
    plan = CheckpointPlan.nothing(4)
    predicted = predict(spec, plan, "cpu")
    work = build_workload(spec, plan, "cpu")
    _, saved = first_step(work)
    measured = measure_memory(work)
    assert predicted.memory.peak_bytes == measured.peak_bytes
    assert predicted.memory.breakdown == measured.breakdown
    assert predicted.saved_activation_bytes == saved


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama_tiny", "gpt2_tiny"])
def test_a_fully_sharded_rank_holds_what_the_closed_form_says(
    preset: str, tiny_spec: SpecFn
) -> None:
    """The architecture's parameter shapes (GPT-2's Conv1D in × out among them) are the rows
    fully_shard splits: the fake rank's shards and gathered units equal the closed form's."""
    spec = tiny_spec(
        f"model={preset}",
        "device=fake",
        "device.imagine=cpu",
        "parallel=fsdp",
        "parallel.world_size=3",
    )
    memory = predict(spec, CheckpointPlan.nothing(4), imagine="cpu", counts=False).memory
    figures = sharded_states.figures(spec)
    assert memory.breakdown["params_bytes"] == figures["analytic_rank_params_bytes"]
    assert memory.breakdown["unsharded_params_bytes"] == (
        figures["analytic_unsharded_root_params_bytes"]
        + figures["analytic_unsharded_layer_params_bytes"]
    )
