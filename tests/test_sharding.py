"""Many GPUs: one rank's step predicted on fake ranks equals the closed form of its states.

Two sources of each per-rank figure must agree: the closed form (memexp.sharded_states), from
shapes alone, and rank 0's step on fake tensors over a fake process group (memexp.estimate with
memexp.sharding), byte for byte where both describe the same tensors. World size 3 divides no
dimension of the tiny model, so FSDP2's padding is in every sharded figure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from memexp import analytic, sharded_states
from memexp.config import ExperimentSpec
from memexp.estimate import Prediction, predict
from memexp.measure.fake_world import fake_ranks
from memexp.plan import CheckpointPlan
from memexp.planner import profile_step
from memexp.results import STATUS_INFEASIBLE, STATUS_NOT_APPLICABLE, STATUS_OK
from memexp.runner import run_job
from memexp.sharded_states import (
    padded_elements,
    rank_elements,
    zero1_rank_shapes,
)
from memexp.sharding import shard_workload
from memexp.training import build_workload

SpecFn = Callable[..., ExperimentSpec]
ConfigFn = Callable[..., DictConfig]
FAKE = ("device=fake", "device.imagine=cpu")


def predicted(spec: ExperimentSpec) -> Prediction:
    return predict(spec, CheckpointPlan.nothing(spec.model.layers), imagine="cpu", counts=False)


@pytest.mark.parametrize(
    ("shape", "world_size", "own", "slot"),
    [
        ((32, 128), 8, 4 * 128, 32 * 128),  # divides: no padding
        ((32, 128), 3, 11 * 128, 33 * 128),  # ⌈32/3⌉ = 11 rows; the slot pads one row
        ((32,), 512, 1, 512),  # more ranks than rows: one row each, most ranks padding
    ],
)
def test_rank_zero_holds_the_first_chunk_of_rows(
    shape: tuple[int, ...], world_size: int, own: int, slot: int
) -> None:
    assert rank_elements(shape, world_size) == own
    assert padded_elements(shape, world_size) == slot


@pytest.mark.parametrize("world_size", [8, 64, 512])
def test_fsdp_rank_parameters_are_the_total_over_the_world_size_up_to_padding(
    world_size: int, tiny_spec: SpecFn
) -> None:
    spec = tiny_spec(
        "model=seed_llama7b", "seq.len=8192", "parallel=fsdp", f"parallel.world_size={world_size}"
    )
    figures = sharded_states.figures(spec)
    total = analytic.parameter_count(spec.model) * 4
    assert figures["analytic_rank_total_params_bytes"] == total == 26_954_727_424
    rank = figures["analytic_rank_params_bytes"]
    assert world_size * rank == total + figures["analytic_padding_bytes"]
    # Each tensor pads fewer than N rows of its row width; the widest row is h = 4096 elements.
    tensors = len(analytic.parameter_shapes(spec.model))
    assert 0 <= figures["analytic_padding_bytes"] < tensors * world_size * 4096 * 4
    assert figures["analytic_rank_grads_bytes"] == rank


def test_a_world_size_that_divides_every_tensor_shards_without_padding(
    tiny_spec: SpecFn,
) -> None:
    figures = sharded_states.figures(tiny_spec("parallel=fsdp", "parallel.world_size=8"))
    assert figures["analytic_padding_bytes"] == 0
    assert figures["analytic_rank_params_bytes"] == 233_728 // 8


def test_one_device_has_no_sharded_figures(tiny_spec: SpecFn) -> None:
    assert sharded_states.figures(tiny_spec()) == {}


@pytest.mark.parametrize("world_size", [3, 64])
def test_zero1_partition_is_zero_redundancy_optimizers(world_size: int, tiny_spec: SpecFn) -> None:
    """The greedy partition in closed form assigns rank 0 the tensors PyTorch's ZeRO-1 does."""
    spec = tiny_spec("parallel=zero1", f"parallel.world_size={world_size}")
    with fake_ranks(world_size), torch.device("meta"):
        work = build_workload(spec, CheckpointPlan.nothing(spec.model.layers), "meta")
        shard_workload(work, None)
        partition = work.optimizer._partition_parameters()  # type: ignore[attr-defined]
    owned = [tuple(p.shape) for group in partition[0] for p in group["params"]]
    assert owned == zero1_rank_shapes(analytic.parameter_shapes(spec.model), world_size)


# --- the fake ranks' step against the closed form ------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "unsharded_units"),
    [("fsdp", "root and one layer"), ("zero2", "every unit")],
)
@pytest.mark.parametrize("param_dtype", ["fp32", "bf16"])
def test_fully_sharded_rank_step_equals_the_closed_form(
    mode: str, unsharded_units: str, param_dtype: str, tiny_spec: SpecFn
) -> None:
    spec = tiny_spec(
        *FAKE, f"parallel={mode}", "parallel.world_size=3", f"parallel.param_dtype={param_dtype}"
    )
    memory = predicted(spec).memory
    figures = sharded_states.figures(spec)
    at_peak = memory.breakdown
    assert at_peak["params_bytes"] == figures["analytic_rank_params_bytes"] == 79_128
    assert at_peak["optimizer_state_bytes"] == figures["analytic_rank_optimizer_state_bytes"]
    # Between steps a rank holds its shards, their optimizer state and the batch, nothing else.
    assert memory.phase_bytes["after_setup"] == (
        figures["analytic_rank_params_bytes"]
        + figures["analytic_rank_optimizer_state_bytes"]
        + analytic.batch_bytes(spec)
    )
    root = figures["analytic_unsharded_root_params_bytes"]
    layer = figures["analytic_unsharded_layer_params_bytes"]
    gathered = {"root and one layer": root + layer, "every unit": root + 4 * layer}
    assert at_peak["unsharded_params_bytes"] == gathered[unsharded_units]
    # Whole layer-sized buffers are alive at the peak, how many depends on where it falls: one
    # layer's all-gather in fp32; with bf16 parameters the gathered layers weigh half and the
    # peak moves (fsdp: to a moment with a prefetched layer's buffer too; zero2: past them).
    buffers = {
        ("fsdp", "fp32"): 1,
        ("zero2", "fp32"): 1,
        ("fsdp", "bf16"): 2,
        ("zero2", "bf16"): 0,
    }[(mode, param_dtype)]
    assert figures["analytic_reduce_scatter_layer_bytes"] == layer  # reduce_dtype: param_dtype
    assert at_peak["communication_bytes"] == buffers * figures["analytic_all_gather_layer_bytes"]
    assert layer == (50_448 if param_dtype == "fp32" else 25_224)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero1"])
def test_replicated_rank_step_is_the_one_device_step_with_its_buckets_and_state_share(
    mode: str, tiny_spec: SpecFn
) -> None:
    """ddp: every phase of the one-device step plus DDP's buckets (one fp32 gradient copy).
    zero1: the same until the optimizer's state, which is only rank 0's tensors'."""
    one_device = predicted(tiny_spec(*FAKE)).memory
    spec = tiny_spec(*FAKE, f"parallel={mode}", "parallel.world_size=3")
    memory = predicted(spec).memory
    figures = sharded_states.figures(spec)
    buckets = figures["analytic_rank_gradient_bucket_bytes"]
    assert buckets == 233_728 == memory.breakdown["communication_bytes"]
    state_share = (
        analytic.optimizer_state_bytes(spec) - figures["analytic_rank_optimizer_state_bytes"]
    )
    assert state_share == (0 if mode == "ddp" else 467_604 - 155_936)
    assert memory.phase_bytes["after_setup"] == (
        one_device.phase_bytes["after_setup"] + buckets - state_share
    )
    if mode == "ddp":
        assert memory.phase_bytes == {
            phase: value + buckets for phase, value in one_device.phase_bytes.items()
        }
        assert memory.peak_bytes == one_device.peak_bytes + buckets


@pytest.mark.slow
def test_512_ranks_cost_what_one_rank_costs(tiny_spec: SpecFn) -> None:
    """Rank 0 of 512 is predicted in one process: its shards are one row of each tensor."""
    spec = tiny_spec(*FAKE, "parallel=fsdp", "parallel.world_size=512")
    memory = predicted(spec).memory
    figures = sharded_states.figures(spec)
    assert memory.breakdown["params_bytes"] == figures["analytic_rank_params_bytes"]
    rows = [shape for shape in analytic.parameter_shapes(spec.model)]
    assert figures["analytic_rank_params_bytes"] == 4 * sum(
        rank_elements(shape, 512) for shape in rows
    )
    assert memory.breakdown["unsharded_params_bytes"] == (
        figures["analytic_unsharded_root_params_bytes"]
        + figures["analytic_unsharded_layer_params_bytes"]
    )


@pytest.mark.slow
def test_reshard_after_forward_false_keeps_fsdp_gathered_like_zero2(tiny_spec: SpecFn) -> None:
    kept = tiny_spec(*FAKE, "parallel=fsdp", "parallel.reshard_after_forward=false")
    zero2 = replace(kept, parallel=replace(kept.parallel, name="zero2", reshard_after_forward=True))
    assert predicted(kept).memory.phase_bytes == predicted(zero2).memory.phase_bytes


# --- the adaptive planner, per rank ----------------------------------------------------------


@pytest.mark.slow  # two planner profiles on fake tensors: seconds each
def test_the_planner_rests_on_the_ranks_states(tiny_spec: SpecFn) -> None:
    """One device's profile rests on its whole states; a rank's on its shards, gathered units
    and buffers (a bound, memexp.sharded_states.RankStates)."""
    one = profile_step(tiny_spec("strategy=adaptive"))
    rank_spec = tiny_spec("strategy=adaptive", "parallel=fsdp", "parallel.world_size=3")
    rank = profile_step(rank_spec)
    figures = sharded_states.figures(rank_spec)
    batch = analytic.batch_bytes(rank_spec)
    assert one.resting_bytes == 233_728 + 467_604 + batch
    assert rank.resting_bytes == (
        79_128
        + 158_404
        + batch
        + figures["analytic_unsharded_root_params_bytes"]
        + figures["analytic_unsharded_layer_params_bytes"]
        + figures["analytic_all_gather_layer_bytes"]
    )
    assert rank.options == one.options  # activations are every rank's own


@pytest.mark.slow
def test_adaptive_fits_one_gpus_budget_under_the_chosen_sharding(
    tiny_cfg: ConfigFn, tmp_path: Path
) -> None:
    """0.5 MiB is below any one-device plan of tiny but above fsdp's rank on 8 GPUs."""
    budget = ("strategy=adaptive", "strategy.budget_mb=0.5", *FAKE)
    one = run_job(tiny_cfg(*budget), tmp_path / "one", {})
    assert one.status == STATUS_INFEASIBLE
    rank = run_job(tiny_cfg(*budget, "parallel=fsdp"), tmp_path / "rank", {})
    assert (rank.status, rank.parallel, rank.world_size) == (STATUS_OK, "fsdp", 8)
    adaptive = rank.extra["adaptive"]
    assert adaptive["budget_bytes"] == 2**19
    assert rank.forward_backward_peak_bytes == adaptive["measured_peak_bytes"] <= 2**19


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        (("device=cpu", "parallel=fsdp", "parallel.cpu_offload=true"), "step already keeps it"),
        ((*FAKE, "parallel=fsdp", "parallel.cpu_offload=true"), "host and the device are one CPU"),
    ],
)
def test_what_is_not_predicted_or_run_is_not_applicable(
    overrides: tuple[str, ...], reason: str, tiny_cfg: ConfigFn, tmp_path: Path
) -> None:
    result = run_job(tiny_cfg(*overrides), tmp_path, {})
    assert result.status == STATUS_NOT_APPLICABLE
    assert reason in (result.message or "")
