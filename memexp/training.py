"""One training step, split into the phases every measurement talks about.

Timing, memory tracking, saved-tensor counting and FLOP counting all drive the model through
these functions, so they all measure the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memexp.config import ExperimentSpec
from memexp.model import Transformer
from memexp.plan import CheckpointPlan


@dataclass
class Workload:
    """Everything one step needs: the model under its plan, the optimizer and a fixed batch."""

    spec: ExperimentSpec
    model: Transformer
    optimizer: torch.optim.Optimizer
    tokens: torch.Tensor
    targets: torch.Tensor
    plan: CheckpointPlan


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
) -> Workload:
    """Same seed ⇒ same initial weights and batch, whatever the plan: losses are comparable."""
    torch.manual_seed(spec.seed)
    with torch.device(device):  # built in place: no host copy of a large model first
        model = Transformer(spec.model)
    model.apply_plan(plan)
    optimizer = build_optimizer(spec, model)
    tokens, targets = make_batch(spec, device)
    return Workload(spec, model, optimizer, tokens, targets, plan)


def autocast_context(spec: ExperimentSpec, device_type: str) -> contextlib.AbstractContextManager:
    if spec.precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def saved_tensor_placement(work: Workload) -> Iterator[None]:
    """Offloading plans keep what autograd saves in (pinned) host memory while the forward runs."""
    if work.plan.offload:
        pin = work.tokens.device.type == "cuda"
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            yield
    else:
        yield


def forward_loss(work: Workload, in_place: bool = False) -> torch.Tensor:
    """Forward and loss; `in_place` ignores offloading (to count saved tensors where they are made)."""
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
