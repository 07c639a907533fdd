"""Which operator outputs a layer recomputed whole may keep: the choices inside the unit.

A layer recomputed under a selective checkpoint may keep any set of its operators' outputs and
recompute the rest (`CheckpointPlan.saved_ops`). Of the 2ⁿ sets, the planner is offered those
no other set beats on both figures that matter, bytes kept and recompute time saved: the Pareto
frontier of a knapsack over the layer's operators. PyTorch's own ILP (`sac_milp`) picks each
layer's set as one knapsack at one memory fraction, so its per-layer sets lie on the same
frontier, and the planner can choose them or better ones, layer by layer.

The operators and their figures are PyTorch's SAC estimator's
(`torch.distributed._tools.sac_estimator`, on fake tensors over a one-layer model), each
operator priced on the job's roofline (`ExperimentSpec.roofline_rates`), and grouped as the
estimator groups them for its own greedy order: views always recomputed, an in-place operator
with its parent, random operators together. One departure: operators after the layer's last
output that autograd saves are left out, since non-reentrant checkpointing stops recomputing
once every saved tensor is back, so keeping them saves no time. These figures only choose the
candidates; the planner's profile then measures each one exactly (memexp.planner).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from memexp.config import ExperimentSpec
from memexp.measure.flops import Roofline, fake_workload
from memexp.plan import CheckpointPlan
from memexp.training import forward_loss

# The most sets offered per layer: each is one more layer in the planner's profile. The
# seed's layers have 20-50 sets on their frontier, a Llama layer's many small tensors
# (rotary tables, casts) thousands; this many, spread evenly over the bytes kept, still
# leave the solver a choice every few MiB on `small` while mixing them across layers.
MAX_CHOICES = 16


def saved_operator_names(stats: Any, keep: list[int]) -> tuple[str, ...]:
    """`<op>#<occurrence>` of each operator of `stats` (an SACStats) kept (1 in `keep`),
    numbered as memexp.model.SavedOpsPolicy numbers them."""
    seen: dict[str, int] = {}
    names = []
    for name, decision in zip(stats.func_names, keep, strict=True):
        occurrence = seen.get(name, 0)
        seen[name] = occurrence + 1
        if decision == 1:
            names.append(f"{name}#{occurrence}")
    return tuple(names)


@dataclass(frozen=True)
class OperatorGroup:
    """Operators kept or recomputed together, with the bytes their outputs take and the time
    recomputing them takes."""

    indices: frozenset[int]
    memory_bytes: int
    runtime_ms: float


def layer_operators(spec: ExperimentSpec) -> tuple[Any, list[OperatorGroup], frozenset[int]]:
    """The job's layer as PyTorch's SAC estimator sees it: its statistics (an SACStats), the
    groups a plan may keep or recompute, and the operators always kept."""
    from torch.distributed._tools.sac_estimator import SACEstimator

    one_layer = replace(spec, model=replace(spec.model, layers=1))
    mode, work = fake_workload(one_layer, CheckpointPlan.nothing(1))
    with mode:
        estimator = SACEstimator()
        estimator._estimate_runtime = Roofline(*spec.roofline_rates, "the job's").estimate
        with estimator:
            forward_loss(work)
    name = f"{type(work.model).__name__}.layers.0"
    stats, order = estimator.sac_mod_stats[name], estimator.sac_mod_greedy_order_meta[name]

    def group(head: int) -> frozenset[int]:
        members = {head} | order.inplace_op_groups.get(head, set())
        return frozenset(members | order.random_ops_group.get(head, set()))

    last_saved = max(stats.saved_autograd_ops, default=-1)
    groups = []
    for candidate in order.msps_meta:
        if candidate.op_idx > last_saved or candidate.memory <= 0:
            continue
        groups.append(OperatorGroup(group(candidate.op_idx), candidate.memory, candidate.runtime))
    always = frozenset().union(*(group(head) for head in order.stored_ops))
    return stats, groups, always


def pareto_sets(groups: list[OperatorGroup]) -> list[tuple[int, frozenset[int]]]:
    """Every set of groups that no other set beats (less memory with at least as much runtime
    kept, or more runtime kept with no more memory), with the bytes it keeps; by memory, the
    empty set first."""
    best: dict[int, tuple[float, frozenset[int]]] = {0: (0.0, frozenset())}
    for item in groups:
        grown = dict(best)
        for memory, (runtime, members) in best.items():
            key, value = memory + item.memory_bytes, runtime + item.runtime_ms
            if key not in grown or grown[key][0] < value:
                grown[key] = (value, members | item.indices)
        best, highest = {}, -1.0
        for memory in sorted(grown):
            runtime, members = grown[memory]
            if runtime > highest:
                best[memory], highest = (runtime, members), runtime
    return [(memory, best[memory][1]) for memory in sorted(best)]


def spread_evenly(sizes: list[int], count: int) -> list[int]:
    """Indices of at most `count` of the ascending `sizes`: those nearest to `count` points
    evenly spread between the smallest and the largest, in order."""
    if len(sizes) <= count:
        return list(range(len(sizes)))
    low, high = sizes[0], sizes[-1]
    targets = [low + (high - low) * step / (count - 1) for step in range(count)]
    picked = {min(range(len(sizes)), key=lambda i: abs(sizes[i] - target)) for target in targets}
    return sorted(picked)


def kept_output_choices(spec: ExperimentSpec) -> tuple[tuple[str, ...], ...]:
    """The operator outputs (`<op>#<n>` names) each offered choice keeps: the layer's Pareto
    frontier less its two ends (keeping none of them is the layer recomputed whole, its own
    option; keeping all of them recomputes next to nothing at a checkpoint's cost), at most
    `MAX_CHOICES` of it spread evenly over the bytes kept."""
    stats, groups, always = layer_operators(spec)
    frontier = pareto_sets(groups)[1:-1]
    sizes = [memory for memory, _ in frontier]
    choices = []
    for _, members in (frontier[i] for i in spread_evenly(sizes, MAX_CHOICES)):
        kept = members | always
        choices.append(
            saved_operator_names(stats, [int(i in kept) for i in range(len(stats.func_names))])
        )
    return tuple(choices)
