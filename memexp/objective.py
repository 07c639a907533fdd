"""What a job returns to Hydra's sweeper: one figure of its record, or a penalty.

`objective` names the figure (`python -m memexp -m hydra/sweeper=optuna objective=step_ms`):

    step_ms                      median step time, ms                      minimize
    peak_bytes                   the step's peak memory, bytes             minimize
    forward_backward_peak_bytes  the forward+backward peak, bytes          minimize
    tokens_per_s                 median training throughput                maximize

A job that did not measure it (status other than `ok`: out of memory, infeasible, an error) or
whose peak is over `batch.budget_gb` (when set) returns
`PENALTY`, worse than any measured value in the objective's direction, so a search learns to
leave it: the worst value a minimized figure can take, 0 for a maximized one.
"""

from __future__ import annotations

from omegaconf import DictConfig

from memexp.results import STATUS_OK, RunResult
from memexp.text import GIB

# Objective → the record field holding it.
FIELDS = {
    "step_ms": "step_ms_median",
    "peak_bytes": "peak_bytes",
    "forward_backward_peak_bytes": "forward_backward_peak_bytes",
    "tokens_per_s": "tokens_per_s_median",
}
MAXIMIZED = frozenset({"tokens_per_s"})
# Larger than any step time in ms or peak in bytes a job can measure.
PENALTY = 1e18


def penalty(objective: str) -> float:
    return 0.0 if objective in MAXIMIZED else PENALTY


def objective_value(result: RunResult, objective: str, budget_bytes: int | None) -> float:
    """The record's figure for `objective`, or the penalty when it is missing or over budget.

    The field is read with getattr: a figure a record of an older schema lacks is a penalty.
    """
    if result.status != STATUS_OK:
        return penalty(objective)
    value = getattr(result, FIELDS[objective], None)
    over_budget = (
        budget_bytes is not None
        and result.peak_bytes is not None
        and result.peak_bytes > budget_bytes
    )
    return penalty(objective) if value is None or over_budget else float(value)


def job_objective(result: RunResult, cfg: DictConfig) -> float:
    """The value the job returns to Hydra: `cfg.objective` held to `cfg.batch.budget_gb`."""
    budget_gb = cfg.batch.get("budget_gb")
    budget_bytes = int(budget_gb * GIB) if budget_gb is not None else None
    return objective_value(result, cfg.objective, budget_bytes)
