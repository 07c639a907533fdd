"""`offload`: keep every saved activation in host memory instead of on the accelerator.

Nothing is recomputed: `torch.autograd.graph.save_on_cpu` (pinned memory on CUDA) moves each
tensor autograd saves to the host during the forward and back for the backward, trading
device memory for transfers. On a CPU job the tensors are already in host memory, so the
strategy moves nothing: such a job is recorded as `not_applicable`, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memexp.plan import CheckpointPlan
from memexp.results import NotApplicableError
from memexp.strategies.base import Strategy

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec


@dataclass
class OffloadConfig:
    name: str = "offload"


def make_plan(cfg: OffloadConfig, spec: ExperimentSpec) -> CheckpointPlan:
    device = spec.imagined_device
    if device != "cuda":
        raise NotApplicableError(
            f"offload moves saved activations from an accelerator to host memory; on {device} "
            "they are in host memory already, so there is nothing to offload and nothing to measure"
        )
    return CheckpointPlan(spec.model.layers, storage="host")


STRATEGY = Strategy("offload", OffloadConfig, make_plan)
