"""`offload`: keep every saved activation off the accelerator, in host memory or on disk.

Nothing is recomputed. `to: host` moves each tensor autograd saves to host memory during the
forward (`save_on_cpu`'s semantics, pinned memory on CUDA) and back for the backward, trading
device memory for transfers. On a CPU job the tensors are in host memory already, so `host`
moves nothing: such a job is recorded as `not_applicable`, with the reason. `to: disk` writes
each to a file and maps it back for the backward (memexp.storage), on any device: it is how a
CPU job offloads, and its record says the bytes written and read and the time they took.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from memexp.config import ConfigError
from memexp.plan import CheckpointPlan
from memexp.results import NotApplicableError
from memexp.storage import OFFLOAD_KINDS
from memexp.strategies.base import Strategy

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig


@dataclass
class OffloadConfig:
    name: str = "offload"
    to: str = "host"


def validate(cfg: OffloadConfig, model: ModelConfig) -> None:
    if cfg.to not in OFFLOAD_KINDS:
        raise ConfigError("strategy.to", cfg.to, "one of " + ", ".join(OFFLOAD_KINDS))


def make_plan(cfg: OffloadConfig, spec: ExperimentSpec) -> CheckpointPlan:
    device = spec.imagined_device
    if cfg.to == "host" and device != "cuda":
        raise NotApplicableError(
            f"offload moves saved activations from an accelerator to host memory; on {device} "
            "they are in host memory already, so there is nothing to offload and nothing to "
            "measure (strategy.to=disk offloads from any device)"
        )
    return CheckpointPlan(spec.model.layers, storage=cfg.to)


STRATEGY = Strategy("offload", OffloadConfig, make_plan, validate)
