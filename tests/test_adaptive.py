"""The adaptive planner: exact predictions, an exact solver, and budgets that hold when measured.

The model is the tiny one made activation-heavy (3 layers, sequence 64, vocabulary 64), so that
plans change the step's peak instead of the optimizer step setting it.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from omegaconf import DictConfig

from memexp import planner
from memexp.config import ExperimentSpec
from memexp.configure import validate
from memexp.estimate import predict as fake_predict
from memexp.measure.flops import step_roofline_ps
from memexp.measure.memory import MemoryMeasurement, measure_memory
from memexp.measure.saved import counting_saved_bytes
from memexp.plan import CheckpointPlan, CompiledForward
from memexp.planner import OPTIONS, StepProfile, cheapest_within, leanest, predict, profile_step
from memexp.results import (
    PEAK_FIELDS,
    SCOPE_FORWARD_BACKWARD,
    STATUS_INFEASIBLE,
    STATUS_OK,
    InfeasibleError,
    RunResult,
    read_result,
)
from memexp.runner import run_job
from memexp.strategies import adaptive, make_plan
from memexp.training import build_workload, forward_loss, train_step

SpecFn = Callable[..., ExperimentSpec]
HEAVY = ("model.layers=3", "seq.len=64", "model.vocab_size=64")
VARIANTS = {"fp32": (), "bf16_sdpa": ("precision=bf16", "model.attention=sdpa")}
MIB = 2**20
OPTION_OF = {planner.option_name(option): option for option in OPTIONS}


@pytest.fixture(scope="module")
def specs(tiny_spec: SpecFn) -> dict[str, ExperimentSpec]:
    return {name: tiny_spec(*HEAVY, *extra) for name, extra in VARIANTS.items()}


class VariantProfiles(dict[str, StepProfile]):
    """Each variant's profile, made when a test first asks for it: the quick tests read fp32's
    only, and profiling one takes seconds."""

    def __init__(self, specs: dict[str, ExperimentSpec]) -> None:
        super().__init__()
        self.specs = specs

    def __missing__(self, variant: str) -> StepProfile:
        self[variant] = profile_step(self.specs[variant])
        return self[variant]


@pytest.fixture(scope="module")
def profiles(specs: dict[str, ExperimentSpec]) -> dict[str, StepProfile]:
    return VariantProfiles(specs)


def measured_memory(spec: ExperimentSpec, plan: CheckpointPlan) -> MemoryMeasurement:
    """The step's memory as a CPU job measures it: after a warm-up step, under the tracker."""
    work = build_workload(spec, plan, "cpu")
    train_step(work)
    return measure_memory(work)


def measured_peak(spec: ExperimentSpec, plan: CheckpointPlan) -> int:
    return measured_memory(spec, plan).peak_bytes


def some_plans(layers: int) -> list[tuple[planner.LayerOption, ...]]:
    uniform = [(option,) * layers for option in OPTIONS]
    rng = random.Random(0)
    mixed = [tuple(rng.choice(OPTIONS) for _ in range(layers)) for _ in range(3)]
    return uniform + mixed


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_predicted_peak_is_the_measured_peak_to_the_byte(
    variant: str, specs: dict[str, ExperimentSpec], profiles: dict[str, StepProfile]
) -> None:
    """Both scopes: the whole step's peak and the forward+backward one."""
    spec, profile = specs[variant], profiles[variant]
    peaks, forward_backward_peaks = {}, {}
    for choices in some_plans(spec.model.layers):
        memory = measured_memory(spec, planner.plan_of(choices))
        peaks[choices] = memory.peak_bytes
        forward_backward_peaks[choices] = memory.forward_backward_peak_bytes
        prediction = predict(profile, choices)
        assert prediction.peak_bytes == peaks[choices], choices
        assert prediction.forward_backward_peak_bytes == memory.forward_backward_peak_bytes
    assert len(set(peaks.values())) > 3  # the plans really differ in peak
    assert len(set(forward_backward_peaks.values())) > 3


# Measured peaks of the plans the solver chose, shared by the ladders of both scopes.
_MEASURED: dict[tuple[str, tuple[planner.LayerOption, ...]], MemoryMeasurement] = {}


@pytest.mark.slow
@pytest.mark.parametrize("scope", sorted(PEAK_FIELDS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_solver_matches_exhaustive_search_on_a_ladder_of_budgets(
    variant: str, scope: str, specs: dict[str, ExperimentSpec], profiles: dict[str, StepProfile]
) -> None:
    """Over all 17 options per layer (4,913 plans on 3 layers), at every budget between two
    plans' peaks: the solver's cost is the least of the plans that fit, its peak is the
    predicted one, and the plans it chooses measure on the CPU as predicted, to the byte."""
    profile = profiles[variant]
    every_plan = [
        predict(profile, choices) for choices in itertools.product(OPTIONS, repeat=profile.layers)
    ]
    peaks = sorted({p.peak_in(scope) for p in every_plan})
    ladder = [peaks[0] - 1, *peaks, *(p - 1 for p in peaks[1:])]
    chosen = set()
    for budget in ladder:
        fitting = [p.recompute_ps for p in every_plan if p.peak_in(scope) <= budget]
        solution = cheapest_within(profile, budget, scope)
        if not fitting:
            assert solution is None
            continue
        assert solution is not None
        assert solution.recompute_ps == min(fitting)
        prediction = predict(profile, solution.choices)
        assert prediction.peak_in(scope) == solution.peak_bytes <= budget
        assert prediction.recompute_flops == solution.recompute_flops
        chosen.add(solution.choices)
    assert leanest(profile, scope).peak_bytes == peaks[0]
    assert any(o[0].endswith("@" + planner.ELEMENTWISE) for c in chosen for o in c if o)
    for choices in chosen:
        key = (variant, choices)
        if key not in _MEASURED:
            _MEASURED[key] = measured_memory(specs[variant], planner.plan_of(choices))
        assert _MEASURED[key].peak_in(scope) == predict(profile, choices).peak_in(scope), choices


def test_the_forward_backward_peak_leaves_out_only_the_optimizer_step(
    profiles: dict[str, StepProfile],
) -> None:
    profile = profiles["fp32"]
    prediction = predict(profile, ((),) * profile.layers)
    without = dict(prediction.points)
    optimizer = without.pop(planner.OPTIMIZER_POINT)
    assert optimizer == profile.optimizer_peak_bytes
    assert prediction.forward_backward_peak_bytes == max(without.values())
    assert prediction.peak_bytes == max(optimizer, max(without.values()))
    assert profile.fixed_peaks(SCOPE_FORWARD_BACKWARD).keys() == {
        "embedding forward",
        "embedding backward",
    }


@pytest.mark.slow
def test_measured_peaks_fit_feasible_budgets_and_fall_as_they_tighten(
    specs: dict[str, ExperimentSpec], profiles: dict[str, StepProfile]
) -> None:
    spec, profile = specs["fp32"], profiles["fp32"]
    lowest = leanest(profile).peak_bytes
    highest = predict(profile, ((),) * profile.layers).peak_bytes
    budgets = [highest - (highest - lowest) * step // 5 for step in range(6)]
    peaks, costs = [], []
    for budget in budgets:  # loosest first
        solution = cheapest_within(profile, budget)
        assert solution is not None
        peaks.append(measured_peak(spec, solution.plan))
        costs.append(solution.recompute_ps)
        assert peaks[-1] <= budget
    assert peaks == sorted(peaks, reverse=True)
    assert costs == sorted(costs)
    assert len(set(peaks)) > 2


def test_adaptive_plan_computes_what_none_computes(
    specs: dict[str, ExperimentSpec], profiles: dict[str, StepProfile]
) -> None:
    spec, profile = specs["fp32"], profiles["fp32"]
    budget = (leanest(profile).peak_bytes + predict(profile, ((),) * 3).peak_bytes) // 2
    plan = cheapest_within(profile, budget).plan
    assert plan.recomputes_anything

    def step(plan: CheckpointPlan) -> list[torch.Tensor]:
        work = build_workload(spec, plan, "cpu")
        loss = forward_loss(work)
        loss.backward()
        return [loss.detach(), *(p.grad for p in work.model.parameters())]

    assert all(map(torch.equal, step(plan), step(CheckpointPlan.nothing(3))))


@pytest.mark.slow
@pytest.mark.parametrize("scope", sorted(PEAK_FIELDS))
def test_at_ops_measured_peak_adaptive_recomputes_no_more_time_than_op(
    scope: str,
    tiny_spec: SpecFn,
    specs: dict[str, ExperimentSpec],
    profiles: dict[str, StepProfile],
) -> None:
    """`op` is one of adaptive's plans (every layer recomputed element-wise): predicted to the
    byte as op's own plan measures. With op's measured peak as the budget, adaptive's plan
    costs no more predicted recompute time than op's, and measures within that budget."""
    spec, profile = specs["fp32"], profiles["fp32"]
    op_plan = make_plan(tiny_spec(*HEAVY, "strategy=op"))
    elementwise_layer = (planner.unit_token(planner.LAYER, planner.ELEMENTWISE),)
    as_adaptive = (elementwise_layer,) * profile.layers
    assert planner.options_of(op_plan) == as_adaptive
    op_peak = measured_memory(spec, op_plan).peak_in(scope)
    op_prediction = predict(profile, as_adaptive)
    assert op_prediction.peak_in(scope) == op_peak
    assert measured_memory(spec, planner.plan_of(as_adaptive)).peak_in(scope) == op_peak
    assert op_prediction.recompute_flops == 0 < op_prediction.recompute_ps

    solution = cheapest_within(profile, op_peak, scope)
    assert solution is not None
    assert solution.recompute_ps <= op_prediction.recompute_ps
    assert predict(profile, solution.choices).peak_in(scope) == solution.peak_bytes <= op_peak
    assert measured_memory(spec, solution.plan).peak_in(scope) == solution.peak_bytes


def test_options_of_inverts_plan_of_for_every_option_and_storage_kind() -> None:
    """Every option, stored each way (the whole layer, or one unit it keeps), laid out one per
    layer, comes back as it went in; so do the uniform plans of each option (the fixed
    strategies' shape)."""
    choices = planner.layer_options(("bf16", "fp8", "int8", "host", "disk"))
    assert len(choices) == 17 + 5 * (15 + 3 + 9 + 5)
    assert planner.options_of(planner.plan_of(choices)) == choices
    for option in choices:
        assert planner.options_of(planner.plan_of((option,) * 3)) == (option,) * 3


def test_options_of_reads_one_layer_checkpoints_and_refuses_what_no_option_expresses() -> None:
    """A one-layer checkpoint keeping no operator output is the whole layer (one keeping a
    chosen list is `layer@keep:…`: tests/test_operator_choices.py); a multi-layer segment, a
    compiled forward and plan-wide storage have no layer option, and the error names why."""
    keeps_nothing = CheckpointPlan(3, segments=((1, 2),), saved_ops=((1, ()),))
    assert planner.options_of(keeps_nothing) == ((), (planner.LAYER,), ())
    refused = {
        "layers 0-1 are recomputed as one checkpoint": CheckpointPlan(3, segments=((0, 2),)),
        "a compiled forward's recomputation is its partitioner's, not per layer": CheckpointPlan(
            3, compiled=CompiledForward("inductor", 0.5)
        ),
        "storage 'int8' is set for the whole plan, not per layer": CheckpointPlan(
            3, storage="int8"
        ),
    }
    for reason, plan in refused.items():
        with pytest.raises(ValueError, match=re.escape(reason)):
            planner.options_of(plan)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_plans_step_roofline_less_nones_is_its_predicted_recompute_time(
    variant: str,
    tiny_spec: SpecFn,
    specs: dict[str, ExperimentSpec],
    profiles: dict[str, StepProfile],
) -> None:
    """Pricing a whole step on the roofline gives each plan of layer options, `op`'s among
    them, exactly the recompute time the profile predicts: one cost model, so a plan no option
    expresses (sac_milp's) is priced on the same terms as adaptive's."""
    spec, profile = specs[variant], profiles[variant]
    nothing = step_roofline_ps(spec, CheckpointPlan.nothing(3))
    pick = random.Random(7)
    plans = [make_plan(tiny_spec(*HEAVY, *VARIANTS[variant], "strategy=op"))]
    plans += [planner.plan_of(pick.choices(OPTIONS, k=3)) for _ in range(3)]
    for plan in plans:
        predicted = predict(profile, planner.options_of(plan)).recompute_ps
        assert step_roofline_ps(spec, plan) - nothing == predicted > 0


def test_budget_ratio_adds_a_share_of_nones_saved_activations_to_static_memory(
    specs: dict[str, ExperimentSpec], profiles: dict[str, StepProfile]
) -> None:
    spec, profile = specs["fp32"], profiles["fp32"]
    work = build_workload(spec, CheckpointPlan.nothing(3), "cpu")
    with counting_saved_bytes(work.model) as saved_so_far:
        forward_loss(work, in_place=True)
        none_saved = saved_so_far()
    assert profile.saved_activation_bytes() == none_saved
    train_step(work)
    resting = measure_memory(work).phase_bytes["after_setup"]
    gradients = sum(p.numel() * p.element_size() for p in work.model.parameters())
    assert profile.static_bytes == resting + gradients
    for ratio in (0.25, 0.5):
        cfg = adaptive.AdaptiveConfig(budget_ratio=ratio)
        budget = adaptive.budget_for(cfg, profile)
        assert budget.bytes == resting + gradients + round(ratio * none_saved)
    mib = adaptive.budget_for(adaptive.AdaptiveConfig(budget_mb=1.5), profile)
    assert mib.bytes == 1.5 * MIB


def test_a_budget_below_every_plan_is_infeasible_with_the_smallest_peak(
    specs: dict[str, ExperimentSpec], profiles: dict[str, StepProfile], monkeypatch
) -> None:
    profile = profiles["fp32"]
    monkeypatch.setattr(planner, "profile_step", lambda spec, *options: profile)
    for scope, words in adaptive.SCOPE_WORDS.items():
        lowest = leanest(profile, scope).peak_bytes
        cfg = adaptive.AdaptiveConfig(budget_mb=(lowest - 1) / MIB, budget_scope=scope)
        with pytest.raises(
            InfeasibleError,
            match=re.escape(f"smallest achievable {words} peak is {lowest / MIB:.1f} MiB"),
        ):
            adaptive.BudgetPlanner(cfg, specs["fp32"]).decide()
        cfg = adaptive.AdaptiveConfig(budget_mb=lowest / MIB, budget_scope=scope)
        decision = adaptive.BudgetPlanner(cfg, specs["fp32"]).decide()
        assert decision.prediction.peak_in(scope) == lowest


@pytest.mark.parametrize("scope", sorted(PEAK_FIELDS))
def test_with_no_budget_given_it_is_midway_between_none_and_the_leanest_plan(
    scope: str, profiles: dict[str, StepProfile]
) -> None:
    profile = profiles["fp32"]
    nothing = predict(profile, ((),) * profile.layers).peak_in(scope)
    lowest = leanest(profile, scope).peak_bytes
    budget = adaptive.budget_for(adaptive.AdaptiveConfig(budget_scope=scope), profile)
    assert budget.bytes == (nothing + lowest) // 2
    assert lowest < budget.bytes < nothing
    assert adaptive.AdaptiveConfig().budget_scope == SCOPE_FORWARD_BACKWARD
    job_budget = adaptive.budget_for(adaptive.AdaptiveConfig(), profile, job_budget=123 * MIB)
    assert job_budget.bytes == 123 * MIB  # batch=auto: the batch's budget


# --- the job ---------------------------------------------------------------------------------


def middle_budget_mb(profile: StepProfile, scope: str = SCOPE_FORWARD_BACKWARD) -> float:
    """A budget halfway between the leanest plan's peak and `none`'s: a real plan is needed."""
    none_peak = predict(profile, ((),) * profile.layers).peak_in(scope)
    return (leanest(profile, scope).peak_bytes + none_peak) / 2 / MIB


def run_adaptive(tiny_cfg: Callable[..., DictConfig], job_dir: Path, *overrides: str) -> RunResult:
    cfg = tiny_cfg(
        *HEAVY, "strategy=adaptive", "measure.repeat=1", "strategy.cost_source=roofline", *overrides
    )
    run_job(cfg, job_dir, {})
    return read_result(job_dir)


@pytest.mark.slow
@pytest.mark.parametrize("scope", sorted(PEAK_FIELDS))
def test_adaptive_job_records_budget_prediction_and_measurement(
    scope: str,
    tiny_cfg: Callable[..., DictConfig],
    profiles: dict[str, StepProfile],
    tmp_path: Path,
) -> None:
    """The budget holds the peak of its scope; the record says which, and both peaks are
    predicted to the byte."""
    budget_mb = middle_budget_mb(profiles["fp32"], scope)
    record = run_adaptive(
        tiny_cfg, tmp_path, f"strategy.budget_mb={budget_mb}", f"strategy.budget_scope={scope}"
    )
    assert record.status == STATUS_OK, record.message
    adaptive_record = record.extra["adaptive"]
    peak = getattr(record, PEAK_FIELDS[scope])
    assert adaptive_record["budget_scope"] == scope
    assert adaptive_record["budget_bytes"] == round(budget_mb * MIB)
    assert adaptive_record["predicted_peak_bytes"] == peak <= round(budget_mb * MIB)
    assert adaptive_record["measured_peak_bytes"] == peak
    prediction = predict(
        profiles["fp32"], tuple(OPTION_OF[n] for n in adaptive_record["plan_layers"])
    )
    assert prediction.peak_bytes == record.peak_bytes
    assert prediction.forward_backward_peak_bytes == record.forward_backward_peak_bytes
    assert adaptive_record["predicted_recompute_flops"] == record.flops_recompute
    assert adaptive_record["predicted_recompute_ms"] > 0
    assert adaptive_record["cost_source"].startswith("roofline")
    assert len(adaptive_record["rounds"]) == 1
    assert adaptive_record["planning_s"] > 0
    assert record.plan.recomputes_anything
    assert set(adaptive_record["units"]) == {"attention_core", "attention", "ffn", "layer"}


@pytest.mark.slow
def test_infeasible_job_is_recorded_with_the_smallest_achievable_peak(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    record = run_adaptive(tiny_cfg, tmp_path, "strategy.budget_mb=0.5")
    assert record.status == STATUS_INFEASIBLE
    assert "smallest achievable forward+backward peak is" in record.message
    assert record.extra["adaptive"]["budget_bytes"] == MIB // 2
    assert record.peak_bytes is None


@pytest.mark.slow
def test_a_plan_measured_over_budget_is_tightened_and_planned_again(
    tiny_cfg: Callable[..., DictConfig],
    profiles: dict[str, StepProfile],
    tmp_path: Path,
    monkeypatch,
) -> None:
    """A profile that under-predicts every plan (as a GPU's allocator may) is caught by the
    measurement: the next plan is made for the budget less the overshoot, until it fits."""
    profile = profiles["fp32"]
    optimistic = replace(
        profile,
        embedding_net_bytes=profile.embedding_net_bytes
        - profile.options[()].kept_bytes * profile.layers // 3,
    )
    monkeypatch.setattr(planner, "profile_step", lambda spec, *options: optimistic)
    budget_mb = middle_budget_mb(profile)
    record = run_adaptive(tiny_cfg, tmp_path, f"strategy.budget_mb={budget_mb}")
    rounds = record.extra["adaptive"]["rounds"]
    assert record.status == STATUS_OK, record.message
    assert rounds[0]["measured_peak_bytes"] > round(budget_mb * MIB)
    assert len(rounds) >= 2
    assert (
        rounds[-1]["measured_peak_bytes"]
        == record.forward_backward_peak_bytes
        <= round(budget_mb * MIB)
    )
    assert [r["planning_budget_bytes"] for r in rounds] == sorted(
        (r["planning_budget_bytes"] for r in rounds), reverse=True
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["small", "medium"])
def test_default_budget_puts_adaptive_between_none_and_full_on_the_seed_presets(
    preset: str, tiny_spec: SpecFn
) -> None:
    """On the seed presets (fake tensors, the default settings), `adaptive` with no budget given
    recomputes something, and its forward+backward peak lies strictly between `none`'s and
    `full`'s, as predicted on fake tensors and by the peak model."""
    spec = tiny_spec(f"model={preset}", "device=fake")  # the preset's own seq and batch
    budget_planner = adaptive.BudgetPlanner(adaptive.AdaptiveConfig(), spec)
    decision = budget_planner.decide()
    assert decision.plan.recomputes_anything
    layers = spec.model.layers
    peaks = {
        name: fake_predict(spec, plan, spec.imagined_device, counts=False).memory
        for name, plan in (
            ("none", CheckpointPlan.nothing(layers)),
            ("full", planner.plan_of(((planner.LAYER,),) * layers)),
            ("adaptive", decision.plan),
        )
    }
    fwd_bwd = {name: memory.forward_backward_peak_bytes for name, memory in peaks.items()}
    assert fwd_bwd["none"] > fwd_bwd["adaptive"] > fwd_bwd["full"]
    assert fwd_bwd["adaptive"] == decision.prediction.forward_backward_peak_bytes
    assert fwd_bwd["adaptive"] <= budget_planner.budget.bytes


@pytest.mark.parametrize(
    "device, expected", [("cpu", "roofline"), ("fake", "roofline"), ("cuda", "measured")]
)
def test_auto_cost_is_measured_only_on_a_gpu(device: str, expected: str) -> None:
    """On a CPU the difference of two step times is noisier than the differences between
    options; on the fake device nothing runs: both price options by the roofline."""
    on_cpu = validate(tiny_config("strategy=adaptive"), cuda_available=False)
    spec = replace(on_cpu, device=device)  # validating `cuda` would ask the GPU its memory
    assert adaptive.cost_source(spec.strategy, spec) == expected
    pinned = replace(spec.strategy, cost_source="measured")
    assert adaptive.cost_source(pinned, spec) == "measured"
