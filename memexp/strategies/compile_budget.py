"""`compile_budget`: torch.compile's own rematerialisation, held to the same budget as `adaptive`.

The model's forward runs under `torch.compile`; AOTAutograd's min-cut partitioner decides what
the backward recomputes, keeping at most `torch._functorch.config.activation_memory_budget` of
the activation memory its default partition saves. The budget is adaptive's (`budget_mb`,
`budget_ratio` or midway, over `budget_scope`) and maps to that fraction through the `none`
plan (memexp's planner profile, fake tensors):

    fraction = (budget − (none's peak − none's saved activations)) / none's saved activations

clamped to [0, 1]: the share of `none`'s saved activations that fits once everything else at
`none`'s peak is paid for.

What is measured. `backend: aot_eager_decomp_partition` (the default) partitions as inductor
does but runs the graphs' operators one by one, so the compile takes seconds instead of minutes
on a CPU and the tensor tracker, which lets compiled code run under it, watches the compiled step
itself: the record's peaks and breakdown are the compiled step's, measured. Its backend records
the backward graphs (memexp.compile_partition), whose nodes traced in the forward are what the
partitioner recomputes: their FLOPs join the step's FLOPs, and their time on the job's roofline
(the cost model adaptive plans with) is the record's `recompute_roofline_ps`.

`backend: inductor` compiles kernels, which allocate outside the dispatcher: on a GPU the CUDA
allocator still measures the step, but on the CPU nothing sees its tensors, so the peak there is
an estimate from what the compiled forward saves (saved-tensor hooks see it),

    estimated peak = none's peak − none's saved activations + the compiled forward's saved bytes

which leaves out what recomputation adds during the backward, and nothing prices its
recomputation. On the fake device nothing compiles (fake tensors need a dispatch mode that
compiled code cannot run under): not applicable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memexp.config import FAKE_DEVICE, ConfigError
from memexp.plan import CheckpointPlan, CompiledForward
from memexp.results import (
    SCOPE_FORWARD_BACKWARD,
    SOURCE_CUDA_ALLOCATOR,
    InfeasibleError,
    NotApplicableError,
)
from memexp.strategies.adaptive import SCOPE_WORDS, peer_budget, validate_budget
from memexp.strategies.base import Measure, Outcome, Strategy
from memexp.text import format_bytes

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig
    from memexp.devices import Figures

BACKENDS = ("aot_eager_decomp_partition", "inductor")
MAPPING_RULE = (
    "fraction = (budget - (none's peak - none's saved activations)) / none's saved "
    "activations, clamped to [0, 1]"
)
MEASURED_PEAK_RULE = "measured: the {source} over the compiled step"
ESTIMATED_PEAK_RULE = (
    "estimated: none's peak - none's saved activations + the compiled forward's saved bytes "
    "(saved-tensor hooks); inductor's kernels allocate where the tensor tracker cannot see"
)
NOT_PREDICTABLE = (
    "compile_budget cannot be predicted on the fake device: torch.compile runs a frame eagerly "
    "under a TorchDispatchMode that does not let compiled code run under it, and fake tensors "
    "need one, so the partitioner's decision never runs; measure it on device=cpu"
)


@dataclass
class CompileBudgetConfig:
    name: str = "compile_budget"
    budget_mb: float | None = None
    budget_ratio: float | None = None
    budget_scope: str = SCOPE_FORWARD_BACKWARD  # step | forward_backward
    backend: str = BACKENDS[0]
    max_rounds: int = 3  # compiled steps measured at most, as adaptive's plans


def validate(cfg: CompileBudgetConfig, model: ModelConfig) -> None:
    validate_budget(cfg)
    if cfg.max_rounds < 1:
        raise ConfigError("strategy.max_rounds", cfg.max_rounds, "at least 1")
    if cfg.backend not in BACKENDS:
        raise ConfigError("strategy.backend", cfg.backend, "one of " + ", ".join(BACKENDS))


@dataclass(frozen=True)
class BudgetMapping:
    """The budget and `none`'s figures over its scope, which give the fraction."""

    budget_bytes: int
    budget_rule: str
    none_peak_bytes: int
    none_saved_bytes: int

    def fraction(self, margin: int = 0) -> float:
        """The partitioner's fraction for the budget less `margin` (what earlier compiled steps
        measured over it), by `MAPPING_RULE`."""
        fitting = self.budget_bytes - margin - (self.none_peak_bytes - self.none_saved_bytes)
        return min(1.0, max(0.0, fitting / self.none_saved_bytes))

    def estimated_peak(self, compiled_saved_bytes: int) -> int:
        return self.none_peak_bytes - self.none_saved_bytes + compiled_saved_bytes


def budget_mapping(spec: ExperimentSpec) -> BudgetMapping:
    from memexp.planner import predict

    budget, profile = peer_budget(spec.strategy, spec)
    none_peak = predict(profile, ((),) * profile.layers).peak_in(spec.strategy.budget_scope)
    return BudgetMapping(
        budget_bytes=budget.bytes,
        budget_rule=budget.rule,
        none_peak_bytes=none_peak,
        none_saved_bytes=profile.saved_activation_bytes(),
    )


def plan_for(spec: ExperimentSpec, fraction: float) -> CheckpointPlan:
    if spec.device == FAKE_DEVICE:
        raise NotApplicableError(NOT_PREDICTABLE)
    compiled = CompiledForward(spec.strategy.backend, fraction)
    return CheckpointPlan(spec.model.layers, compiled=compiled)


def make_plan(cfg: CompileBudgetConfig, spec: ExperimentSpec) -> CheckpointPlan:
    return plan_for(spec, budget_mapping(spec).fraction())


def peak_seen(plan: CheckpointPlan, figures: Figures) -> tuple[bool, str]:
    """Whether the step's memory figures are the compiled step's own, and the rule they follow:
    the tracker watches a backend whose graphs run operator by operator, the CUDA allocator any."""
    source = figures.memory.source
    compiled = plan.compiled
    if source == SOURCE_CUDA_ALLOCATOR or (compiled is not None and compiled.operator_by_operator):
        return True, MEASURED_PEAK_RULE.format(source=source.replace("_", " "))
    return False, ESTIMATED_PEAK_RULE


class CompileBudgetStrategy(Strategy):
    """Map the budget to the partitioner's fraction and measure the compiled step; while its
    peak (measured; an estimate where nothing can watch the compiled step) is over the budget,
    map the budget less the overshoot so far and measure again, at most `strategy.max_rounds`
    steps: the rule adaptive re-plans by."""

    def execute(self, spec: ExperimentSpec, measure: Measure) -> Outcome:
        started = time.monotonic()
        mapping = budget_mapping(spec)
        scope = spec.strategy.budget_scope
        record: dict[str, Any] = {
            "budget_bytes": mapping.budget_bytes,
            "budget_rule": mapping.budget_rule,
            "budget_scope": scope,
            "backend": spec.strategy.backend,
            "mapping_rule": MAPPING_RULE,
            "none_peak_bytes": mapping.none_peak_bytes,
            "none_saved_bytes": mapping.none_saved_bytes,
        }
        outcome = Outcome(extra={"compile_budget": record})
        rounds: list[dict[str, Any]] = []
        record["rounds"] = rounds
        margin = 0
        for _ in range(spec.strategy.max_rounds):
            fraction = mapping.fraction(margin)
            if rounds and fraction == rounds[-1]["activation_memory_budget"]:
                break  # clamped at 0: the same step again would measure the same
            record["activation_memory_budget"] = fraction
            try:
                plan = plan_for(spec, fraction)
            except NotApplicableError as error:  # the budget and its mapping are the record
                outcome.verdict = error
                return outcome
            record.setdefault("planning_s", round(time.monotonic() - started, 3))
            peak = self._measure_round(spec, mapping, plan, measure, record)
            rounds.append({"activation_memory_budget": fraction, "peak_bytes": peak})
            if peak <= mapping.budget_bytes:
                break
            margin += peak - mapping.budget_bytes
        over = record["peak_bytes"] - mapping.budget_bytes
        if over > 0:
            fractions = ", ".join(f"{r['activation_memory_budget']:.3f}" for r in rounds)
            outcome.verdict = InfeasibleError(
                f"the compiled step's {'measured' if record['peak_measured'] else 'estimated'} "
                f"{SCOPE_WORDS[scope]} peak {format_bytes(record['peak_bytes'])} is "
                f"{format_bytes(over)} over the budget of {format_bytes(mapping.budget_bytes)} "
                f"after {len(rounds)} compiled step(s) (activation_memory_budget "
                f"{fractions}); "
                "raise strategy.max_rounds or the budget"
            )
        return outcome

    @staticmethod
    def _measure_round(
        spec: ExperimentSpec,
        mapping: BudgetMapping,
        plan: CheckpointPlan,
        measure: Measure,
        record: dict[str, Any],
    ) -> int:
        """Measure `plan`'s step, write its figures into `record` and return its peak."""
        figures = measure(plan)
        saved = figures.saved_activation_bytes
        if saved is None:
            raise NotApplicableError("the compiled forward's saved bytes were not counted")
        record["compiled_saved_bytes"] = saved
        recompute = figures.compiled_recompute
        if recompute is not None:
            record.update(
                recomputed_operators=recompute.operators,
                recompute_flops=recompute.flops,
                recompute_roofline_ps=recompute.picoseconds,
                roofline_tflops=spec.roofline_rates[0],
                roofline_gbps=spec.roofline_rates[1],
            )
        measured, rule = peak_seen(plan, figures)
        scope = spec.strategy.budget_scope
        peak = figures.memory.peak_in(scope) if measured else mapping.estimated_peak(saved)
        record.update(
            peak_bytes=peak,
            peak_measured=measured,
            peak_rule=rule,
            over_budget_bytes=max(0, peak - mapping.budget_bytes),
        )
        return peak


STRATEGY = CompileBudgetStrategy("compile_budget", CompileBudgetConfig, make_plan, validate)
