"""`compile_budget`: torch.compile's own rematerialisation, held to the same budget as `adaptive`.

The model's forward runs under `torch.compile`; AOTAutograd's min-cut partitioner decides what
the backward recomputes, keeping at most `torch._functorch.config.activation_memory_budget` of
the activation memory its default partition saves. The budget is adaptive's (`budget_mb`,
`budget_ratio` or midway, over `budget_scope`) and maps to that fraction through the `none`
plan (memexp's planner profile, fake tensors):

    fraction = (budget − (none's peak − none's saved activations)) / none's saved activations

clamped to [0, 1]: the share of `none`'s saved activations that fits once everything else at
`none`'s peak is paid for.

What can be measured. `backend: aot_eager_decomp_partition` (the default) partitions as
inductor does but runs the graphs' operators eagerly, so the compile takes seconds instead of
minutes on a CPU; `backend: inductor` compiles kernels. Saved-tensor hooks see what the compiled
forward saves, and timed steps run the compiled step. The tensor tracker and the FLOP counter
do not: torch.compile runs a frame eagerly while a TorchDispatchMode is active, and both are
one, so the record's peak and FLOP fields are the eager (`none`) step's. The strategy's record
therefore carries the compiled step's saved bytes (measured) and a peak estimated from them,

    estimated peak = none's peak − none's saved activations + the compiled forward's saved bytes

(which leaves out what recomputation adds during the backward), and judges the budget by it.
On the fake device nothing compiles (fake tensors need a dispatch mode): not applicable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memexp.config import FAKE_DEVICE, ConfigError
from memexp.plan import CheckpointPlan, CompiledForward
from memexp.results import SCOPE_FORWARD_BACKWARD, InfeasibleError, NotApplicableError
from memexp.strategies.adaptive import SCOPE_WORDS, peer_budget, validate_budget
from memexp.strategies.base import Measure, Outcome, Strategy
from memexp.text import format_bytes

if TYPE_CHECKING:
    from memexp.config import ExperimentSpec, ModelConfig

BACKENDS = ("aot_eager_decomp_partition", "inductor")
MAPPING_RULE = (
    "fraction = (budget - (none's peak - none's saved activations)) / none's saved "
    "activations, clamped to [0, 1]"
)
PEAK_RULE = (
    "estimated: none's peak - none's saved activations + the compiled forward's saved bytes "
    "(saved-tensor hooks); the tracker and FLOP counter fields are the eager step's, since "
    "torch.compile runs eagerly under a TorchDispatchMode"
)
NOT_PREDICTABLE = (
    "compile_budget cannot be predicted on the fake device: torch.compile runs a frame eagerly "
    "while a TorchDispatchMode is active, and fake tensors need one, so the partitioner's "
    "decision never runs; measure it on device=cpu"
)


@dataclass
class CompileBudgetConfig:
    name: str = "compile_budget"
    budget_mb: float | None = None
    budget_ratio: float | None = None
    budget_scope: str = SCOPE_FORWARD_BACKWARD  # step | forward_backward
    backend: str = BACKENDS[0]


def validate(cfg: CompileBudgetConfig, model: ModelConfig) -> None:
    validate_budget(cfg)
    if cfg.backend not in BACKENDS:
        raise ConfigError("strategy.backend", cfg.backend, "one of " + ", ".join(BACKENDS))


@dataclass(frozen=True)
class BudgetMapping:
    """The budget, `none`'s figures over its scope, and the fraction they give."""

    budget_bytes: int
    budget_rule: str
    none_peak_bytes: int
    none_saved_bytes: int
    fraction: float

    def estimated_peak(self, compiled_saved_bytes: int) -> int:
        return self.none_peak_bytes - self.none_saved_bytes + compiled_saved_bytes


def budget_mapping(spec: ExperimentSpec) -> BudgetMapping:
    from memexp.planner import predict

    budget, profile = peer_budget(spec.strategy, spec)
    none_peak = predict(profile, ((),) * profile.layers).peak_in(spec.strategy.budget_scope)
    none_saved = profile.saved_activation_bytes()
    fitting = budget.bytes - (none_peak - none_saved)
    return BudgetMapping(
        budget_bytes=budget.bytes,
        budget_rule=budget.rule,
        none_peak_bytes=none_peak,
        none_saved_bytes=none_saved,
        fraction=min(1.0, max(0.0, fitting / none_saved)),
    )


def plan_for(spec: ExperimentSpec, mapping: BudgetMapping) -> CheckpointPlan:
    if spec.device == FAKE_DEVICE:
        raise NotApplicableError(NOT_PREDICTABLE)
    compiled = CompiledForward(spec.strategy.backend, mapping.fraction)
    return CheckpointPlan(spec.model.layers, compiled=compiled)


def make_plan(cfg: CompileBudgetConfig, spec: ExperimentSpec) -> CheckpointPlan:
    return plan_for(spec, budget_mapping(spec))


class CompileBudgetStrategy(Strategy):
    """Map the budget to the partitioner's fraction, measure the compiled step once, and judge
    the budget by the peak estimated from what the compiled forward saves."""

    def execute(self, spec: ExperimentSpec, measure: Measure) -> Outcome:
        started = time.monotonic()
        mapping = budget_mapping(spec)
        record: dict[str, Any] = {
            "budget_bytes": mapping.budget_bytes,
            "budget_rule": mapping.budget_rule,
            "budget_scope": spec.strategy.budget_scope,
            "backend": spec.strategy.backend,
            "activation_memory_budget": mapping.fraction,
            "mapping_rule": MAPPING_RULE,
            "none_peak_bytes": mapping.none_peak_bytes,
            "none_saved_bytes": mapping.none_saved_bytes,
        }
        outcome = Outcome(extra={"compile_budget": record})
        try:
            plan = plan_for(spec, mapping)
        except NotApplicableError as error:  # the budget and its mapping are still the record
            outcome.verdict = error
            return outcome
        record["planning_s"] = round(time.monotonic() - started, 3)
        figures = measure(plan)
        saved = figures.saved_activation_bytes
        if saved is None:
            raise NotApplicableError("the compiled forward's saved bytes were not counted")
        estimated = mapping.estimated_peak(saved)
        record.update(
            compiled_saved_bytes=saved,
            estimated_peak_bytes=estimated,
            peak_rule=PEAK_RULE,
            over_budget_bytes=max(0, estimated - mapping.budget_bytes),
        )
        if estimated > mapping.budget_bytes:
            outcome.verdict = InfeasibleError(
                f"the compiled step's estimated {SCOPE_WORDS[spec.strategy.budget_scope]} peak "
                f"{format_bytes(estimated)} is {format_bytes(estimated - mapping.budget_bytes)} "
                f"over the budget of {format_bytes(mapping.budget_bytes)} "
                f"(activation_memory_budget {mapping.fraction:.3f})"
            )
        return outcome


STRATEGY = CompileBudgetStrategy("compile_budget", CompileBudgetConfig, make_plan, validate)
