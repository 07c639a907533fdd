"""Hand-made job records for the aggregation and report tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memexp.results import RunResult, write_result


def write_job(
    sweep: Path,
    num: int,
    strategy: str,
    workload: dict[str, Any],
    status: str = "ok",
    **fields: Any,
) -> Path:
    """One `<sweep>/<num>/result.json`: `workload` unless a field overrides it."""
    record = {**workload, **fields}
    record.setdefault("overrides", [f"strategy={strategy}"])
    result = RunResult(status=status, job_num=num, strategy=strategy, **record)
    return write_result(sweep / str(num), result)
