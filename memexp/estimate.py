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
state exists before the tracked step starts (created by an optimizer step on zero gradients).
The tracked step also counts FLOPs; the bytes saved for backward are counted in a forward of
their own (`_steady_step` says why).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

from memexp.buckets import BucketBatch, BucketTable
from memexp.config import PARALLEL_NONE, ExperimentSpec, ParallelConfig
from memexp.measure.fake_world import fake_ranks
from memexp.measure.flops import fake_workload, step_flops, total_flop_counter
from memexp.measure.memory import MemoryMeasurement, tracked_step
from memexp.measure.timing import first_step, forward_saved_bytes
from memexp.memo import cached
from memexp.model import parameter_count
from memexp.plan import CheckpointPlan
from memexp.results import SOURCE_FAKE_TENSORS, InfeasibleError
from memexp.sharded_states import gradient_bucket_bytes
from memexp.sharding import shard_workload
from memexp.storage import IMAGINED_HOST, StorageLedger
from memexp.text import format_bytes
from memexp.training import Workload, optimizer_step

TIME_SOURCE_ESTIMATE = "estimate_from_flops"
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
    storage: StorageLedger | None = None  # what the tracked step's storage packed and restored


def use_multi_tensor_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Run the `foreach` implementation, PyTorch's default for CUDA tensors (not for CPU ones)."""
    for group in optimizer.param_groups:
        group["foreach"] = True


def _create_optimizer_state(work: Workload) -> None:
    """A step on zero gradients: the optimizer's state exists, as after any warm-up step, for a
    fraction of a forward and backward's cost."""
    for parameter in work.model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer_step(work)


def _steady_step(work: Workload, counts: bool) -> tuple[MemoryMeasurement, int | None, int | None]:
    """The tracked step at steady state (the optimizer's state created by a step on zero
    gradients) and, with `counts`, the bytes its forward saves and its FLOPs (else None).

    Saved bytes are counted in a forward of their own that keeps nothing (`forward_saved_bytes`):
    counting hooks in the tracked step would change its timeline. FLOPs are counted in the
    tracked step itself, by a counter that attaches nothing to the model and is entered before
    the tracker, so the tracker sees nothing of it. One forward and one full step on fake
    tensors, where a warm-up step and the tracked step took two full steps.

    A model sharded by `fully_shard` expects a backward after every forward (a forward alone
    leaves the next step a different one), so it counts saved bytes in a whole warm-up step.
    """
    if counts and isinstance(work.model, FSDPModule):
        _, saved = first_step(work)
    else:
        _create_optimizer_state(work)
        saved = forward_saved_bytes(work) if counts else None
    work.storage_ledger = StorageLedger()  # the tracked step's own
    if not counts:
        return tracked_step(work, source=SOURCE_FAKE_TENSORS), None, None
    with total_flop_counter() as counter:
        memory = tracked_step(work, source=SOURCE_FAKE_TENSORS)
    return memory, saved, int(counter.get_total_flops())


def predict(
    spec: ExperimentSpec,
    plan: CheckpointPlan,
    imagine: str,
    counts: bool = True,
) -> Prediction:
    """The step of `spec` under `plan` on fake tensors, following `imagine`'s code paths.

    `counts=False` predicts the memory alone (what the batch search needs); otherwise saved
    bytes and FLOPs are counted too.
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
    mode, work = fake_workload(spec, plan, host_apart=imagine == "cuda")
    offload_to_host = plan.storage == "host" and imagine == "cuda"
    with mode:
        shard_workload(work, mesh)
        if imagine == "cuda":
            use_multi_tensor_optimizer(work.optimizer)
        memory, saved, flops = _steady_step(work, counts)
    return Prediction(
        memory=memory,
        param_count=parameter_count(work.model),
        host_peak_bytes=memory.other_device_peaks.get(str(IMAGINED_HOST), 0)
        if offload_to_host
        else None,
        saved_activation_bytes=saved,
        flops_step=flops,
        storage=work.storage_ledger,
    )


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


NO_CHECKPOINT_FLOPS = "flops_no_checkpoint"  # its name in a sweep's cache (memexp.memo)


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
    spec: ExperimentSpec,
    plan_for: Callable[[ExperimentSpec], CheckpointPlan],
    limit: int = MAX_AUTO_BATCH,
) -> BatchSearch:
    """The search for the largest batch predicted to fit the job's budget, from its own batch up
    to `limit`.

    Each batch tried is planned afresh (`plan_for`), since a planner may adapt to the batch.
    """
    imagine = spec.imagined_device

    def peak_of(batch_size: int) -> int:
        at = replace(spec, batch_size=batch_size)
        return predict(at, plan_for(at), imagine, counts=False).memory.peak_bytes

    budget = spec.memory_budget_bytes
    assert budget is not None, "validate() requires a budget for batch=auto"
    search = search_largest_batch(peak_of, budget, start=spec.batch_size, limit=limit)
    return replace(search, imagine=imagine)


def at_chosen_batch(spec: ExperimentSpec, search: BatchSearch) -> ExperimentSpec:
    """The job at the batch `search` chose; InfeasibleError when even its first batch did not fit."""
    if search.batch_size is None:
        raise InfeasibleError(
            f"batch {spec.batch_size} at seq {spec.seq_len} already needs "
            f"{format_bytes(search.peak_bytes)} "
            f"(predicted peak, {SOURCE_FAKE_TENSORS}), over the budget of "
            f"{format_bytes(search.budget_bytes)}"
        )
    return replace(spec, batch_size=search.batch_size)


# --- batch=dynamic ---------------------------------------------------------------------------


def choose_bucket_batches(
    spec: ExperimentSpec, plan_for: Callable[[ExperimentSpec], CheckpointPlan]
) -> BucketTable:
    """batch=auto's search at the longest length, for the fixed batch every bucket is compared
    with, and at each bucket's longest length, for the bucket's own batch.

    No batch is searched beyond the sequences there are (all of them for the fixed batch, the
    bucket's own for a bucket): a larger one would carry padding only. Shorter buckets start
    from the batch of the bucket above, which fits at their shorter length too (a step's peak
    grows with its length). InfeasibleError when even the job's batch does not fit the longest.
    """
    buckets = spec.buckets
    assert buckets is not None, "validate() gives batch=dynamic its buckets"
    longest = replace(spec, seq_len=buckets.longest)
    fixed = choose_batch(longest, plan_for, limit=buckets.sequences)
    fixed_batch = start = at_chosen_batch(longest, fixed).batch_size
    rows: list[BucketBatch] = []
    for bucket in reversed(buckets.buckets):
        at = replace(spec, seq_len=bucket.longest, batch_size=min(start, bucket.sequences))
        search = choose_batch(at, plan_for, limit=bucket.sequences)
        start = at_chosen_batch(at, search).batch_size
        rows.insert(0, BucketBatch(bucket, start, search.peak_bytes, search.limit_reached))
    return BucketTable(
        buckets,
        tuple(rows),
        budget_bytes=fixed.budget_bytes,
        fixed_batch=fixed_batch,
        fixed_peak_bytes=fixed.peak_bytes,
        source=SOURCE_FAKE_TENSORS,
        imagine=spec.imagined_device,
    )


def at_longest_bucket(spec: ExperimentSpec, table: BucketTable) -> ExperimentSpec:
    """The job at one fixed batch at the longest length: the step every bucket is compared
    with."""
    return replace(spec, seq_len=table.buckets.longest, batch_size=table.fixed_batch)
