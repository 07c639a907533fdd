"""FLOPs of one training step, counted on fake tensors so counting costs no compute.

`FlopCounterMode` counts matrix products (the FLOPs that matter); element-wise ops are not
counted. Recomputation inside checkpoints is counted because the backward really runs it.
`RooflineClock` turns the same run into time on an imagined device, element-wise ops included:
each operator takes the longer of its FLOPs at the peak rate and its bytes at the memory rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop,
    sdpa_flop,
)

from memexp.config import ExperimentSpec
from memexp.plan import CheckpointPlan
from memexp.storage import fake_tensor_formats
from memexp.training import Workload, backward, build_workload, forward_loss

if TYPE_CHECKING:
    from memexp.compile_partition import PartitionRecorder

FLOPS_SOURCE = "flop_counter_fake_tensors"

_aten = torch.ops.aten
# The CPU flavour of fused attention has no formula upstream; it does the same two matmuls.
_CPU_ATTENTION_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop.__wrapped__,
}


def flop_counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FORMULAS)


class _GlobalTotalOnly:
    """Stands in for `FlopCounterMode`'s module tracker: every count goes to the global total
    and no module hook is registered."""

    parents = frozenset({"Global"})

    def __enter__(self) -> _GlobalTotalOnly:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def total_flop_counter() -> FlopCounterMode:
    """A FLOP counter that counts the step's total alone and attaches nothing to the model.

    `flop_counter()`'s module hooks hold each module's output gradients until the module's
    backward completes, which changes the memory a tensor tracker sees; this one changes
    nothing, so it can count the tracked step itself (no second pass for FLOPs).
    """
    counter = flop_counter()
    counter.mod_tracker = _GlobalTotalOnly()
    return counter


def count_flops(run: Callable[[], None]) -> FlopCounterMode:
    """Run `run` under a FLOP counter and return the counter (totals and per-module counts)."""
    with flop_counter() as counter:
        run()
    return counter


def fake_workload(
    spec: ExperimentSpec, plan: CheckpointPlan, host_apart: bool = False
) -> tuple[FakeTensorMode, Workload]:
    """The workload on fake tensors, with the plan's storage in its fake-tensor formats
    (`host_apart`: offloading to host memory moves tensors off the device, as from a GPU)."""
    mode = FakeTensorMode()
    with mode:
        work = build_workload(spec, plan, "cpu", initialise=False)
    work.storage_formats = fake_tensor_formats(host_apart)
    return mode, work


def step_flops(spec: ExperimentSpec, plan: CheckpointPlan) -> int:
    """FLOPs of forward, loss and backward (recomputation included) under `plan`."""
    mode, work = fake_workload(spec, plan)
    with mode:
        counter = count_flops(lambda: backward(forward_loss(work)))
    return int(counter.get_total_flops())


def step_roofline_ps(spec: ExperimentSpec, plan: CheckpointPlan) -> int:
    """Roofline picoseconds of forward, loss and backward under `plan` (recomputation
    included) at the job's rates (`ExperimentSpec.roofline_rates`), on fake tensors: the cost
    model the planner prices its layer options with, applied to a whole step, so any eager
    plan (one no layer option expresses too) is priced alike. Offload transfers are not in it."""
    mode, work = fake_workload(spec, plan)
    with mode, flop_counter() as counter, RooflineClock(counter, *spec.roofline_rates) as clock:
        backward(forward_loss(work))
    return clock.picoseconds


def _is_view(func: Any) -> bool:
    """An operator whose outputs alias its inputs without writing them moves no bytes."""
    returns = func._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


def _bytes_of(values: Any) -> int:
    return sum(
        leaf.numel() * leaf.element_size()
        for leaf in tree_leaves(values)
        if isinstance(leaf, torch.Tensor)
    )


class RooflineClock(TorchDispatchMode):
    """Sums, over the operators run inside it, max(FLOPs / peak rate, bytes moved / memory
    rate) in whole picoseconds (an integer, so sums are exact and plans compare exactly).

    Enter it inside `counter` (a `flop_counter()`), which counts each operator's FLOPs; bytes
    moved are the operator's tensor inputs and outputs; views, and operators that make no
    tensor, move nothing.
    """

    def __init__(self, counter: FlopCounterMode, peak_tflops: float, memory_gbps: float) -> None:
        super().__init__()
        self.counter = counter
        self.flops_per_ps = peak_tflops  # 1 TFLOP/s is one FLOP per picosecond
        self.bytes_per_ps = memory_gbps / 1000.0
        self.picoseconds = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        before = self.counter.get_total_flops()
        out = func(*args, **kwargs)
        written = _bytes_of(out)
        if written and not _is_view(func):  # views and queries (a tensor's device) move nothing
            flops = self.counter.get_total_flops() - before
            moved = _bytes_of((args, kwargs)) + written
            self.picoseconds += round(max(flops / self.flops_per_ps, moved / self.bytes_per_ps))
        return out


@dataclass(frozen=True)
class CompiledRecompute:
    """The forward work a compiled step's backward runs again, as its partitioner chose it."""

    operators: int  # operator nodes of the backward graphs traced in the forward
    flops: int  # their FLOPs (matrix products, as the step's count)
    picoseconds: int  # their time on the roofline, as `RooflineClock` prices a step


def compiled_recompute(
    partition: PartitionRecorder, rates: tuple[float, float]
) -> CompiledRecompute:
    """Price the recomputed nodes of `partition`'s backward graphs at `rates` (peak TFLOP/s,
    memory GB/s): each runs once more on the fake tensors the compile traced it with, under the
    FLOP counter and the roofline clock, so it costs what the same operator costs in any step.
    The graphs are as the backend runs them, operator by operator after inductor's
    decompositions; inductor would fuse element-wise chains and move fewer bytes."""
    nodes = list(partition.recomputed_nodes())
    fake_mode = detect_fake_mode([node.meta["val"] for node in nodes])
    with (
        fake_mode or contextlib.nullcontext(),
        total_flop_counter() as counter,
        RooflineClock(counter, *rates) as clock,
    ):
        for node in nodes:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
            node.target(*args, **kwargs)
    return CompiledRecompute(len(nodes), int(counter.get_total_flops()), clock.picoseconds)


@dataclass(frozen=True)
class Roofline:
    """One operator's time as max(FLOPs / peak, bytes read and written / bandwidth), in
    milliseconds, in the form PyTorch's estimators take (`torch.distributed._tools`'
    RuntimeEstimator and SACEstimator): their own estimate needs a CUDA device."""

    tflops: float
    gbps: float
    source: str

    def estimate(self, func: Any, args: Any, kwargs: Any) -> tuple[Any, float]:
        """Run `func` (on fake tensors) and return its output and estimated milliseconds."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        moved = _bytes_of((args, kwargs, out))
        packet = func._overloadpacket
        flops = (
            flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        )
        seconds = max(flops / (self.tflops * 1e12), moved / (self.gbps * 1e9))
        return out, seconds * 1e3
