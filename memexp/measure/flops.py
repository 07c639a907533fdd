"""FLOPs of one training step, counted on fake tensors so counting costs no compute.

`FlopCounterMode` counts matrix products (the FLOPs that matter); element-wise ops are not
counted. Recomputation inside checkpoints is counted because the backward really runs it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop

from memexp.config import ExperimentSpec
from memexp.plan import CheckpointPlan
from memexp.training import Workload, backward, build_workload, forward_loss

FLOPS_SOURCE = "flop_counter_fake_tensors"

_aten = torch.ops.aten
# The CPU flavour of fused attention has no formula upstream; it does the same two matmuls.
_CPU_ATTENTION_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop.__wrapped__,
}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FORMULAS)


def count_flops(run: Callable[[], None]) -> FlopCounterMode:
    """Run `run` under a FLOP counter and return the counter (totals and per-module counts)."""
    with flop_counter() as counter:
        run()
    return counter


def fake_workload(spec: ExperimentSpec, plan: CheckpointPlan) -> tuple[FakeTensorMode, Workload]:
    mode = FakeTensorMode()
    with mode:
        work = build_workload(spec, plan, "cpu")
    return mode, work


def step_flops(spec: ExperimentSpec, plan: CheckpointPlan) -> int:
    """FLOPs of forward, loss and backward (recomputation included) under `plan`."""
    mode, work = fake_workload(spec, plan)
    with mode:
        counter = count_flops(lambda: backward(forward_loss(work)))
    return int(counter.get_total_flops())
