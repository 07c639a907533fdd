"""What a lossy storage costs in accuracy: one step's gradients against the same step stored
as made.

Compressed saved tensors (memexp.storage) leave the forward, and so the loss, untouched; the
backward reads rounded activations. Both steps start from the same seed (weights) and batch,
on the job's own device, so the difference is the storage's alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from memexp.config import ExperimentSpec
from memexp.plan import CheckpointPlan
from memexp.training import backward, build_workload, forward_loss

GRADIENT_ERROR_SOURCE = "one step against the same step with storage=keep (same seed and batch)"


@dataclass(frozen=True)
class GradientError:
    """‖g − g_ref‖ / ‖g_ref‖ over all parameters and for the worst one, and both losses."""

    loss: float
    reference_loss: float
    relative_error: float
    worst_parameter: str
    worst_relative_error: float


def loss_and_gradients(
    spec: ExperimentSpec, plan: CheckpointPlan
) -> tuple[float, dict[str, torch.Tensor]]:
    """Forward, loss and backward of a freshly built workload; its gradients by parameter name."""
    work = build_workload(spec, plan, spec.device)
    loss = forward_loss(work)
    backward(loss)
    gradients = {
        name: parameter.grad.detach()
        for name, parameter in work.model.named_parameters()
        if parameter.grad is not None
    }
    return float(loss.detach()), gradients


def gradient_error(spec: ExperimentSpec, plan: CheckpointPlan) -> GradientError:
    """`plan`'s step against the same plan with its saved tensors kept as made."""
    reference = loss_and_gradients(spec, replace(plan, storage="keep", stored=()))
    return _against(reference, loss_and_gradients(spec, plan))


def errors_stored_everywhere(
    spec: ExperimentSpec, kinds: tuple[str, ...]
) -> dict[str, GradientError]:
    """Each storage kind's error with every layer's saved tensors stored that way, the most a
    plan can store in one kind: one reference step with nothing stored, then one per kind."""
    layers = spec.model.layers
    reference = loss_and_gradients(spec, CheckpointPlan.nothing(layers))
    return {
        kind: _against(
            reference,
            loss_and_gradients(
                spec, CheckpointPlan(layers, stored=tuple((i, kind) for i in range(layers)))
            ),
        )
        for kind in kinds
    }


def _against(
    reference: tuple[float, dict[str, torch.Tensor]], stored: tuple[float, dict[str, torch.Tensor]]
) -> GradientError:
    (reference_loss, expected_by_name), (loss, gradients) = reference, stored
    difference_sq = reference_sq = 0.0
    worst_name, worst = "", 0.0
    for name, expected in expected_by_name.items():
        expected64 = expected.double()
        diff_sq = float((gradients[name].double() - expected64).square().sum())
        ref_sq = float(expected64.square().sum())
        difference_sq += diff_sq
        reference_sq += ref_sq
        if ref_sq > 0 and math.sqrt(diff_sq / ref_sq) >= worst:
            worst_name, worst = name, math.sqrt(diff_sq / ref_sq)
    return GradientError(
        loss=loss,
        reference_loss=reference_loss,
        relative_error=math.sqrt(difference_sq / reference_sq) if reference_sq > 0 else 0.0,
        worst_parameter=worst_name,
        worst_relative_error=worst,
    )
