"""`device=cpu` under a `parallel` mode: the step measured in `parallel.world_size` processes joined
by gloo, every rank tracked, every rank's figures in the one record.

The expected bytes come from what each mode is defined to keep, not from the code: FSDP2 shards
every parameter on its first dimension in `ceil(rows / world_size)`-row chunks (the last padded),
DDP keeps everything everywhere, ZeRO-1 gives each parameter's optimizer state to one rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from memexp.config import ExperimentSpec, ModelConfig
from memexp.results import RunResult
from memexp.runner import run_job

FP32 = 4
WORLD_SIZE = 2
# Only a few timed steps: the figures asserted here are bytes.
QUICK = ("measure.repeat=1", "measure.max_time_s=0.01", "measure.threads=1")


def parameter_shapes(model: ModelConfig, positions: int) -> list[tuple[int, ...]]:
    """The seed's transformer, parameter by parameter: embeddings, per layer two LayerNorms, the
    fused QKV and output projections and the two FFN matrices (no biases), final norm, head."""
    hidden, ffn = model.hidden, model.ffn_hidden
    layer = [(hidden,)] * 4 + [(3 * hidden, hidden), (hidden, hidden), (ffn, hidden), (hidden, ffn)]
    return [
        (model.vocab_size, hidden),
        (positions, hidden),
        *layer * model.layers,
        (hidden,),
        (hidden,),
        (model.vocab_size, hidden),
    ]


def shard_bytes(shape: tuple[int, ...], world_size: int) -> int:
    """One rank's padded dim-0 chunk of a parameter, as fully_shard stores it."""
    return math.ceil(shape[0] / world_size) * math.prod(shape[1:]) * FP32


@pytest.fixture(scope="module")
def measured(
    tiny_cfg: Callable[..., DictConfig], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., RunResult]:
    """`measured(mode)`: the tiny job under `parallel=<mode> parallel.world_size=2`, run once."""
    runs: dict[str, RunResult] = {}

    def run(mode: str) -> RunResult:
        if mode not in runs:
            cfg = tiny_cfg(
                "device=cpu", f"parallel={mode}", f"parallel.world_size={WORLD_SIZE}", *QUICK
            )
            folder = tmp_path_factory.mktemp(mode)
            runs[mode] = run_job(cfg, folder, {"overrides": [f"parallel={mode}"]})
        return runs[mode]

    return run


@pytest.fixture(scope="module")
def shapes(tiny_spec: Callable[..., ExperimentSpec]) -> list[tuple[int, ...]]:
    spec = tiny_spec()
    return parameter_shapes(spec.model, positions=spec.seq_len)


@pytest.mark.slow
def test_fsdp_measures_every_rank_and_each_holds_half_the_parameters(
    measured: Callable[..., RunResult], shapes: list[tuple[int, ...]]
) -> None:
    result = measured("fsdp")
    assert result.status == "ok", result.message
    assert (result.parallel, result.world_size) == ("fsdp", WORLD_SIZE)
    assert result.param_count == sum(math.prod(shape) for shape in shapes)
    assert result.rank_memory is not None and len(result.rank_memory) == WORLD_SIZE
    sharded = sum(shard_bytes(shape, WORLD_SIZE) for shape in shapes)
    assert sharded == result.param_count * FP32 // WORLD_SIZE  # tiny's rows all divide by 2
    # Adam: two moments per parameter shard, and a float32 step count per parameter.
    state = 2 * sharded + FP32 * len(shapes)
    for rank in result.rank_memory:
        assert rank["held_params_bytes"] == sharded
        assert rank["held_optimizer_state_bytes"] == state
        assert rank["peak_bytes"] >= rank["forward_backward_peak_bytes"] > sharded
    # The record's own figures are the fullest rank's.
    assert result.peak_rank is not None
    fullest = result.rank_memory[result.peak_rank]
    assert (
        result.peak_bytes
        == fullest["peak_bytes"]
        == max(r["peak_bytes"] for r in result.rank_memory)
    )
    assert result.forward_backward_peak_bytes == fullest["forward_backward_peak_bytes"]
    assert result.optimizer_state_bytes == fullest["optimizer_state_bytes"]


@pytest.mark.slow
def test_ddp_ranks_hold_everything_and_are_identical(
    measured: Callable[..., RunResult], shapes: list[tuple[int, ...]]
) -> None:
    result = measured("ddp")
    assert result.status == "ok", result.message
    assert result.rank_memory is not None
    first, second = result.rank_memory
    assert first == second
    whole = sum(math.prod(shape) for shape in shapes) * FP32
    assert first["held_params_bytes"] == whole
    assert first["held_optimizer_state_bytes"] == 2 * whole + FP32 * len(shapes)
    assert result.peak_rank == 0


@pytest.mark.slow
def test_zero1_gives_each_parameters_optimizer_state_to_one_rank(
    measured: Callable[..., RunResult], shapes: list[tuple[int, ...]]
) -> None:
    result = measured("zero1")
    assert result.status == "ok", result.message
    assert result.rank_memory is not None
    whole = sum(math.prod(shape) for shape in shapes) * FP32
    held = [rank["held_optimizer_state_bytes"] for rank in result.rank_memory]
    assert sum(held) == 2 * whole + FP32 * len(shapes)
    assert all(0 < share < 2 * whole for share in held)
    assert all(rank["held_params_bytes"] == whole for rank in result.rank_memory)


@pytest.mark.slow
def test_ranks_that_outlast_the_timeout_fail_the_job_with_a_record(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = tiny_cfg(
        "device=cpu", "parallel=ddp", "parallel.world_size=2", "measure.rank_timeout_s=0.5"
    )
    result = run_job(cfg, tmp_path, {"overrides": []})
    assert (result.status, result.error_type) == ("error", "RankFailure")
    assert result.message == (
        "rank 0: TimeoutError: ranks [0, 1] gave no answer within 0.5 s "
        "(measure.rank_timeout_s); every rank was stopped"
    )
