"""`sac_milp`: PyTorch's own checkpointing planner, held to the same budget as `adaptive`.

The budget is adaptive's (`budget_mb`, `budget_ratio` or midway between `none` and the leanest
plan, over `budget_scope`), so `strategy=adaptive,sac_milp,compile_budget strategy.budget_mb=…`
compares the planners at one budget. memexp.sac_planner profiles the model with PyTorch's
estimators (its CUDA roofline replaced by one for this machine), solves
`torch.distributed._tools.sac_ilp.sac_milp` with the budget less what its memory model leaves
out (optimizer state, batch, the loss's scratch: the correction), and turns its answer (per
layer: the fraction of activation memory to discard, then the operators to keep) into a plan
the model executes: each chosen layer a checkpoint with its explicit saved-operator list.

The plan is measured once, as planned: nothing is re-planned. A measured peak over the budget
is recorded as such (status `infeasible`, the figures kept, `over_budget_bytes` in the record).
What it planned, predicted and measured goes to `extra["sac_milp"]`. It needs the `pulp`
package (the `planners` extra), which ships the CBC solver.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memexp.config import ConfigError
from memexp.results import SCOPE_FORWARD_BACKWARD, InfeasibleError
from memexp.strategies.adaptive import SCOPE_WORDS, peer_budget, validate_budget
from memexp.strategies.base import Measure, Outcome, Strategy
from memexp.text import format_bytes

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig
    from memexp.plan import CheckpointPlan
    from memexp.sac_planner import SacDecision, SacProfile


@dataclass
class SacMilpConfig:
    name: str = "sac_milp"
    budget_mb: float | None = None
    budget_ratio: float | None = None
    budget_scope: str = SCOPE_FORWARD_BACKWARD  # step | forward_backward
    # The roofline that replaces sac_milp's CUDA one: peak TFLOP/s and memory GB/s; null (both):
    # measured on this machine's CPU.
    roofline_tflops: float | None = None
    roofline_gbps: float | None = None


def validate(cfg: SacMilpConfig, model: ModelConfig) -> None:
    validate_budget(cfg)
    if (cfg.roofline_tflops is None) != (cfg.roofline_gbps is None):
        raise ConfigError(
            "strategy.roofline_tflops",
            cfg.roofline_tflops,
            "set together with strategy.roofline_gbps, or both null (measured here)",
        )
    for field_name in ("roofline_tflops", "roofline_gbps"):
        value = getattr(cfg, field_name)
        if value is not None and value <= 0:
            raise ConfigError(f"strategy.{field_name}", value, "a positive rate, or null")


class SacPlanning:
    """One job's budget, sac_milp profile and decision."""

    def __init__(self, spec: ExperimentSpec) -> None:
        from memexp import sac_planner
        from memexp.measure.flops import Roofline

        cfg = spec.strategy
        started = time.monotonic()
        self.budget, _ = peer_budget(cfg, spec)
        self.scope = cfg.budget_scope
        roofline = (
            sac_planner.measured_roofline(spec)
            if cfg.roofline_tflops is None
            else Roofline(cfg.roofline_tflops, cfg.roofline_gbps, sac_planner.ROOFLINE_GIVEN)
        )
        self.profile: SacProfile = sac_planner.profile(spec, self.scope, roofline)
        self.decision: SacDecision | None = sac_planner.decide(self.profile, self.budget.bytes)
        self.planning_s = round(time.monotonic() - started, 3)
        self.correction_parts = sac_planner.correction_parts(spec)

    def plan(self) -> CheckpointPlan:
        if self.decision is None:
            raise InfeasibleError(self.infeasible_message())
        return self.decision.plan

    def infeasible_message(self) -> str:
        profile = self.profile
        return (
            f"sac_milp finds no plan within {format_bytes(self.budget.bytes)} "
            f"({self.budget.rule}): less the correction of {format_bytes(profile.correction_bytes)} "
            f"for what its memory model leaves out, its budget is "
            f"{format_bytes(self.budget.bytes - profile.correction_bytes)} against its own "
            f"`none` peak of {format_bytes(profile.ilp_baseline_peak_bytes)}"
        )

    def record(self) -> dict[str, Any]:
        """Budget, correction, roofline and decision, for `result.extra["sac_milp"]`."""
        profile = self.profile
        record: dict[str, Any] = {
            "budget_bytes": self.budget.bytes,
            "budget_rule": self.budget.rule,
            "budget_scope": self.scope,
            "correction_bytes": profile.correction_bytes,
            "correction_rule": (
                f"memexp's predicted {SCOPE_WORDS[self.scope]} peak of `none` (fake tensors) "
                "less sac_milp's own peak of `none` (parameters, gradients, activations and "
                "activation gradients only)"
            ),
            "terms_its_model_lacks": self.correction_parts,
            "memexp_none_peak_bytes": profile.memexp_baseline_peak_bytes,
            "ilp_none_peak_bytes": profile.ilp_baseline_peak_bytes,
            "roofline_tflops": profile.roofline.tflops,
            "roofline_gbps": profile.roofline.gbps,
            "roofline_source": profile.roofline.source,
            "ac_units": "layers",
            "planning_s": self.planning_s,
        }
        decision = self.decision
        if decision is not None:
            record.update(
                ilp_budget_bytes=decision.ilp_budget_bytes,
                ilp_peak_bytes=decision.ilp_peak_bytes,
                predicted_peak_bytes=decision.predicted_peak_bytes(profile.correction_bytes),
                ilp_recompute_ms=decision.recompute_ms,
                discard_ratios={str(layer): r for layer, r in decision.discard_ratios.items()},
                saved_ops={str(layer): list(names) for layer, names in decision.plan.saved_ops},
            )
        return record


def make_plan(cfg: SacMilpConfig, spec: ExperimentSpec) -> CheckpointPlan:
    return SacPlanning(spec).plan()


class SacMilpStrategy(Strategy):
    """Plan with sac_milp, measure once, and say whether the measured peak met the budget."""

    def execute(self, spec: ExperimentSpec, measure: Measure) -> Outcome:
        planning = SacPlanning(spec)
        record = planning.record()
        outcome = Outcome(extra={"sac_milp": record})
        if planning.decision is None:
            outcome.verdict = InfeasibleError(planning.infeasible_message())
            return outcome
        figures = measure(planning.decision.plan)
        measured = figures.memory.peak_in(planning.scope)
        budget = planning.budget.bytes
        record.update(
            measured_peak_bytes=measured,
            over_budget_bytes=max(0, measured - budget),
            measured_recompute_flops=figures.flops_recompute,
        )
        if measured > budget:
            outcome.verdict = InfeasibleError(
                f"sac_milp's plan measured a {SCOPE_WORDS[planning.scope]} peak of "
                f"{format_bytes(measured)} ({figures.memory.source}), "
                f"{format_bytes(measured - budget)} over the budget of {format_bytes(budget)}"
            )
        return outcome


STRATEGY = SacMilpStrategy("sac_milp", SacMilpConfig, make_plan, validate)
