"""The closed form beyond saved activations: fused attention, parameters, optimizer state and the
optimizer step's peak, each against the model or a measured CPU step.

(Saved bytes of the naive core against measurement: tests/test_measure.py.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from memexp import analytic
from memexp.config import ExperimentSpec
from memexp.measure.memory import measure_memory
from memexp.measure.saved import counting_saved_bytes
from memexp.measure.timing import StoppingRule, time_steps
from memexp.model import Transformer, parameter_count
from memexp.plan import CheckpointPlan, Part
from memexp.strategies import make_plan
from memexp.training import build_workload, forward_loss, train_step

SpecFn = Callable[..., ExperimentSpec]

ODD_SHAPE = (
    "batch.size=3", "seq.len=5", "model.hidden=12", "model.heads=3",
    "model.ffn_hidden=20", "model.vocab_size=11", "model.layers=3",
)  # fmt: skip


def measured_saved_bytes(spec: ExperimentSpec, plan: CheckpointPlan) -> int:
    work = build_workload(spec, plan, "cpu")
    with counting_saved_bytes(work.model) as saved_so_far:
        forward_loss(work, in_place=True)
        return saved_so_far()


@pytest.mark.parametrize(
    "preset",
    [
        "tiny",
        *(
            pytest.param(p, marks=pytest.mark.slow)
            for p in ("small", "medium", "gpt2_medium", "seed_llama7b")
        ),
    ],
)
def test_parameters_in_model_order(preset: str, tiny_spec: SpecFn) -> None:
    """Built on the meta device: shapes only, so even the 7B model costs nothing."""
    spec = tiny_spec(f"model={preset}")
    with torch.device("meta"):
        model = Transformer(spec.model)
    assert analytic.parameter_sizes(spec.model) == [p.numel() for p in model.parameters()]
    assert analytic.parameter_count(spec.model) == parameter_count(model)


def test_llama7b_has_seven_billion_parameters(tiny_spec: SpecFn) -> None:
    spec = tiny_spec("model=seed_llama7b")
    assert 6.7e9 < analytic.parameter_count(spec.model) < 6.8e9


@pytest.mark.parametrize("shape", [(), ODD_SHAPE], ids=["tiny", "odd shape"])
@pytest.mark.parametrize("strategy", ["none", "full", "sqrt"])
def test_fused_attention_saved_bytes_equal_the_closed_form(
    shape: tuple[str, ...], strategy: str, tiny_spec: SpecFn
) -> None:
    spec = tiny_spec(*shape, "model.attention=sdpa", f"strategy={strategy}")
    plan = make_plan(spec)
    assert measured_saved_bytes(spec, plan) == analytic.saved_activation_bytes(spec, plan)


def test_fused_attention_with_parts_recomputed(tiny_spec: SpecFn) -> None:
    spec = tiny_spec(*ODD_SHAPE, "model.attention=sdpa")
    plan = CheckpointPlan(3, parts=((0, Part.ATTENTION_CORE), (1, Part.ATTENTION), (2, Part.FFN)))
    assert measured_saved_bytes(spec, plan) == analytic.saved_activation_bytes(spec, plan)


@pytest.mark.parametrize(("attention", "core"), [("naive", "s"), ("sdpa", "1")])
def test_a_layer_in_the_korthikanti_form(attention: str, core: str) -> None:
    """With f = 4h, one layer keeps 64·bsh + 16·bs + 4·abs·X bytes (fp32, no dropout), where X is
    s for the naive probabilities and 1 for the fused kernel's logsumexp (docs/memory_model.md)."""
    b, s, h, a = 3, 7, 20, 5
    layer = analytic.attention_block_bytes(b, s, h, a, False, attention)
    layer += analytic.ffn_block_bytes(b, s, h, 4 * h)
    x = s if core == "s" else 1
    assert layer == 64 * b * s * h + 16 * b * s + 4 * a * b * s * x


def test_core_recomputation_keeps_the_same_bytes_for_both_kernels() -> None:
    naive = analytic.attention_block_bytes(2, 9, 16, 4, core_recomputed=True, attention="naive")
    fused = analytic.attention_block_bytes(2, 9, 16, 4, core_recomputed=True, attention="sdpa")
    assert naive == fused


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize(
    "shape", [(), ODD_SHAPE, (*ODD_SHAPE, "model.bias=true")], ids=["tiny", "odd shape", "biases"]
)
def test_static_memory_and_optimizer_peak_equal_a_measured_cpu_step(
    optimizer: str, shape: tuple[str, ...], tiny_spec: SpecFn
) -> None:
    """A real CPU step after warm-up: weights, state and batch at the start; the optimizer step's
    peak adds the gradients and the per-tensor loop's scratch."""
    spec = tiny_spec(*shape, f"optimizer.name={optimizer}")
    work = build_workload(spec, make_plan(spec), "cpu")
    time_steps(work, warmup=1, rule=StoppingRule.fixed(1))
    phases = measure_memory(work).phase_bytes
    weights = 4 * analytic.parameter_count(spec.model)
    start = weights + analytic.optimizer_state_bytes(spec) + analytic.batch_bytes(spec)
    assert phases["after_setup"] == phases["after_step"] == start
    assert phases["optimizer_peak"] == analytic.optimizer_step_peak_bytes(spec, False)


@pytest.mark.parametrize(
    ("overrides", "tensors"),
    [((), 8 * 4 + 5), (("model.bias=true",), 12 * 4 + 5)],
    ids=["bias-free", "biases"],
)
def test_adam_state_is_two_moments_and_a_step_per_tensor(
    overrides: tuple[str, ...], tensors: int, tiny_spec: SpecFn
) -> None:
    """A layer has 8 parameter tensors (2 LayerNorms of 2, 4 projection weights), 12 with
    biases; outside the layers 5 (2 embeddings, the final LayerNorm's 2, the head's weight)."""
    spec = tiny_spec(*overrides)
    assert analytic.parameter_tensor_count(spec.model) == tensors
    expected = 2 * 4 * analytic.parameter_count(spec.model) + 4 * tensors
    assert analytic.optimizer_state_bytes(spec) == expected
    work = build_workload(spec, make_plan(spec), "cpu")
    train_step(work)
    state = [t for s in work.optimizer.state.values() for t in s.values()]
    assert sum(t.numel() * t.element_size() for t in state) == expected


def test_record_figures_name_their_units_and_say_when_there_is_no_closed_form(
    tiny_spec: SpecFn,
) -> None:
    spec = tiny_spec("precision=bf16")
    figures = analytic.figures(spec, make_plan(spec), multi_tensor=False)
    assert figures["analytic_source"] == "closed_form"
    assert figures["analytic_saved_activation_bytes"] is None
    assert "precision='bf16'" in figures["analytic_saved_activation_note"]
    numbers = [k for k, v in figures.items() if isinstance(v, int)]
    assert numbers and all(k.endswith("_bytes") for k in numbers)
    fp32 = tiny_spec()
    assert analytic.figures(fp32, make_plan(fp32), False)["analytic_saved_activation_bytes"] > 0
