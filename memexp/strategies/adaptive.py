"""`adaptive`: the plan with the least recompute time whose predicted peak fits a memory budget.

The budget holds the peak over `budget_scope`: `forward_backward` (the default: forward, loss
and backward, where checkpointing acts) or `step` (the whole step, the optimizer step included,
whose scratch no plan changes). It is one of
- `budget_mb`: the peak in MiB (2^20 bytes): what "fit in 16 GiB" means;
- `budget_ratio`: parameters + gradients + optimizer state + batch, plus this fraction of the
  activations the `none` plan saves for backward.
With neither: under `batch=auto` or `batch=dynamic` the job's memory budget (`batch.budget_gb`,
else the device's memory), which the searched batch must fit; otherwise midway between the `none` plan's predicted
peak and the lowest peak any plan reaches, both over the scope, so that `adaptive` is a point
between `none` and the leanest plan rather than either end.

Planning (memexp.planner) profiles the job's layer under each of its options (each unit kept,
recomputed whole or recomputed element-wise; with `operator_choices`, the whole layer
recomputed keeping each set of its operators' outputs worth keeping, memexp.operator_choices;
with `storage` kinds, what the layer saves stored that way) on fake tensors, predicts the
step's peak for any per-layer plan and solves for the plan of least recompute time within the
budget exactly. The time each option adds to the
layer's forward and backward is, by `cost_source`, `measured` (one layer timed per option on
the job's device), `roofline` (each operator's max(FLOPs / device.peak_tflops, bytes moved /
device.memory_gbps), deterministic) or `auto` (measured on a GPU, the roofline on the CPU and
the fake device: see `cost_source`). `execute` then measures the plan's real peak and, if it is over budget (on a
GPU the allocator rounds and the kernels differ from the profiled ones), tightens the planning
budget by the overshoot and plans again, at most `max_rounds` plans.
A budget no plan meets is an answer, status `infeasible`, with the smallest achievable peak.
What it planned, predicted and measured goes to the record as `extra["adaptive"]`.

The planner and the device backends (torch) are imported inside the functions that plan: the
registry imports this module for its schema and checks, and registering the schemas (`memexp
--help`) must not load torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memexp.config import CUDA_DEVICE, FAKE_DEVICE, ConfigError
from memexp.plan import STORAGE_KINDS, UNITS
from memexp.results import PEAK_FIELDS, SCOPE_FORWARD_BACKWARD, SCOPE_STEP, InfeasibleError
from memexp.strategies.base import Measure, Outcome, Strategy
from memexp.text import MIB, format_bytes

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig
    from memexp.plan import CheckpointPlan
    from memexp.planner import PeakPrediction, Solution, StepProfile

SCOPE_WORDS = {SCOPE_STEP: "whole-step", SCOPE_FORWARD_BACKWARD: "forward+backward"}
COST_AUTO = "auto"
COST_SOURCES = (COST_AUTO, "measured", "roofline")  # the last two: memexp.planner's COST_*
# The relative error each lossy storage kind puts on one saved element, as memexp.storage
# documents it: bf16 keeps 8 significant bits (2⁻⁸ of the element); fp8 e4m3 keeps 4 (2⁻⁴,
# within its normal range); int8 rounds to 1/254 of its channel's absmax (so 2⁻⁸ of the
# channel's largest element, more of its small ones). Lossless kinds (host, disk) have none.
# What stands in for a gradient error on the fake device, where no tensor has values.
ERROR_BOUNDS = {"bf16": 2.0**-8, "fp8": 2.0**-4, "int8": 1.0 / 254}
ERROR_MEASURED = (
    "measured: every layer's saved tensors stored that way, one step's gradients against the "
    "same step with nothing stored (‖g − g_ref‖ / ‖g_ref‖)"
)
ERROR_DOCUMENTED = "documented per-element bound (fake tensors hold no values to measure)"


@dataclass
class AdaptiveConfig:
    name: str = "adaptive"
    budget_mb: float | None = None
    budget_ratio: float | None = None
    budget_scope: str = SCOPE_FORWARD_BACKWARD  # step | forward_backward
    max_rounds: int = 3
    # Also offer each layer recomputed whole keeping a chosen set of its operators' outputs
    # (memexp.operator_choices): the sets no other beats on bytes kept and time saved.
    operator_choices: bool = True
    cost_source: str = COST_AUTO  # auto | measured | roofline
    # Storage kinds (memexp.storage) a layer may store what it still saves as, besides keeping
    # it: bf16 | fp8 | int8 (lossy) | host | disk. Empty: recomputation only.
    storage: list[str] = field(default_factory=list)
    # The largest gradient relative error a lossy kind may bring, measured with every layer
    # stored that way (on the fake device: its documented per-element bound, `ERROR_BOUNDS`);
    # kinds above it are not offered. None: no bound.
    max_grad_rel_error: float | None = None


def validate_budget(cfg: Any) -> None:
    """The budget fields every budget-held strategy shares (adaptive, sac_milp, compile_budget):
    `budget_mb`, `budget_ratio`, `budget_scope`."""
    if cfg.budget_mb is not None and cfg.budget_ratio is not None:
        raise ConfigError(
            "strategy.budget_mb",
            cfg.budget_mb,
            f"null while strategy.budget_ratio={cfg.budget_ratio} is set: give one budget",
        )
    if cfg.budget_mb is not None and cfg.budget_mb <= 0:
        raise ConfigError("strategy.budget_mb", cfg.budget_mb, "a positive number of MiB")
    if cfg.budget_ratio is not None and not 0 < cfg.budget_ratio <= 1:
        raise ConfigError("strategy.budget_ratio", cfg.budget_ratio, "a fraction in (0, 1]")
    if cfg.budget_scope not in PEAK_FIELDS:
        raise ConfigError(
            "strategy.budget_scope", cfg.budget_scope, f"one of {', '.join(PEAK_FIELDS)}"
        )


def validate(cfg: AdaptiveConfig, model: ModelConfig) -> None:
    validate_budget(cfg)
    if cfg.max_rounds < 1:
        raise ConfigError("strategy.max_rounds", cfg.max_rounds, "at least 1")
    for kind in cfg.storage:
        if kind not in STORAGE_KINDS or kind == "keep":
            allowed = ", ".join(k for k in STORAGE_KINDS if k != "keep")
            raise ConfigError("strategy.storage", list(cfg.storage), f"kinds among {allowed}")
    if cfg.max_grad_rel_error is not None and cfg.max_grad_rel_error < 0:
        raise ConfigError("strategy.max_grad_rel_error", cfg.max_grad_rel_error, "≥ 0, or null")
    if cfg.cost_source not in COST_SOURCES:
        raise ConfigError(
            "strategy.cost_source", cfg.cost_source, f"one of {', '.join(COST_SOURCES)}"
        )


@dataclass(frozen=True)
class StorageOffer:
    """The storage kinds the planner may choose, and each lossy kind's error against the bound."""

    kinds: tuple[str, ...]
    errors: dict[str, float]  # lossy kind → its gradient relative error (or documented bound)
    basis: str | None  # how `errors` were obtained; None when no bound was given


def offered_storage(cfg: AdaptiveConfig, spec: ExperimentSpec) -> StorageOffer:
    """The storage kinds asked for, less the lossy ones whose error is above
    `max_grad_rel_error`. On a device that runs, a lossy kind's error is measured: the
    gradients of one step with every layer stored that way (the most any plan stores in that
    kind) against the same step with nothing stored. On the fake device, where no tensor has a
    value, its documented per-element bound stands in."""
    bound = cfg.max_grad_rel_error
    lossy = tuple(kind for kind in cfg.storage if kind in ERROR_BOUNDS)
    if bound is None or not lossy:
        return StorageOffer(tuple(cfg.storage), {}, None)
    if spec.device == FAKE_DEVICE:
        errors, basis = {kind: ERROR_BOUNDS[kind] for kind in lossy}, ERROR_DOCUMENTED
    else:
        from memexp.measure.fidelity import errors_stored_everywhere

        measured = errors_stored_everywhere(spec, lossy)
        errors = {kind: error.relative_error for kind, error in measured.items()}
        basis = ERROR_MEASURED
    kinds = tuple(kind for kind in cfg.storage if errors.get(kind, 0.0) <= bound)
    return StorageOffer(kinds, errors, basis)


def cost_source(cfg: AdaptiveConfig, spec: ExperimentSpec) -> str:
    """`auto`: measured on a GPU, the roofline elsewhere. On the fake device nothing runs; on a
    CPU an option's cost is a difference of two step times that the host's other work moves by
    more than most differences (on a 2-core machine under load 1-2, nearly every option's
    difference is inside the spread of its repeats)."""
    if cfg.cost_source != COST_AUTO:
        return cfg.cost_source
    return "measured" if spec.device == CUDA_DEVICE else "roofline"


@dataclass(frozen=True)
class Budget:
    bytes: int
    rule: str  # how it was set, in words, with its figures


def budget_for(cfg: Any, profile: StepProfile, job_budget: int | None = None) -> Budget:
    """An explicit budget wins; then the job's own (`job_budget`, given under batch=auto or
    batch=dynamic);
    then midway between `none` and the leanest plan, over the budget's scope."""
    from memexp.planner import leanest, predict

    scope = SCOPE_WORDS[cfg.budget_scope]
    if cfg.budget_mb is not None:
        return Budget(round(cfg.budget_mb * MIB), f"budget_mb={cfg.budget_mb:g} MiB, {scope} peak")
    if cfg.budget_ratio is not None:
        activations = profile.saved_activation_bytes()
        return Budget(
            profile.static_bytes + round(cfg.budget_ratio * activations),
            f"budget_ratio={cfg.budget_ratio:g}, {scope} peak: parameters, gradients, optimizer "
            f"state and batch {profile.static_bytes / MIB:.1f} MiB + {cfg.budget_ratio:g} × "
            f"{activations / MIB:.1f} MiB saved for backward by `none`",
        )
    if job_budget is not None:
        return Budget(
            job_budget, f"the job's memory budget, {job_budget / MIB:.1f} MiB, {scope} peak"
        )
    nothing = predict(profile, ((),) * profile.layers).peak_in(cfg.budget_scope)
    lowest = leanest(profile, cfg.budget_scope).peak_bytes
    return Budget(
        (nothing + lowest) // 2,
        f"midway between the {scope} peaks of `none`, {nothing / MIB:.1f} MiB, and of the "
        f"leanest plan, {lowest / MIB:.1f} MiB (predicted)",
    )


def peer_budget(cfg: Any, spec: ExperimentSpec) -> tuple[Budget, StepProfile]:
    """The budget a peer planner (sac_milp, compile_budget) is held to: set from the same fields
    as adaptive's, by `budget_for`, from the recomputation-only profile it returns too."""
    from memexp.planner import profile_step

    profile = profile_step(spec)
    job_budget = spec.memory_budget_bytes if spec.auto_batch else None
    return budget_for(cfg, profile, job_budget), profile


@dataclass(frozen=True)
class Decision:
    solution: Solution
    prediction: PeakPrediction
    planning_budget_bytes: int

    @property
    def plan(self) -> CheckpointPlan:
        return self.solution.plan


class BudgetPlanner:
    """One job's profile and budget; plans for the budget, or for it less a margin."""

    def __init__(self, cfg: AdaptiveConfig, spec: ExperimentSpec) -> None:
        from memexp.planner import COST_MEASURED, profile_step, with_measured_costs

        self.storage = offered_storage(cfg, spec)
        self.storage_kinds = self.storage.kinds
        self.profile = profile_step(spec, self.storage_kinds, cfg.operator_choices)
        if cost_source(cfg, spec) == COST_MEASURED:
            self.profile = with_measured_costs(self.profile, spec)
        self.scope = cfg.budget_scope
        job_budget = spec.memory_budget_bytes if spec.searches_batch else None
        self.budget = budget_for(cfg, self.profile, job_budget)

    def decide(self, margin_bytes: int = 0) -> Decision:
        """The cheapest plan predicted within the budget less `margin_bytes` (measured
        overshoots of earlier plans); InfeasibleError, with the smallest peak, if none is."""
        from memexp.planner import cheapest_within, predict

        planning = self.budget.bytes - margin_bytes
        solution = cheapest_within(self.profile, planning, self.scope)
        if solution is None:
            raise InfeasibleError(self._infeasible_message(margin_bytes))
        return Decision(solution, predict(self.profile, solution.choices), planning)

    def _infeasible_message(self, margin_bytes: int) -> str:
        from memexp.planner import leanest, predict

        lean = leanest(self.profile, self.scope)
        lowest = predict(self.profile, lean.choices)
        tightened = (
            f", tightened by {margin_bytes / MIB:.1f} MiB that measured peaks exceeded predictions"
            if margin_bytes
            else ""
        )
        return (
            f"no plan fits the budget of {self.budget.bytes / MIB:.1f} MiB "
            f"({self.budget.rule}{tightened}): the smallest achievable {SCOPE_WORDS[self.scope]} "
            f"peak is {lowest.peak_in(self.scope) / MIB:.1f} MiB (predicted, set by the "
            f"{lowest.where_in(self.scope)}; "
            f"plan: {lean.plan.describe()})"
        )

    def record(self, unit_ms: dict[str, float]) -> dict[str, Any]:
        """The budget and what each unit saves and costs, for `result.extra["adaptive"]`.

        Per unit (recomputed whole): the bytes a layer holds into its backward that
        recomputing the unit drops, the extra bytes its recomputation adds at its backward's
        highest point, the FLOPs it recomputes (matmuls only, as FlopCounterMode counts), the
        time it adds to the layer (the solver's cost, from `cost_source`) and one timed
        forward. Per layer option: its recompute time, the cost the solver weighs.
        """
        from memexp.planner import PROFILE_SOURCE, keeps_chosen_outputs, option_name

        options = self.profile.options
        nothing = options[()]
        units = {}
        for unit in UNITS:
            stats = options[(unit,)]
            units[unit] = {
                "held_bytes_dropped": nothing.held_bytes - stats.held_bytes,
                "backward_peak_extra_bytes": stats.backward_peak_bytes
                - nothing.backward_peak_bytes,
                "recompute_flops": stats.recompute_flops,
                "recompute_ms": stats.recompute_ps / 1e9,
                "forward_ms": unit_ms.get(unit),
            }
        return {
            "budget_bytes": self.budget.bytes,
            "budget_rule": self.budget.rule,
            "budget_scope": self.scope,
            "profile_source": PROFILE_SOURCE,
            "layer_forward_flops": self.profile.layer_forward_flops,
            "units": units,
            "cost_source": self.profile.cost_source,
            "storage_offered": list(self.storage_kinds),
            "storage_errors": self.storage.errors,
            "storage_error_basis": self.storage.basis,
            "operator_choices_offered": sum(map(keeps_chosen_outputs, options)),
            "option_recompute_ms": {
                option_name(option): stats.recompute_ps / 1e9 for option, stats in options.items()
            },
            "unit_time_source": "perf_counter, one forward each after a warm-up"
            if unit_ms
            else None,
        }


def describe_choices(solution: Solution) -> list[str]:
    """One entry per layer: what it recomputes (`nothing`, `attention_core+ffn`, `layer`, …)."""
    from memexp.planner import option_name

    return [option_name(option) for option in solution.choices]


def make_plan(cfg: AdaptiveConfig, spec: ExperimentSpec) -> CheckpointPlan:
    return BudgetPlanner(cfg, spec).decide().plan


class BudgetStrategy(Strategy):
    """Adaptive's execution: each plan is measured and held to the budget it was planned for."""

    def execute(self, spec: ExperimentSpec, measure: Measure) -> Outcome:
        """Measure the plan; while its measured peak is over the budget, tighten the planning
        budget by the overshoot and plan again (at most `strategy.max_rounds` plans).

        Planning time (profile, unit timings, solving) is recorded as `planning_s`: what
        adaptive adds to a job besides measuring its plan.
        """
        from memexp.devices import backend_for

        started = time.monotonic()
        planner = BudgetPlanner(spec.strategy, spec)
        record = planner.record(backend_for(spec).time_units(spec))
        outcome = Outcome(extra={"adaptive": record})
        rounds: list[dict[str, Any]] = []
        record["rounds"] = rounds
        budget, scope = planner.budget.bytes, planner.scope
        margin = 0
        try:
            for _ in range(spec.strategy.max_rounds):
                decision = planner.decide(margin)
                rounds.append(
                    {
                        "planning_budget_bytes": decision.planning_budget_bytes,
                        "predicted_peak_bytes": decision.prediction.peak_in(scope),
                        "plan_layers": describe_choices(decision.solution),
                    }
                )
                if len(rounds) == 1:
                    record["planning_s"] = round(time.monotonic() - started, 3)
                figures = measure(decision.plan)
                measured = figures.memory.peak_in(scope)
                rounds[-1]["measured_peak_bytes"] = measured
                if measured <= budget:
                    break
                margin += measured - budget
        except InfeasibleError as error:  # no plan fits: the rounds so far are the record
            outcome.verdict = error
            return outcome
        record.update(
            predicted_peak_bytes=decision.prediction.peak_in(scope),
            predicted_peak_at=decision.prediction.where_in(scope),
            predicted_recompute_flops=decision.solution.recompute_flops,
            predicted_recompute_ms=decision.solution.recompute_ps / 1e9,
            measured_peak_bytes=measured,
            measured_recompute_flops=figures.flops_recompute,
            plan_layers=describe_choices(decision.solution),
        )
        if measured > budget:
            outcome.verdict = InfeasibleError(
                f"the measured {SCOPE_WORDS[scope]} peak {format_bytes(measured)} "
                f"({figures.memory.source}) "
                f"is still over the budget of {format_bytes(budget)} after {len(rounds)} "
                "plan(s); raise strategy.max_rounds or the budget"
            )
        return outcome


STRATEGY = BudgetStrategy("adaptive", AdaptiveConfig, make_plan, validate)
