"""Predict a job without allocating it: its step on fake tensors, and the largest batch that fits.

The fake device runs the job's own step (model, plan, loss, backward, optimizer step) under
`FakeTensorMode`, where every tensor has a shape, dtype and device but no data, and the tensor
tracker counts the bytes each would hold. Nothing is computed, so a 7B-parameter step is
predicted on a laptop in seconds.

What is imagined (docs/memory_model.md has the whole account):

* kernels are the CPU's, because no CUDA kernel runs here even on fake tensors: `attention:
  sdpa` picks the CPU flash kernel (it saves q, k, v, the output and a b·a·s logsumexp, as
  CUDA's flash and memory-efficient kernels do); `precision: bf16` follows the CPU autocast op
  lists (CUDA's also lifts softmax to fp32);
* `device.imagine: cuda` (the default) follows CUDA's defaults where PyTorch leaves the choice to
  the device: the multi-tensor (`foreach`) optimizer, whose step holds a params-sized scratch, and
  offloaded saved tensors held in host memory (the meta device stands in for the host here);
  `device.imagine: cpu` runs exactly what `device=cpu` runs, byte for byte.

The step is predicted at steady state, as the CPU and CUDA runs measure it: the optimizer's
state exists before the tracked step starts (a warm-up step, which also counts saved bytes and
FLOPs, or for a peak alone a cheaper optimizer step on zero gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch
from torch.distributed.device_mesh import DeviceMesh

from memexp.config import PARALLEL_NONE, ExperimentSpec, ParallelConfig
from memexp.measure.fake_world import fake_ranks
from memexp.measure.flops import fake_workload, flop_counter, step_flops
from memexp.measure.memory import MemoryMeasurement, tracked_step
from memexp.measure.timing import first_step
from memexp.memo import cached
from memexp.model import parameter_count
from memexp.plan import CheckpointPlan
from memexp.results import SOURCE_FAKE_TENSORS, InfeasibleError
from memexp.sharded_states import gradient_bucket_bytes
from memexp.sharding import shard_workload
from memexp.text import format_bytes
from memexp.training import Workload, optimizer_step

TIME_SOURCE_ESTIMATE = "estimate_from_flops"
# Stands for host memory on the fake device: offloaded tensors are tracked there, apart.
IMAGINED_HOST = torch.device("meta")
# The batch search stops doubling here, so a budget nothing reaches still ends.
MAX_AUTO_BATCH = 1 << 16


@dataclass
class Prediction:
    """One job's step on fake tensors: memory as the tracker saw it, and what was counted."""

    memory: MemoryMeasurement
    param_count: int
    host_peak_bytes: int | None  # offloaded saved tensors in host memory (imagine=cuda only)
    saved_activation_bytes: int | None = None  # None: not counted (a peak-only prediction)
    flops_step: int | None = None  # forward, loss and backward, recomputation included


def use_multi_tensor_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Run the `foreach` implementation, PyTorch's default for CUDA tensors (not for CPU ones)."""
    for group in optimizer.param_groups:
        group["foreach"] = True


@contextlib.contextmanager
def held_in_host_memory() -> Iterator[None]:
    """`save_on_cpu` as a GPU sees it: saved tensors move to host memory, come back for backward."""

    def pack(tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        return tensor.device, tensor.to(IMAGINED_HOST)

    def unpack(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
        device, tensor = packed
        return tensor.to(device)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _warm_up(work: Workload) -> tuple[int, int]:
    """An untracked first step, as the measured runs take: it creates the optimizer state and
    counts the bytes the forward saves and the step's FLOPs. Returns (saved bytes, FLOPs).

    FLOPs are counted here, not in the tracked step: the counter's module hooks hold gradients
    until a module's backward completes, which would change the memory the tracker sees.
    """
    with flop_counter() as counter:  # the optimizer step inside adds no matmul FLOPs
        _, saved = first_step(work)
    return saved, int(counter.get_total_flops())


def _create_optimizer_state(work: Workload) -> None:
    """A step on zero gradients: the optimizer's state exists, as after any warm-up step, for a
    fraction of a forward and backward's cost (a peak-only prediction needs no counts)."""
    for parameter in work.model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer_step(work)


def predict(
    spec: ExperimentSpec,
    plan: CheckpointPlan,
    imagine: str,
    counts: bool = True,
) -> Prediction:
    """The step of `spec` under `plan` on fake tensors, following `imagine`'s code paths.

    `counts=False` predicts the memory alone (what the batch search needs); otherwise a full
    warm-up step also counts saved bytes and FLOPs.
    """
    with ranks_of(spec.parallel) as mesh:
        prediction = _predict_rank(spec, plan, imagine, counts, mesh)
    return with_gradient_buckets(prediction, gradient_bucket_bytes(spec))


def ranks_of(parallel: ParallelConfig) -> contextlib.AbstractContextManager[DeviceMesh | None]:
    """Fake ranks for a parallel job (this process plays rank 0); nothing for one device."""
    if parallel.name == PARALLEL_NONE:
        return contextlib.nullcontext()
    return fake_ranks(parallel.world_size)


def _predict_rank(
    spec: ExperimentSpec,
    plan: CheckpointPlan,
    imagine: str,
    counts: bool,
    mesh: DeviceMesh | None,
) -> Prediction:
    mode, work = fake_workload(spec, plan)
    offload_to_host = plan.offload and imagine == "cuda"
    saved = flops = None
    with mode:
        shard_workload(work, mesh)
        if imagine == "cuda":
            use_multi_tensor_optimizer(work.optimizer)
        if counts:
            saved, flops = _warm_up(work)
        else:
            _create_optimizer_state(work)
        if offload_to_host:
            work.plan = replace(plan, offload=False)  # the host hooks below stand in for it
        placement = held_in_host_memory() if offload_to_host else contextlib.nullcontext()
        with placement:
            memory = tracked_step(work, source=SOURCE_FAKE_TENSORS)
    return Prediction(
        memory=memory,
        param_count=parameter_count(work.model),
        host_peak_bytes=memory.other_device_peaks.get(str(IMAGINED_HOST), 0)
        if offload_to_host
        else None,
        saved_activation_bytes=saved,
        flops_step=flops,
    )


NO_CHECKPOINT_FLOPS = "flops_no_checkpoint"  # its name in a sweep's cache (memexp.memo)


def with_gradient_buckets(prediction: Prediction, bucket_bytes: int) -> Prediction:
    """The rank's step with DDP's gradient buckets, which live from wrapping to the end: their
    bytes are added at every moment and filed as communication buffers (memexp.sharded_states)."""
    if not bucket_bytes:
        return prediction
    memory = prediction.memory
    breakdown = dict(memory.breakdown)
    breakdown["communication_bytes"] = breakdown.get("communication_bytes", 0) + bucket_bytes
    shifted = replace(
        memory,
        peak_bytes=memory.peak_bytes + bucket_bytes,
        breakdown=breakdown,
        phase_bytes={phase: value + bucket_bytes for phase, value in memory.phase_bytes.items()},
        timeline=[(op, value + bucket_bytes, phase) for op, value, phase in memory.timeline],
        notes={**memory.notes, "gradient_bucket_source": "closed_form"},
    )
    return replace(prediction, memory=shifted)


def step_flops_without_checkpointing(spec: ExperimentSpec) -> int:
    """The step's FLOPs with nothing recomputed, from models of one and two layers; counted once
    per workload in a sweep (memexp.memo), whatever the strategy.

    Every layer does the same FLOPs, so FLOPs are exactly affine in depth: counting two shallow
    models costs a fraction of counting the deep one.
    """
    return cached(NO_CHECKPOINT_FLOPS, spec, lambda: _count_without_checkpointing(spec))


def _count_without_checkpointing(spec: ExperimentSpec) -> int:

    def flops_at(layers: int) -> int:
        shallow = replace(spec, model=replace(spec.model, layers=layers))
        return step_flops(shallow, CheckpointPlan.nothing(layers))

    one, two = flops_at(1), flops_at(2)
    return one + (spec.model.layers - 1) * (two - one)


def predict_job(spec: ExperimentSpec, plan: CheckpointPlan) -> Prediction:
    return predict(spec, plan, spec.imagined_device)


def estimated_step_ms(flops: int, peak_tflops: float, utilization: float) -> float:
    """Matmul FLOPs at `utilization` of the peak rate: a lower bound on the step's time."""
    return flops / (peak_tflops * 1e12 * utilization) * 1e3


# --- batch=auto ----------------------------------------------------------------------------


@dataclass
class BatchSearch:
    """Every batch tried and its predicted peak; the answer is the largest that fit."""

    budget_bytes: int
    probes: dict[int, int]  # batch size → predicted peak bytes, in the order tried
    batch_size: int | None  # None: even the first batch tried does not fit
    limit_reached: bool = False  # every batch up to MAX_AUTO_BATCH fit
    imagine: str | None = None  # whose code paths the predictions followed

    @property
    def peak_bytes(self) -> int:
        return self.probes[self.batch_size if self.batch_size is not None else min(self.probes)]

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.peak_bytes


def search_largest_batch(
    peak_of: Callable[[int], int],
    budget_bytes: int,
    start: int = 1,
    limit: int = MAX_AUTO_BATCH,
) -> BatchSearch:
    """Double from `start` until a batch does not fit, then bisect: the largest that fits.

    Peak memory grows with the batch, so when the answer is below `limit` the search has also
    tried the answer + 1 and seen it exceed the budget.
    """
    probes: dict[int, int] = {}

    def fits(batch: int) -> bool:
        probes[batch] = peak_of(batch)
        return probes[batch] <= budget_bytes

    if not fits(start):
        return BatchSearch(budget_bytes, probes, None)
    low, high = start, None  # low fits; high (once known) does not
    while high is None:
        if low >= limit:
            return BatchSearch(budget_bytes, probes, low, limit_reached=True)
        candidate = min(2 * low, limit)
        if fits(candidate):
            low = candidate
        else:
            high = candidate
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return BatchSearch(budget_bytes, probes, low)


def choose_batch(
    spec: ExperimentSpec, plan_for: Callable[[ExperimentSpec], CheckpointPlan]
) -> BatchSearch:
    """The search for the largest batch predicted to fit the job's budget, from its own batch up.

    Each batch tried is planned afresh (`plan_for`), since a planner may adapt to the batch.
    """
    imagine = spec.imagined_device

    def peak_of(batch_size: int) -> int:
        at = replace(spec, batch_size=batch_size)
        return predict(at, plan_for(at), imagine, counts=False).memory.peak_bytes

    budget = spec.memory_budget_bytes
    assert budget is not None, "validate() requires a budget for batch=auto"
    search = search_largest_batch(peak_of, budget, start=spec.batch_size)
    return replace(search, imagine=imagine)


def at_chosen_batch(spec: ExperimentSpec, search: BatchSearch) -> ExperimentSpec:
    """The job at the batch `search` chose; InfeasibleError when even its first batch did not fit."""
    if search.batch_size is None:
        raise InfeasibleError(
            f"batch {spec.batch_size} already needs {format_bytes(search.peak_bytes)} "
            f"(predicted peak, {SOURCE_FAKE_TENSORS}), over the budget of "
            f"{format_bytes(search.budget_bytes)}"
        )
    return replace(spec, batch_size=search.batch_size)
