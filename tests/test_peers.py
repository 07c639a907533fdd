"""The planners compared with adaptive: PyTorch's sac_milp and torch.compile's memory budget.

The model is adaptive's test model (tiny made activation-heavy: 3 layers, sequence 64,
vocabulary 64), so that budgets between `none` and the leanest plan need real decisions. The
roofline is given (not measured), so sac_milp's decisions do not depend on the machine's load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from memexp import sac_planner
from memexp.config import ConfigError, ExperimentSpec
from memexp.configure import validate
from memexp.devices import Figures
from memexp.estimate import predict
from memexp.measure.flops import Roofline
from memexp.measure.memory import MemoryMeasurement, measure_memory
from memexp.model import OP_POLICIES, UNNUMBERED_OPS
from memexp.plan import CheckpointPlan, CompiledForward
from memexp.results import (
    SOURCE_CUDA_ALLOCATOR,
    SOURCE_TENSOR_TRACKER,
    STATUS_NOT_APPLICABLE,
    STATUS_OK,
    InfeasibleError,
    read_result,
)
from memexp.runner import run_job
from memexp.strategies import compile_budget, sac_milp
from memexp.training import backward, build_workload, forward_loss, train_step

SpecFn = Callable[..., ExperimentSpec]
HEAVY = ("model.layers=3", "seq.len=64", "model.vocab_size=64")
ROOFLINE = ("strategy.roofline_tflops=0.1", "strategy.roofline_gbps=10")
MIB = 2**20
# The tiny layer's matrix products, numbered as a layer's forward runs them (no biases).
LAYER_MATMULS = ("mm#0", "bmm#0", "bmm#1", "mm#1", "mm#2", "mm#3")


def tracked(spec: ExperimentSpec, plan: CheckpointPlan) -> tuple[int, dict[str, torch.Tensor]]:
    """The forward+backward peak a CPU job measures, and the gradients of one step."""
    work = build_workload(spec, plan, "cpu")
    train_step(work)
    peak = measure_memory(work).forward_backward_peak_bytes
    work = build_workload(spec, plan, "cpu")
    backward(forward_loss(work))
    return peak, {name: p.grad for name, p in work.model.named_parameters()}


@pytest.mark.slow
def test_an_explicit_saved_operator_list_runs_as_the_policy_it_spells(tiny_spec: SpecFn) -> None:
    """Listing every matmul of each layer by name and occurrence is `save_matmuls`: the same
    peak to the byte and the same gradients, so the numbering finds the operators it names."""
    spec = tiny_spec(*HEAVY)
    segments = tuple((layer, layer + 1) for layer in range(3))
    by_policy = CheckpointPlan(3, segments=segments, op_policy="save_matmuls")
    by_list = CheckpointPlan(
        3, segments=segments, saved_ops=tuple((layer, LAYER_MATMULS) for layer in range(3))
    )
    nothing_kept = CheckpointPlan(
        3, segments=segments, saved_ops=tuple((layer, ()) for layer in range(3))
    )
    policy_peak, policy_grads = tracked(spec, by_policy)
    list_peak, list_grads = tracked(spec, by_list)
    assert list_peak == policy_peak
    assert tracked(spec, nothing_kept)[0] < list_peak  # keeping nothing is a plain checkpoint
    assert all(torch.equal(list_grads[name], grad) for name, grad in policy_grads.items())


def test_the_numbering_skips_what_pytorchs_estimator_skips() -> None:
    from torch.distributed._tools.sac_estimator import OPS_TO_ALWAYS_SKIP
    from torch.utils.checkpoint import SAC_IGNORED_OPS

    assert UNNUMBERED_OPS == OPS_TO_ALWAYS_SKIP - SAC_IGNORED_OPS
    assert set(OP_POLICIES["save_matmuls"]).isdisjoint(UNNUMBERED_OPS)


def test_saved_operator_lists_and_compiled_forwards_are_plan_data() -> None:
    plan = CheckpointPlan(
        3,
        segments=((0, 1), (2, 3)),
        saved_ops=((2, ("mm#0", "add#1")),),
        compiled=CompiledForward("aot_eager_decomp_partition", 0.25),
    )
    assert CheckpointPlan.from_dict(plan.to_dict()) == plan
    assert plan.saved_ops_of(2) == ("mm#0", "add#1") and plan.saved_ops_of(0) is None
    assert plan.uses_op_policy
    assert "2 operator output(s) kept" in plan.describe()
    assert "activation_memory_budget 0.250" in plan.describe()
    with pytest.raises(ValueError, match="layer 1, where no segment starts"):
        CheckpointPlan(3, segments=((0, 1),), saved_ops=((1, ("mm#0",)),))
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        CompiledForward("aot_eager_decomp_partition", 1.5)


def test_the_roofline_rates_come_together(tiny_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.roofline_tflops"):
        validate(tiny_cfg("strategy=sac_milp", "strategy.roofline_tflops=1"))
    with pytest.raises(ConfigError, match=r"strategy\.budget_mb"):
        validate(tiny_cfg("strategy=sac_milp", "strategy.budget_mb=-1"))


def test_the_roofline_charges_matmuls_by_flops_and_element_wise_ops_by_bytes() -> None:
    roofline = Roofline(tflops=1.0, gbps=1.0, source="given")
    a, b = torch.ones(64, 32), torch.ones(32, 16)
    _, matmul_ms = roofline.estimate(torch.ops.aten.mm.default, (a, b), {})
    _, add_ms = roofline.estimate(torch.ops.aten.add.Tensor, (a, a), {})
    moved = (64 * 32 + 32 * 16 + 64 * 16) * 4
    assert matmul_ms == pytest.approx(max(2 * 64 * 32 * 16 / 1e12, moved / 1e9) * 1e3)
    assert add_ms == pytest.approx(3 * 64 * 32 * 4 / 1e9 * 1e3)


def sac_spec(tiny_spec: SpecFn, *overrides: str) -> ExperimentSpec:
    return tiny_spec(*HEAVY, "strategy=sac_milp", *ROOFLINE, *overrides)


def none_peak(spec: ExperimentSpec) -> int:
    plan = CheckpointPlan.nothing(spec.model.layers)
    return predict(spec, plan, "cpu", counts=False).memory.forward_backward_peak_bytes


@pytest.mark.slow
def test_sac_milp_plans_within_its_corrected_budget(tiny_spec: SpecFn) -> None:
    """At every budget of a ladder below `none`, its predicted peak (its own, plus the
    correction) is within the budget, and so is memexp's exact prediction of the plan; the
    correction is the difference of the two models' peaks of `none`."""
    spec = sac_spec(tiny_spec)
    roofline = Roofline(0.1, 10.0, sac_planner.ROOFLINE_GIVEN)
    profile = sac_planner.profile(spec, "forward_backward", roofline)
    nothing = none_peak(spec)
    assert profile.memexp_baseline_peak_bytes == nothing
    assert profile.correction_bytes == nothing - profile.ilp_baseline_peak_bytes > 0
    recomputed = []
    for fraction in (0.97, 0.9, 0.8):
        budget = round(nothing * fraction)
        decision = sac_planner.decide(profile, budget)
        assert decision is not None
        assert decision.ilp_budget_bytes == budget - profile.correction_bytes
        assert decision.predicted_peak_bytes(profile.correction_bytes) <= budget
        predicted = predict(spec, decision.plan, "cpu", counts=False).memory
        assert predicted.forward_backward_peak_bytes <= budget
        assert decision.plan.saved_ops and set(decision.discard_ratios) == {
            start for start, _ in decision.plan.saved_ops
        }
        recomputed.append(sum(decision.discard_ratios.values()))
    assert recomputed == sorted(recomputed)  # tighter budgets discard more
    assert sac_planner.decide(profile, profile.correction_bytes) is None


@pytest.mark.slow
def test_sac_milp_job_records_budget_plan_and_measured_peak(
    tiny_cfg: Callable[..., DictConfig], tiny_spec: SpecFn, tmp_path: Path
) -> None:
    budget = round(none_peak(sac_spec(tiny_spec)) * 0.9)
    cfg = tiny_cfg(
        *HEAVY,
        "strategy=sac_milp",
        *ROOFLINE,
        f"strategy.budget_mb={budget / MIB}",
        "measure.repeat=1",
    )
    run_job(cfg, tmp_path, {})
    record = read_result(tmp_path)
    assert record.status == STATUS_OK, record.message
    sac = record.extra["sac_milp"]
    assert sac["budget_bytes"] == budget
    assert sac["predicted_peak_bytes"] <= budget
    assert sac["measured_peak_bytes"] == record.forward_backward_peak_bytes <= budget
    assert sac["over_budget_bytes"] == 0
    assert sac["correction_bytes"] == sac["memexp_none_peak_bytes"] - sac["ilp_none_peak_bytes"]
    assert sac["roofline_source"] == sac_planner.ROOFLINE_GIVEN
    assert {int(layer) for layer in sac["saved_ops"]} == {s for s, _ in record.plan.saved_ops}
    assert record.flops_recompute == sac["measured_recompute_flops"] > 0
    assert record.saved_activation_bytes is None  # kept in the selective cache: see the note
    assert sac["planning_s"] > 0


@pytest.mark.slow
def test_a_budget_its_model_cannot_meet_is_infeasible(tiny_spec: SpecFn) -> None:
    spec = sac_spec(tiny_spec, "strategy.budget_mb=1")
    with pytest.raises(InfeasibleError, match=r"sac_milp finds no plan within 1\.00 MiB"):
        sac_milp.make_plan(spec.strategy, spec)


# --- compile_budget ---------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_budget_job_records_its_fraction_and_the_compiled_steps_measured_figures(
    tiny_cfg: Callable[..., DictConfig], tiny_spec: SpecFn, tmp_path: Path
) -> None:
    """A budget between `none` and the leanest peaks maps to a fraction in (0, 1), and while
    the compiled step is over it the budget less the overshoot is mapped again. The tensor
    tracker measures the compiled step itself: the budget is judged by the record's own
    forward+backward peak, the compiled forward saves less than `none` (saved-tensor hooks),
    and the step's recompute FLOPs are those of the nodes the partitioner recomputes."""
    budget = round(none_peak(tiny_spec(*HEAVY)) * 0.8)
    cfg = tiny_cfg(
        *HEAVY, "strategy=compile_budget", f"strategy.budget_mb={budget / MIB}", "measure.repeat=1"
    )
    run_job(cfg, tmp_path, {})
    record = read_result(tmp_path)
    compiled = record.extra["compile_budget"]
    assert compiled["budget_bytes"] == budget
    rounds = compiled["rounds"]
    margin = 0
    for measured in rounds:  # each round maps the budget less the overshoot so far
        fitting = budget - margin - (compiled["none_peak_bytes"] - compiled["none_saved_bytes"])
        fraction = min(1.0, max(0.0, fitting / compiled["none_saved_bytes"]))
        assert measured["activation_memory_budget"] == fraction
        margin += measured["peak_bytes"] - budget
    assert 0 < rounds[0]["activation_memory_budget"] < 1
    assert compiled["activation_memory_budget"] == rounds[-1]["activation_memory_budget"]
    assert compiled["peak_bytes"] == rounds[-1]["peak_bytes"]
    assert all(r["peak_bytes"] > budget for r in rounds[:-1])
    assert record.plan.compiled == CompiledForward(
        "aot_eager_decomp_partition", compiled["activation_memory_budget"]
    )
    assert record.saved_activation_bytes == compiled["compiled_saved_bytes"]
    assert compiled["compiled_saved_bytes"] < compiled["none_saved_bytes"]
    assert compiled["peak_measured"] is True
    assert compiled["peak_bytes"] == record.forward_backward_peak_bytes
    assert record.memory_source == SOURCE_TENSOR_TRACKER
    assert record.flops_recompute == compiled["recompute_flops"] > 0
    assert compiled["recompute_roofline_ps"] > 0 and compiled["recomputed_operators"] > 0
    assert compiled["over_budget_bytes"] == max(0, compiled["peak_bytes"] - budget)
    assert record.status == (STATUS_OK if compiled["over_budget_bytes"] == 0 else "infeasible")


def test_compile_budget_measures_at_least_once(tiny_spec: SpecFn) -> None:
    with pytest.raises(ConfigError, match=r"strategy\.max_rounds.*at least 1"):
        tiny_spec("strategy=compile_budget", "strategy.max_rounds=0")


def test_compile_budget_estimates_the_peak_only_where_nothing_watches_the_compiled_step() -> None:
    """Inductor's kernels allocate outside the dispatcher: on the CPU its peak is an estimate,
    while the CUDA allocator measures any backend and the tracker one whose graphs run operator
    by operator."""

    def seen(backend: str, source: str) -> bool:
        memory = MemoryMeasurement(source, 0, {}, {}, [], source)
        figures = Figures(0, 0, memory, 0, 0)
        plan = CheckpointPlan(3, compiled=CompiledForward(backend, 0.5))
        return compile_budget.peak_seen(plan, figures)[0]

    assert seen("aot_eager_decomp_partition", SOURCE_TENSOR_TRACKER)
    assert seen("inductor", SOURCE_CUDA_ALLOCATOR)
    assert not seen("inductor", SOURCE_TENSOR_TRACKER)


@pytest.mark.slow
def test_compile_budget_is_not_applicable_on_the_fake_device(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = tiny_cfg(*HEAVY, "strategy=compile_budget", "device=fake", "strategy.budget_mb=1.5")
    run_job(cfg, tmp_path, {})
    record = read_result(tmp_path)
    assert record.status == STATUS_NOT_APPLICABLE
    assert "TorchDispatchMode" in record.message
    assert record.extra["compile_budget"]["budget_bytes"] == round(1.5 * MIB)
