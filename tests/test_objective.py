"""What a job returns to the sweeper: its figure, or a penalty a search learns to leave."""

from __future__ import annotations

import pytest

from memexp.config import OBJECTIVES
from memexp.objective import FIELDS, PENALTY, objective_value
from memexp.results import STATUS_OK, STATUS_OOM, RunResult

MEASURED = RunResult(
    status=STATUS_OK, step_ms_median=12.5, peak_bytes=3_000_000, tokens_per_s_median=4096.0
)


def test_every_objective_the_config_accepts_has_its_field() -> None:
    assert tuple(FIELDS) == OBJECTIVES


@pytest.mark.parametrize(
    ("objective", "value"),
    [("step_ms", 12.5), ("peak_bytes", 3_000_000.0), ("tokens_per_s", 4096.0)],
)
def test_a_measured_job_returns_its_figure(objective: str, value: float) -> None:
    assert objective_value(MEASURED, objective, budget_bytes=3_000_000) == value


def test_a_failed_or_over_budget_job_returns_the_penalty() -> None:
    oom = RunResult(status=STATUS_OOM)
    assert objective_value(oom, "step_ms", None) == PENALTY
    assert objective_value(oom, "tokens_per_s", None) == 0.0
    assert objective_value(MEASURED, "step_ms", budget_bytes=2_999_999) == PENALTY
    assert objective_value(MEASURED, "tokens_per_s", budget_bytes=2_999_999) == 0.0


def test_a_figure_the_record_lacks_is_the_penalty() -> None:
    assert objective_value(MEASURED, "forward_backward_peak_bytes", None) == PENALTY
