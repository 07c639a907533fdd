"""The measured step of a job: timed steps, then one tracked memory step, on one device or on
every rank of a process group.

On one device the step runs here. Under a `parallel` mode each rank builds its share of the
workload (memexp.sharding, as the fake device predicts it, plus DDP's real gradient all-reduce
under ddp and zero1), times it and tracks its memory step with the same
tracker as one device, and sends its figures back (memexp.ranks); the job reports rank 0's times
(every rank waits for the others at each collective, so their steps take the same time) and the
memory of every rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch.distributed.device_mesh import init_device_mesh

from memexp.config import FULLY_SHARDED_MODES, ExperimentSpec
from memexp.measure.flops import CompiledRecompute, compiled_recompute
from memexp.measure.machine import available_cpus, intra_op_threads
from memexp.measure.memory import MemoryMeasurement, across_ranks, measure_memory
from memexp.measure.timing import StoppingRule, Timings, time_steps
from memexp.model import parameter_count
from memexp.observe import enter_phase
from memexp.plan import CheckpointPlan
from memexp.ranks import Rank, run_ranks
from memexp.sharding import shard_workload, synchronize_gradients
from memexp.storage import StorageLedger
from memexp.training import Workload, build_workload


@dataclass
class MeasuredStep:
    """What one device, or one rank, measured of the step; plain data a rank can send back."""

    param_count: int  # the whole model's, however it is sharded
    timings: Timings
    memory: MemoryMeasurement
    storage_ledger: StorageLedger  # what the warm-up and timed steps' storage packed
    # What a compiled forward's backward recomputes, where its backend records its partition.
    compiled_recompute: CompiledRecompute | None = None


def measure_step(spec: ExperimentSpec, plan: CheckpointPlan, device: torch.device) -> MeasuredStep:
    """Warm-up and timed steps, then one tracked memory step, on `device`."""
    enter_phase("build")
    return measure_work(build_workload(spec, plan, device), spec)


def measure_work(work: Workload, spec: ExperimentSpec) -> MeasuredStep:
    """Warm-up and timed steps, then one tracked memory step, of a workload built (and sharded)."""
    timings = time_steps(work, spec.measure.warmup, StoppingRule.of(spec.measure))
    ledger = replace(work.storage_ledger)  # the timed steps' alone, before the memory step
    partition = work.partition  # recorded by the warm-up step's backward
    recompute = None if partition is None else compiled_recompute(partition, spec.roofline_rates)
    enter_phase("memory step")
    memory = measure_memory(work)
    return MeasuredStep(parameter_count(work.model), timings, memory, ledger, recompute)


def rank_threads(spec: ExperimentSpec, device_type: str, world_size: int) -> int | None:
    """Intra-op threads for one rank: `measure.threads` when set; on the CPU otherwise the CPUs
    shared out among the ranks (as torchrun does), so the ranks do not contend for every core."""
    if spec.measure.threads is not None or device_type != "cpu":
        return spec.measure.threads
    return max(1, available_cpus() // world_size)


def measure_rank(spec: ExperimentSpec, plan: CheckpointPlan, rank: Rank) -> MeasuredStep:
    """The step as one rank of the group runs it, on its own device (its GPU by local rank)."""
    device_type = torch.device(spec.device).type
    device = torch.device(device_type)
    if device_type == "cuda":
        device = torch.device(device_type, rank.local_rank)
        torch.cuda.set_device(device)
    with intra_op_threads(rank_threads(spec, device_type, rank.world_size)):
        work = build_workload(spec, plan, device)
        mesh = None
        if spec.parallel.name in FULLY_SHARDED_MODES:
            mesh = init_device_mesh(device_type, (rank.world_size,))
        shard_workload(work, mesh)
        synchronize_gradients(work)
        return measure_work(work, spec)


def measure_on_ranks(
    spec: ExperimentSpec, plan: CheckpointPlan, process_group: str
) -> MeasuredStep:
    """The step on `spec.parallel.world_size` ranks joined by a `process_group` backend: rank 0's
    times and parameter count, the memory of the fullest rank with every rank's beside it."""
    steps = run_ranks(
        functools.partial(measure_rank, spec, plan),
        spec.parallel.world_size,
        spec.measure.rank_timeout_s,
        process_group,
    )
    first = steps[0]
    memory = across_ranks([s.memory for s in steps])
    return MeasuredStep(first.param_count, first.timings, memory, first.storage_ledger)
