"""The transformer is the seed's, and every checkpoint plan computes exactly what no plan computes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig

from memexp.config import ExperimentSpec
from memexp.configure import validate
from memexp.model import Transformer, parameter_count
from memexp.plan import CheckpointPlan, Part
from memexp.strategies import make_plan
from memexp.training import backward, build_workload, forward_loss

SpecFn = Callable[..., ExperimentSpec]

# The seed's reference workloads (DESIGN.md): vocabulary, hidden, layers, heads; FFN = 4×hidden;
# position embeddings for max_seq_len positions.
SEED_SHAPES = {
    "small": {"vocab": 10000, "hidden": 512, "layers": 6, "heads": 8, "max_seq_len": 2048},
    "medium": {"vocab": 20000, "hidden": 1024, "layers": 12, "heads": 16, "max_seq_len": 2048},
}


def seed_parameter_count(vocab: int, hidden: int, layers: int, heads: int, max_seq_len: int) -> int:
    """Parameters of the seed's transformer, tensor by tensor (heads split, not add, weights)."""
    ffn = 4 * hidden
    layer_norm = 2 * hidden  # weight and bias
    attention = layer_norm + 3 * hidden * hidden + (hidden * hidden + hidden)  # qkv has no bias
    feed_forward = layer_norm + (hidden * ffn + ffn) + (ffn * hidden + hidden)
    embeddings = vocab * hidden + max_seq_len * hidden  # token + learned positions
    head = hidden * vocab + vocab  # untied, with bias
    return embeddings + layers * (attention + feed_forward) + layer_norm + head


@pytest.mark.parametrize("preset", sorted(SEED_SHAPES))
def test_parameter_count_equals_the_seed(
    preset: str, compose_cfg: Callable[..., DictConfig]
) -> None:
    spec = validate(compose_cfg(f"model={preset}", "logger=none"), cuda_available=False)
    shapes = SEED_SHAPES[preset]
    assert (spec.model.vocab_size, spec.model.hidden, spec.model.layers, spec.model.heads) == (
        shapes["vocab"],
        shapes["hidden"],
        shapes["layers"],
        shapes["heads"],
    )
    assert spec.model.ffn_hidden == 4 * spec.model.hidden
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = Transformer(spec.model)
    assert parameter_count(model) == seed_parameter_count(**shapes)


def loss_and_grads(
    spec: ExperimentSpec, plan: CheckpointPlan
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    work = build_workload(spec, plan, "cpu")
    loss = forward_loss(work)
    backward(loss)
    return loss.detach(), {name: p.grad for name, p in work.model.named_parameters()}


MIXED_PLAN_PARTS = ((0, Part.ATTENTION_CORE), (1, Part.ATTENTION), (2, Part.FFN))


@pytest.mark.parametrize(
    "plan_source",
    [
        "strategy=full",
        "strategy=full strategy.granularity=sublayer",
        "strategy=sqrt",
        "strategy=sqrt strategy.segments=3",
        "mixed parts and a segment",
    ],
)
def test_checkpointing_changes_neither_loss_nor_gradients(
    plan_source: str, tiny_spec: SpecFn
) -> None:
    if plan_source.startswith("strategy="):
        spec = tiny_spec(*plan_source.split())
        plan = make_plan(spec)
    else:  # every Part, as later strategies will combine them
        spec = tiny_spec()
        plan = CheckpointPlan(4, segments=((3, 4),), parts=MIXED_PLAN_PARTS)
    assert plan.recomputes_anything
    expected_loss, expected_grads = loss_and_grads(spec, CheckpointPlan.nothing(4))
    loss, grads = loss_and_grads(spec, plan)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert grads.keys() == expected_grads.keys()
    assert all(grad is not None for grad in grads.values())
    differing = [
        name for name, grad in grads.items() if not torch.equal(grad, expected_grads[name])
    ]
    assert differing == []


def test_a_plan_for_another_depth_is_refused(tiny_spec: SpecFn) -> None:
    spec = tiny_spec()
    model = Transformer(spec.model)
    with pytest.raises(ValueError, match="plan is for 3 layers, model has 4"):
        model.apply_plan(CheckpointPlan.nothing(3))
