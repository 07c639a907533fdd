"""PyTorch's own activation-checkpointing planner (`sac_milp`), run here as a peer of adaptive's.

`torch.distributed._tools` profiles a model on fake tensors (MemTracker for memory per module,
RuntimeEstimator for time per module, SACEstimator for every operator's output bytes and time),
and `sac_ilp.sac_milp` solves a mixed-integer program over the module tree: which modules to
checkpoint and what fraction of each one's activation memory to discard, least recompute time
within a peak-memory budget. `get_optimal_checkpointing_policy_per_module` then picks the
operators whose outputs a checkpointed module keeps. This module is the one place that touches
those private tools; it changes three things, each recorded:

* **Roofline.** Upstream estimates operator time with a roofline from the CUDA device's FLOP/s
  and memory bandwidth, and refuses to run without CUDA. Here each operator's time is
  max(FLOPs / peak FLOP/s, bytes read and written / bandwidth), FLOPs from PyTorch's FLOP
  counter formulas (matmuls and attention only, as elsewhere in memexp), with the two rates
  given (`strategy.roofline_tflops`, `strategy.roofline_gbps`) or measured on this machine's CPU
  (one matmul and one element-wise add of the layer's sizes).
* **What its memory model leaves out.** Its peak is parameters + gradients so far + activations
  + activation gradients: no optimizer state, no batch, no loss and logits' own scratch. Its
  budget is therefore corrected by the difference between memexp's predicted peak of the `none`
  plan (fake tensors; on the CPU equal to the measurement) and its own baseline peak of the same
  plan, over the budget's scope. The correction is recorded, with the optimizer state and batch
  it contains.
* **AC units.** Only whole layers may be checkpointed (its `ac_units`): the model executes a
  layer's explicit saved-operator list (`CheckpointPlan.saved_ops`), not one for a sub-block.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from memexp import analytic
from memexp.config import ExperimentSpec
from memexp.estimate import predict
from memexp.measure.flops import Roofline, fake_workload
from memexp.operator_choices import saved_operator_names
from memexp.plan import CheckpointPlan
from memexp.text import GIB
from memexp.training import Workload, backward, forward_loss, optimizer_step

ROOFLINE_MEASURED = "measured on this machine's CPU: one matmul and one add of the layer's sizes"
ROOFLINE_GIVEN = "given: strategy.roofline_tflops and strategy.roofline_gbps"


def measured_roofline(spec: ExperimentSpec) -> Roofline:
    """The two rates of this machine's CPU, timed on tensors of the job's layer size (capped so
    that calibrating a large model stays quick): the best of three runs each."""
    rows = min(spec.tokens_per_step, 1024)
    hidden = min(spec.model.hidden, 1024)
    a, b = torch.randn(rows, hidden), torch.randn(hidden, 4 * hidden)
    x, y = torch.randn(rows, 4 * hidden), torch.randn(rows, 4 * hidden)

    def best_seconds(run: Callable[[], Any]) -> float:
        run()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    matmul_s = best_seconds(lambda: a @ b)
    add_s = best_seconds(lambda: x + y)
    tflops = 2 * rows * hidden * 4 * hidden / matmul_s / 1e12
    gbps = 3 * x.numel() * x.element_size() / add_s / 1e9
    return Roofline(tflops=tflops, gbps=gbps, source=ROOFLINE_MEASURED)


@dataclass
class SacProfile:
    """What the ILP needs (its module graph) and what translating its answer needs."""

    graph: Any  # torch.distributed._tools.ilp_utils.Graph
    operator_stats: dict[str, Any]  # layer fqn → SACStats
    layer_names: list[str]
    ilp_baseline_peak_bytes: int  # its own peak of the `none` plan
    memexp_baseline_peak_bytes: int  # memexp's predicted peak of `none`, over the scope
    roofline: Roofline

    @property
    def correction_bytes(self) -> int:
        """What the ILP's memory model leaves out, at the `none` plan."""
        return self.memexp_baseline_peak_bytes - self.ilp_baseline_peak_bytes


def _track_memory(work: Workload) -> Any:
    """Two steps under PyTorch's MemTracker (the first creates the optimizer state), as
    upstream's own test of sac_milp runs it."""
    from torch.distributed._tools.mem_tracker import MemTracker, _ModState

    tracker = MemTracker()
    tracker.track_external(work.model, work.optimizer)
    with tracker:
        for index in range(2):
            backward(forward_loss(work))
            if index == 1:
                last = tracker.get_tracker_snapshot("current")
            optimizer_step(work)
            if index == 0:
                tracker.reset_mod_stats()
    # ModTracker calls no post-backward hook for modules whose inputs need no gradient
    # (the embeddings): upstream's test fills the snapshot in the same way.
    for stats in tracker.memory_tracking.values():
        if _ModState.POST_BW not in stats.snapshots:
            stats.snapshots.setdefault(_ModState.POST_BW, []).append(copy.deepcopy(last))
    return tracker


def profile(spec: ExperimentSpec, scope: str, roofline: Roofline) -> SacProfile:
    """Profile the job's model on fake tensors with PyTorch's three estimators, and memexp's
    own prediction of the `none` plan for the correction."""
    from torch.distributed._tools.ilp_utils import (
        aggregate_stats,
        get_peak_memory_runtime_baseline,
        parse_module_info,
    )
    from torch.distributed._tools.runtime_estimator import RuntimeEstimator
    from torch.distributed._tools.sac_estimator import SACEstimator

    nothing = CheckpointPlan.nothing(spec.model.layers)
    mode, work = fake_workload(spec, nothing)
    with mode:
        memory = _track_memory(work)
        runtime = RuntimeEstimator()
        runtime._estimate = roofline.estimate
        runtime._estimate_mode_type = f"roofline ({roofline.source})"
        with runtime:
            backward(forward_loss(work))
            optimizer_step(work)
        operators = SACEstimator()
        operators._estimate_runtime = roofline.estimate
        with operators:
            loss = forward_loss(work)
        backward(loss)
        info = aggregate_stats(work.model, memory, runtime, operators, torch.device("cpu"))
    graph = parse_module_info(info)
    root = type(work.model).__name__
    layer_names = [f"{root}.layers.{index}" for index in range(spec.model.layers)]
    baseline, _ = get_peak_memory_runtime_baseline(graph)
    memexp_none = predict(spec, nothing, spec.imagined_device, counts=False).memory
    return SacProfile(
        graph=graph,
        operator_stats={name: operators.sac_mod_stats[name] for name in layer_names},
        layer_names=layer_names,
        ilp_baseline_peak_bytes=int(baseline),
        memexp_baseline_peak_bytes=memexp_none.peak_in(scope),
        roofline=roofline,
    )


@dataclass(frozen=True)
class SacDecision:
    """sac_milp's answer as a plan, with what it predicted."""

    plan: CheckpointPlan
    discard_ratios: dict[int, float]  # layer → fraction of its activation memory discarded
    ilp_budget_bytes: int
    ilp_peak_bytes: int  # its own predicted peak (an upper bound, in its memory model)
    recompute_ms: float  # its objective: estimated recompute time

    def predicted_peak_bytes(self, correction_bytes: int) -> int:
        return self.ilp_peak_bytes + correction_bytes


def decide(profile: SacProfile, budget_bytes: int) -> SacDecision | None:
    """sac_milp within `budget_bytes` less the correction; None when it finds no solution."""
    from torch.distributed._tools.sac_ilp import (
        get_optimal_checkpointing_policy_per_module,
        sac_milp,
    )

    ilp_budget = budget_bytes - profile.correction_bytes
    ratios, recompute_ms, ilp_peak = sac_milp(
        profile.graph, ilp_budget / GIB, world_size=1, ac_units=profile.layer_names
    )
    if ilp_peak < 0:
        return None
    discard: dict[int, float] = {}
    saved_ops = []
    for index, name in enumerate(profile.layer_names):
        if name not in ratios:
            continue
        discard[index] = float(ratios[name])
        stats = profile.operator_stats[name]
        keep = get_optimal_checkpointing_policy_per_module(stats, 1.0 - ratios[name])
        saved_ops.append((index, saved_operator_names(stats, keep)))
    layers = len(profile.layer_names)
    plan = CheckpointPlan(
        layers,
        segments=tuple((index, index + 1) for index in discard),
        saved_ops=tuple(saved_ops),
    )
    return SacDecision(
        plan=plan,
        discard_ratios=discard,
        ilp_budget_bytes=ilp_budget,
        ilp_peak_bytes=int(ilp_peak),
        recompute_ms=float(recompute_ms),
    )


def correction_parts(spec: ExperimentSpec) -> dict[str, int]:
    """Bytes sac_milp's memory model has no term for, from memexp's closed forms."""
    return {
        "optimizer_state_bytes": analytic.optimizer_state_bytes(spec),
        "batch_bytes": analytic.batch_bytes(spec),
    }
