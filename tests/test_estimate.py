"""The fake device and batch=auto: predictions equal what a CPU run measures, byte for byte.

Three sources of one figure must agree: the closed form (memexp.analytic), the job's step on
fake tensors, and the same job really run on the CPU. The CPU job and the fake job are both run
by the runner, as the command line runs them, so the whole record is compared.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from memexp import analytic
from memexp.config import ConfigError, ExperimentSpec
from memexp.configure import validate
from memexp.estimate import (
    TIME_SOURCE_ESTIMATE,
    predict,
    ranks_of,
    search_largest_batch,
    step_flops_without_checkpointing,
    use_multi_tensor_optimizer,
)
from memexp.measure.flops import fake_workload, flop_counter, step_flops
from memexp.measure.memory import measure_memory, tracked_step
from memexp.measure.timing import StoppingRule, first_step, time_steps
from memexp.measure.tracker import CATEGORY_FIELDS
from memexp.plan import CheckpointPlan, Part
from memexp.results import SOURCE_FAKE_TENSORS, RunResult
from memexp.runner import run_job
from memexp.sharding import shard_workload
from memexp.storage import StorageLedger
from memexp.strategies import make_plan
from memexp.training import build_workload

ConfigFn = Callable[..., DictConfig]
SpecFn = Callable[..., ExperimentSpec]

ONE_STEP = ("measure.repeat=1",)
# b, s, h, a, f, V and L all distinct from each other and from the tiny preset's.
ODD_SHAPE = (
    "batch.size=3", "seq.len=5", "model.hidden=12", "model.heads=3",
    "model.ffn_hidden=20", "model.vocab_size=11", "model.layers=3",
)  # fmt: skip
WORKLOADS = {
    "tiny naive none": ("strategy=none",),
    "tiny naive full": ("strategy=full",),
    "tiny naive sqrt": ("strategy=sqrt",),
    "tiny bf16 sqrt": ("strategy=sqrt", "precision=bf16"),
    "odd shape biases naive sqrt": (*ODD_SHAPE, "model.bias=true", "strategy=sqrt"),
    "odd shape sdpa none": (*ODD_SHAPE, "model.attention=sdpa", "strategy=none"),
    "odd shape sdpa full sublayer": (
        *ODD_SHAPE, "model.attention=sdpa", "strategy=full", "strategy.granularity=sublayer",
    ),
}  # fmt: skip
BREAKDOWN = sorted(set(CATEGORY_FIELDS.values()))


def run(tiny_cfg: ConfigFn, tmp_path: Path, *overrides: str) -> RunResult:
    """One job through the runner, in its own folder."""
    job_dir = tmp_path / "-".join(o.replace("=", "_") for o in overrides)
    return run_job(tiny_cfg(*ONE_STEP, *overrides), job_dir, {})


@pytest.mark.slow
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_three_sources_agree(workload: str, tiny_spec: SpecFn) -> None:
    """Closed form, fake tensors and a real CPU step: the same saved bytes; the same peak,
    breakdown and phase peaks from the fake step and the CPU step."""
    spec = tiny_spec(*WORKLOADS[workload], "device=cpu")
    plan = make_plan(spec)
    predicted = predict(spec, plan, "cpu")

    work = build_workload(spec, plan, "cpu")
    measured_saved = time_steps(work, warmup=1, rule=StoppingRule.fixed(1)).saved_activation_bytes
    measured = measure_memory(work)

    assert predicted.saved_activation_bytes == measured_saved
    if spec.precision == "fp32":  # bf16 has no closed form
        assert measured_saved == analytic.saved_activation_bytes(spec, plan)
    assert predicted.memory.peak_bytes == measured.peak_bytes
    assert predicted.memory.forward_backward_peak_bytes == measured.forward_backward_peak_bytes
    assert predicted.memory.breakdown == measured.breakdown
    assert predicted.memory.phase_bytes == measured.phase_bytes


@pytest.mark.slow
def test_fake_job_record_equals_the_cpu_job_record(tiny_cfg: ConfigFn, tmp_path: Path) -> None:
    """The same through the runner: every memory, saved-byte and FLOP field of the record."""
    measured = run(tiny_cfg, tmp_path, "strategy=full", "device=cpu")
    predicted = run(tiny_cfg, tmp_path, "strategy=full", "device=fake", "device.imagine=cpu")
    assert (measured.status, predicted.status) == ("ok", "ok")
    assert (measured.memory_source, predicted.memory_source) == (
        "tensor_tracker",
        SOURCE_FAKE_TENSORS,
    )
    same = [
        "peak_bytes",
        "forward_backward_peak_bytes",
        "phase_bytes",
        *BREAKDOWN,
        "saved_activation_bytes",
        "param_count",
    ]
    same += ["flops_step", "flops_step_no_checkpoint", "flops_recompute"]
    for field in same:
        assert getattr(predicted, field) == getattr(measured, field), field
    analytic_keys = [key for key in measured.extra if key.startswith("analytic_")]
    assert analytic_keys
    assert {k: predicted.extra[k] for k in analytic_keys} == {
        k: measured.extra[k] for k in analytic_keys
    }
    assert predicted.extra["analytic_saved_activation_bytes"] == predicted.saved_activation_bytes


@pytest.mark.slow
def test_prediction_leaves_measured_time_empty_and_labels_the_estimate(
    tiny_cfg: ConfigFn, tmp_path: Path
) -> None:
    result = run(
        tiny_cfg,
        tmp_path,
        "device=fake",
        "device.peak_tflops=2",
        "device.utilization=0.25",
        "device.memory_gb=1",
    )
    assert result.status == "ok"
    assert result.step_ms_median is None and result.tokens_per_s_median is None
    assert result.time_source == TIME_SOURCE_ESTIMATE
    expected_ms = result.flops_step / (2e12 * 0.25) * 1e3
    assert result.extra["estimated_step_ms"] == pytest.approx(expected_ms, rel=1e-12)
    assert result.extra["device_memory_bytes"] == 2**30
    assert result.extra["fits_device_memory"] is True
    assert result.extra["device_headroom_bytes"] == 2**30 - result.peak_bytes


@pytest.mark.slow
def test_a_step_that_does_not_fit_says_so(tiny_cfg: ConfigFn, tmp_path: Path) -> None:
    result = run(tiny_cfg, tmp_path, "device=fake", "device.memory_gb=0.0001")
    assert result.status == "ok"  # a prediction, not an out-of-memory error
    assert result.extra["fits_device_memory"] is False
    assert result.extra["device_headroom_bytes"] < 0


@pytest.mark.slow
def test_imagined_cuda_optimizer_needs_one_more_copy_of_the_parameters(tiny_spec: SpecFn) -> None:
    """CUDA's default multi-tensor Adam takes sqrt(v) of all tensors at once."""
    spec = tiny_spec()
    plan = make_plan(spec)
    peaks = {
        imagine: predict(spec, plan, imagine, counts=False).memory.phase_bytes["optimizer_peak"]
        for imagine in ("cpu", "cuda")
    }
    assert peaks["cpu"] == analytic.optimizer_step_peak_bytes(spec, multi_tensor=False)
    assert peaks["cuda"] == analytic.optimizer_step_peak_bytes(spec, multi_tensor=True)
    per_tensor_scratch = analytic.optimizer_scratch_bytes(spec, multi_tensor=False)
    all_parameters = 4 * analytic.parameter_count(spec.model)
    assert peaks["cuda"] - peaks["cpu"] == all_parameters - per_tensor_scratch


@pytest.mark.slow
def test_offloaded_tensors_leave_the_imagined_gpu(tiny_spec: SpecFn) -> None:
    """On an imagined GPU offloading moves saved tensors to host memory; on a CPU it is a no-op.

    What moves is every floating activation of at least memexp.storage.MIN_ELEMENTS: token ids
    (256 bytes), positions (128), targets (256), the loss's weight (4) and the statistics of the
    9 LayerNorms (9 × 256) stay on the device."""
    spec = tiny_spec("optimizer.name=sgd")  # no optimizer peak to hide the forward's
    layers = spec.model.layers
    kept, offloaded = CheckpointPlan.nothing(layers), CheckpointPlan(layers, storage="host")

    on_gpu = predict(spec, offloaded, "cuda")
    in_place = predict(spec, kept, "cuda")
    assert on_gpu.saved_activation_bytes == in_place.saved_activation_bytes
    assert on_gpu.host_peak_bytes == on_gpu.storage.stored_bytes
    assert on_gpu.saved_activation_bytes - on_gpu.host_peak_bytes == 256 + 128 + 256 + 4 + 9 * 256
    assert on_gpu.memory.peak_bytes < in_place.memory.peak_bytes
    assert on_gpu.memory.phase_bytes["forward_peak"] < in_place.memory.phase_bytes["forward_peak"]

    on_cpu = predict(spec, offloaded, "cpu", counts=False)
    assert on_cpu.host_peak_bytes is None
    assert on_cpu.memory.peak_bytes == predict(spec, kept, "cpu", counts=False).memory.peak_bytes


@pytest.mark.slow
def test_fake_device_predicts_a_shape_too_large_to_allocate_here(tiny_spec: SpecFn) -> None:
    """Two layers at LLaMA-7B width and vocabulary (0.68 billion parameters): a 12 GiB step,
    predicted while this process's memory stays far below it. Short sequences keep the
    optimizer step the peak, which the closed form gives exactly."""
    spec = tiny_spec("model=seed_llama7b", "model.layers=2", "seq.len=32", "batch.size=1")
    plan = make_plan(spec)
    prediction = predict(spec, plan, "cuda")
    assert prediction.param_count == analytic.parameter_count(spec.model)
    assert prediction.memory.peak_bytes == analytic.optimizer_step_peak_bytes(spec, True)
    phases = prediction.memory.phase_bytes
    fwd_bwd = prediction.memory.forward_backward_peak_bytes
    assert fwd_bwd == max(phases["forward_peak"], phases["backward_peak"])
    assert fwd_bwd < prediction.memory.peak_bytes == phases["optimizer_peak"]
    assert prediction.saved_activation_bytes == analytic.saved_activation_bytes(spec, plan)
    resident_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    assert prediction.memory.peak_bytes > 12 * 2**30 > 4 * resident_bytes


@pytest.mark.parametrize(
    "shape",
    [pytest.param((), id="tiny"), pytest.param(ODD_SHAPE, id="odd shape", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("attention", [pytest.param("naive", marks=pytest.mark.slow), "sdpa"])
def test_flops_without_checkpointing_are_affine_in_depth(
    shape: tuple[str, ...], attention: str, tiny_spec: SpecFn
) -> None:
    spec = tiny_spec(*shape, f"model.attention={attention}")
    nothing = CheckpointPlan.nothing(spec.model.layers)
    assert step_flops_without_checkpointing(spec) == step_flops(spec, nothing)


@pytest.mark.slow
def test_core_recomputation_is_predicted_like_the_cpu_run(tiny_spec: SpecFn) -> None:
    spec = tiny_spec(*ODD_SHAPE, "model.attention=sdpa")
    plan = CheckpointPlan(3, parts=((0, Part.ATTENTION_CORE), (1, Part.FFN)), segments=((2, 3),))
    prediction = predict(spec, plan, "cpu")
    assert prediction.saved_activation_bytes == analytic.saved_activation_bytes(spec, plan)


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ("model=llama_tiny", "strategy=none"),
        ("model=llama_tiny", "strategy=selective", "precision=bf16"),
        ("model=gpt2_tiny", "strategy=sqrt"),
        ("strategy=offload",),
        ("strategy=compress",),
        ("strategy=full", "parallel=fsdp"),
    ],
    ids=" ".join,
)
def test_counting_in_the_tracked_step_changes_no_figure(
    overrides: tuple[str, ...], tiny_spec: SpecFn
) -> None:
    """A prediction counts FLOPs inside its tracked step (one full step on fake tensors, not
    two). Every figure equals the two-step way's: a warm-up step counting FLOPs (with the
    counter's module hooks) and saved bytes, then a step tracked with nothing attached; the
    memory to the last timeline event, and the storage's counts."""
    spec = tiny_spec("device=fake", *overrides)
    plan = make_plan(spec)
    prediction = predict(spec, plan, "cuda")

    with ranks_of(spec.parallel) as mesh:
        mode, work = fake_workload(spec, plan, host_apart=True)
        with mode:
            shard_workload(work, mesh)
            use_multi_tensor_optimizer(work.optimizer)
            with flop_counter() as counter:
                _, saved = first_step(work)
            work.storage_ledger = StorageLedger()
            memory = tracked_step(work, source=SOURCE_FAKE_TENSORS)

    assert prediction.memory == memory
    assert len(prediction.memory.timeline) == len(memory.timeline) > 100
    assert prediction.flops_step == counter.get_total_flops() == step_flops(spec, plan) > 0
    assert prediction.saved_activation_bytes == saved > 0
    untimed = {"pack_s": 0.0, "unpack_s": 0.0}
    assert prediction.storage is not None
    assert vars(prediction.storage) | untimed == vars(work.storage_ledger) | untimed


# --- batch=auto ----------------------------------------------------------------------------


def affine_peak(batch: int) -> int:
    return 100 + 7 * batch


@pytest.mark.parametrize("start", [1, 3, 128])
def test_search_finds_the_largest_batch_that_fits(start: int) -> None:
    search = search_largest_batch(affine_peak, budget_bytes=1000, start=start)
    assert search.batch_size == 128  # 100 + 7·128 = 996; 129 needs 1003
    assert search.probes[129] > 1000  # the next one up was tried and did not fit
    assert search.peak_bytes == 996 and search.headroom_bytes == 4
    assert not search.limit_reached


def test_search_reports_a_first_batch_that_does_not_fit() -> None:
    search = search_largest_batch(affine_peak, budget_bytes=100)
    assert search.batch_size is None
    assert search.probes == {1: 107}
    assert search.peak_bytes == 107


def test_search_stops_at_its_limit() -> None:
    search = search_largest_batch(affine_peak, budget_bytes=10**9, limit=50)
    assert (search.batch_size, search.limit_reached) == (50, True)


def test_search_probes_few_batches() -> None:
    search = search_largest_batch(affine_peak, budget_bytes=10**5)
    answer = search.batch_size
    assert answer == (10**5 - 100) // 7
    assert len(search.probes) <= 2 * answer.bit_length() + 1


@pytest.mark.slow
def test_auto_batch_runs_the_largest_batch_predicted_to_fit(
    tiny_cfg: ConfigFn, tmp_path: Path, tiny_spec: SpecFn
) -> None:
    # A budget between the tiny model's predicted peaks at batch 3 and 4 (strategy none).
    peaks = {}
    for batch in (3, 4):
        spec = tiny_spec("device=cpu", f"batch.size={batch}")
        peaks[batch] = predict(spec, make_plan(spec), "cpu", counts=False).memory.peak_bytes
    budget_gb = (peaks[3] + peaks[4]) / 2 / 2**30
    result = run(
        tiny_cfg,
        tmp_path,
        "batch=auto",
        "device=fake",
        "device.imagine=cpu",
        f"batch.budget_gb={budget_gb}",
    )
    assert result.status == "ok"
    assert result.batch_size == result.extra["auto_batch_size"] == 3
    assert tiny_spec().batch_size != 3  # not the preset's batch by accident
    assert result.peak_bytes == peaks[3] == result.extra["auto_batch_predicted_peak_bytes"]
    assert result.extra["auto_batch_next_peak_bytes"] == peaks[4]
    budget = result.extra["auto_batch_budget_bytes"]
    assert result.extra["auto_batch_headroom_bytes"] == budget - peaks[3] >= 0
    assert peaks[4] > budget


@pytest.mark.slow
def test_auto_batch_on_the_cpu_measures_the_batch_it_found(
    tiny_cfg: ConfigFn, tmp_path: Path
) -> None:
    result = run(tiny_cfg, tmp_path, "batch=auto", "device=cpu", "batch.budget_gb=0.0011")
    assert result.status == "ok"
    assert result.memory_source == "tensor_tracker"  # measured, not predicted
    assert result.peak_bytes == result.extra["auto_batch_predicted_peak_bytes"]
    assert result.peak_bytes <= result.extra["auto_batch_budget_bytes"]
    assert result.extra["auto_batch_next_peak_bytes"] > result.extra["auto_batch_budget_bytes"]


@pytest.mark.slow
def test_budget_that_batch_one_exceeds_is_an_infeasible_record(
    tiny_cfg: ConfigFn, tmp_path: Path
) -> None:
    result = run(tiny_cfg, tmp_path, "batch=auto", "device=fake", "device.memory_gb=0.0005")
    assert result.status == "infeasible"
    assert result.batch_size == 1
    assert result.memory_source == SOURCE_FAKE_TENSORS
    assert result.peak_bytes == result.extra["auto_batch_probes"][0][1]
    assert result.peak_bytes > result.extra["auto_batch_budget_bytes"] == int(0.0005 * 2**30)
    assert result.message.startswith("batch 1 at seq 16 already needs ")


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param(("batch=auto", "device=cpu"), "batch.budget_gb", marks=pytest.mark.slow),
        (("batch=auto", "device=fake", "device.memory_gb=null"), "batch.budget_gb"),
        (("batch=auto", "batch.budget_gb=-1", "device=fake"), "batch.budget_gb"),
        (("device=fake", "device.memory_gb=0"), "device.memory_gb"),
        (("device=fake", "device.peak_tflops=-5"), "device.peak_tflops"),
        (("device=fake", "device.utilization=0"), "device.utilization"),
        (("device=fake", "device.utilization=1.5"), "device.utilization"),
        (("device=fake", "device.imagine=tpu"), "device.imagine"),
    ],
)
def test_bad_device_and_batch_settings_name_the_field(
    overrides: tuple[str, ...], field: str, tiny_cfg: ConfigFn
) -> None:
    with pytest.raises(ConfigError) as error:
        validate(tiny_cfg(*overrides), cuda_available=False)
    assert error.value.field_name == field


@pytest.mark.slow
def test_spec_exposes_the_memory_a_planner_must_fit(tiny_cfg: ConfigFn) -> None:
    fake = validate(tiny_cfg("device=fake", "device.memory_gb=2"), cuda_available=False)
    assert fake.device_memory_bytes == fake.memory_budget_bytes == 2 * 2**30
    budgeted = validate(
        tiny_cfg("device=fake", "batch=auto", "batch.budget_gb=0.5"),
        cuda_available=False,
    )
    assert (budgeted.device_memory_bytes, budgeted.memory_budget_bytes) == (141 * 2**30, 2**29)
    cpu = validate(tiny_cfg("device=cpu"), cuda_available=False)
    assert cpu.memory_budget_bytes is None
