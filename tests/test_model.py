"""Every checkpoint plan computes exactly what no plan computes.

(That the model is the seed's is checked against a reference written from the seed's
description: tests/test_seed_reference.py.)
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from memexp.config import ExperimentSpec
from memexp.model import OP_POLICIES, Transformer
from memexp.plan import OP_POLICY_NAMES, CheckpointPlan, Part
from memexp.strategies import make_plan
from memexp.training import backward, build_workload, forward_loss

SpecFn = Callable[..., ExperimentSpec]


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


def test_every_op_policy_name_has_its_operators() -> None:
    """Configs are checked against the names (no torch); the model runs the operator lists."""
    assert tuple(OP_POLICIES) == OP_POLICY_NAMES
