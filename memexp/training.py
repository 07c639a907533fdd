"""One training step, split into the phases every measurement talks about.

Timing, memory tracking, saved-tensor counting and FLOP counting all drive the model through
these functions, so they all measure the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from memexp import hf_model
from memexp.config import SEED_ARCHITECTURE, ExperimentSpec, ModelConfig
from memexp.model import PlannedLayers, Transformer
from memexp.plan import CheckpointPlan
from memexp.storage import FORMATS, Format, StorageLedger, saved_tensor_storage

if TYPE_CHECKING:
    from memexp.compile_partition import PartitionRecorder


@dataclass
class Workload:
    """Everything one step needs: the model under its plan, the optimizer and a fixed batch.

    The plan's `storage` is applied to every forward with `storage_formats` (the fake device
    substitutes imagined host memory and disk; `disk` writes to the system's temporary folder,
    $TMPDIR); `storage_ledger` adds up what every step packed.
    """

    spec: ExperimentSpec
    model: PlannedLayers
    optimizer: torch.optim.Optimizer
    tokens: torch.Tensor
    targets: torch.Tensor
    plan: CheckpointPlan
    storage_formats: Mapping[str, Format] = field(default_factory=lambda: dict(FORMATS))
    storage_ledger: StorageLedger = field(default_factory=StorageLedger)
    # A compiled forward's backend where it records the partition (the model's own: a
    # DistributedDataParallel wrapper around the model does not show it).
    partition: PartitionRecorder | None = None

    def layer_storage(self, kind: str) -> contextlib.AbstractContextManager:
        """One layer's own storage (`CheckpointPlan.stored`), in this workload's formats; the
        ledger counts the plan-wide storage only."""
        return saved_tensor_storage(kind, formats=self.storage_formats)


def _build_seed(cfg: ModelConfig, initialise: bool) -> PlannedLayers:
    """The seed's model; it is small to initialise at any size, so it always is."""
    return Transformer(cfg)


# `model.architecture` → its builder: the seed's layer, or a real one made by `transformers`.
MODEL_BUILDERS: dict[str, Callable[[ModelConfig, bool], PlannedLayers]] = {
    SEED_ARCHITECTURE: _build_seed,
    **{name: architecture.build for name, architecture in hf_model.ARCHITECTURES.items()},
}


def build_model(cfg: ModelConfig, initialise: bool = True) -> PlannedLayers:
    """The model `cfg` describes, built on the current default device; `initialise=False` may
    skip drawing initial weights (fake tensors have no values to draw)."""
    return MODEL_BUILDERS[cfg.architecture](cfg, initialise)


OPTIMIZER_CLASSES: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}


def build_optimizer(spec: ExperimentSpec, model: nn.Module) -> torch.optim.Optimizer:
    return OPTIMIZER_CLASSES[spec.optimizer.name](model.parameters(), lr=spec.optimizer.lr)


def make_batch(
    spec: ExperimentSpec, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens and targets from the job's seed: the same batch for every strategy."""
    generator = torch.Generator().manual_seed(spec.seed)
    shape = (spec.batch_size, spec.seq_len)
    tokens = torch.randint(spec.model.vocab_size, shape, generator=generator)
    targets = torch.randint(spec.model.vocab_size, shape, generator=generator)
    return tokens.to(device), targets.to(device)


def build_workload(
    spec: ExperimentSpec,
    plan: CheckpointPlan,
    device: torch.device | str,
    initialise: bool = True,
) -> Workload:
    """Same seed ⇒ same initial weights and batch, whatever the plan: losses are comparable."""
    torch.manual_seed(spec.seed)
    with torch.device(device):  # built in place: no host copy of a large model first
        model = build_model(spec.model, initialise)
    model.apply_plan(plan)
    optimizer = build_optimizer(spec, model)
    tokens, targets = make_batch(spec, device)
    work = Workload(spec, model, optimizer, tokens, targets, plan, partition=model.partition)
    model.storage_context = work.layer_storage
    return work


def autocast_context(spec: ExperimentSpec, device_type: str) -> contextlib.AbstractContextManager:
    if spec.precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def saved_tensor_placement(work: Workload) -> contextlib.AbstractContextManager:
    """The plan's storage for what autograd saves while the forward runs (memexp.storage)."""
    return saved_tensor_storage(
        work.plan.storage,
        formats=work.storage_formats,
        ledger=work.storage_ledger,
    )


def forward_loss(work: Workload, in_place: bool = False) -> torch.Tensor:
    """Forward and loss; `in_place` installs no storage hooks, so that the caller's own (saved
    tensors counted, memexp.measure.saved) see the tensors as made."""
    placement = contextlib.nullcontext() if in_place else saved_tensor_placement(work)
    with autocast_context(work.spec, work.tokens.device.type), placement:
        logits = work.model(work.tokens)
        return F.cross_entropy(logits.flatten(0, 1).float(), work.targets.flatten())


def backward(loss: torch.Tensor) -> None:
    loss.backward()


def optimizer_step(work: Workload) -> None:
    work.optimizer.step()
    work.optimizer.zero_grad(set_to_none=True)


def train_step(work: Workload) -> float:
    """Forward, loss, backward, optimizer step, zero_grad. Returns the loss before the update."""
    loss = forward_loss(work)
    backward(loss)
    optimizer_step(work)
    return float(loss.detach())
