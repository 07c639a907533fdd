"""Every strategy computes what `none` computes, recomputes exactly its units, and says no clearly.

Gradients and loss must be bit-identical to the `none` plan's (fp32 and bf16): recomputation
replays the same operators on the same inputs. Recompute FLOPs are checked against the forward
FLOPs of the recomputed units, counted independently on a lone layer: all of them with PyTorch's
early stop off, and with it on (the default, what jobs record) all but each checkpoint's last
matmul, whose output nothing inside the checkpoint saves. FlopCounterMode counts matmuls only,
so the op-level policy, which keeps every matmul, recomputes 0 FLOPs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import set_checkpoint_early_stop

from memexp.config import ConfigError, ExperimentSpec
from memexp.configure import validate
from memexp.measure.flops import flop_counter, step_flops
from memexp.measure.memory import tracked_step
from memexp.measure.saved import counting_saved_bytes
from memexp.model import TransformerLayer
from memexp.plan import CheckpointPlan, Part
from memexp.results import STATUS_NOT_APPLICABLE, STATUS_OK, read_result
from memexp.runner import run_job
from memexp.strategies import STRATEGIES, make_plan
from memexp.strategies.base import Outcome
from memexp.training import autocast_context, backward, build_workload, forward_loss

SpecFn = Callable[..., ExperimentSpec]

# Strategy overrides whose plans recompute something on the tiny model (4 layers).
RECOMPUTING = [
    ("strategy=full",),
    ("strategy=full", "strategy.granularity=sublayer"),
    ("strategy=sqrt",),
    ("strategy=selective",),
    ("strategy=selective", "strategy.part=attention"),
    ("strategy=selective", "strategy.part=ffn"),
    ("strategy=every_n",),
    ("strategy=every_n", "strategy.n=3"),
    ("strategy=op",),
]


def loss_and_grads(
    spec: ExperimentSpec, plan: CheckpointPlan
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    work = build_workload(spec, plan, "cpu")
    loss = forward_loss(work)
    backward(loss)
    return loss.detach(), {name: p.grad for name, p in work.model.named_parameters()}


def assert_same_step(spec: ExperimentSpec, plan: CheckpointPlan) -> None:
    expected_loss, expected_grads = loss_and_grads(spec, CheckpointPlan.nothing(plan.num_layers))
    loss, grads = loss_and_grads(spec, plan)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    assert all(grad is not None for grad in grads.values())
    assert [n for n, g in grads.items() if not torch.equal(g, expected_grads[n])] == []


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("overrides", RECOMPUTING, ids=" ".join)
def test_loss_and_gradients_equal_nones(
    overrides: tuple[str, ...], precision: str, tiny_spec: SpecFn
) -> None:
    spec = tiny_spec(*overrides, f"precision={precision}")
    plan = make_plan(spec)
    assert plan.recomputes_anything
    assert_same_step(spec, plan)


def test_offloading_changes_neither_loss_nor_gradients(tiny_spec: SpecFn) -> None:
    """Run on the CPU the plan a GPU job would get: save_on_cpu round-trips every saved tensor."""
    spec = tiny_spec()
    assert_same_step(spec, CheckpointPlan(spec.model.layers, storage="host"))


# --- recompute FLOPs --------------------------------------------------------------------------


def unit_forward_flops(spec: ExperimentSpec) -> dict[str, int]:
    """FLOPs of one forward of each unit, on a lone layer of the job's shapes (fake tensors)."""
    model = spec.model
    b, s, h, a = spec.batch_size, spec.seq_len, model.hidden, model.heads
    with FakeTensorMode():
        layer = TransformerLayer(model)
        x = torch.randn(b, s, h)
        q, k, v = (torch.randn(b, a, s, h // a) for _ in range(3))
        runs = {
            Part.ATTENTION_CORE: lambda: layer.attention.core(q, k, v),
            Part.ATTENTION: lambda: layer.attention(x),
            Part.FFN: lambda: layer.ffn(x),
            "layer": lambda: layer(x),
        }
        counted = {}
        for unit, run in runs.items():
            with autocast_context(spec, "cpu"), flop_counter() as counter:
                run()
            counted[unit] = int(counter.get_total_flops())
    return counted


def last_matmul_flops(spec: ExperimentSpec) -> dict[str, int]:
    """The matmul ending each unit (2·m·n·k): probabilities·V, the output and down projections."""
    model = spec.model
    tokens, h = spec.batch_size * spec.seq_len, model.hidden
    down = 2 * tokens * model.ffn_hidden * h
    return {
        Part.ATTENTION_CORE: 2 * tokens * spec.seq_len * h,
        Part.ATTENTION: 2 * tokens * h * h,
        Part.FFN: down,
        "layer": down,
    }


def expected_recompute(spec: ExperimentSpec, plan: CheckpointPlan, early_stop: bool) -> int:
    forward = unit_forward_flops(spec)
    skipped = last_matmul_flops(spec) if early_stop else dict.fromkeys(forward, 0)
    total = 0
    for start, end in plan.segments:
        total += (end - start) * forward["layer"] - skipped["layer"]
    for _, part in plan.parts:
        total += forward[part] - skipped[part]
    return total


def recompute_flops(spec: ExperimentSpec, plan: CheckpointPlan) -> int:
    return step_flops(spec, plan) - step_flops(spec, CheckpointPlan.nothing(plan.num_layers))


@pytest.mark.slow
@pytest.mark.parametrize("early_stop", [False, True], ids=["early_stop_off", "early_stop_on"])
@pytest.mark.parametrize(
    "overrides", [o for o in RECOMPUTING if o != ("strategy=op",)], ids=" ".join
)
def test_recompute_flops_are_the_recomputed_units_forward_flops(
    overrides: tuple[str, ...], early_stop: bool, tiny_spec: SpecFn
) -> None:
    spec = tiny_spec(*overrides)
    plan = make_plan(spec)
    with set_checkpoint_early_stop(early_stop):
        measured = recompute_flops(spec, plan)
    assert measured == expected_recompute(spec, plan, early_stop) > 0


@pytest.mark.slow
@pytest.mark.parametrize("early_stop", [False, True], ids=["early_stop_off", "early_stop_on"])
def test_op_policy_recomputes_no_counted_flops(early_stop: bool, tiny_spec: SpecFn) -> None:
    spec = tiny_spec("strategy=op")
    with set_checkpoint_early_stop(early_stop):
        assert recompute_flops(spec, make_plan(spec)) == 0


# --- plans --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "parts"),
    [
        ((), {Part.ATTENTION_CORE}),
        (("strategy.part=attention",), {Part.ATTENTION}),
        (("strategy.part=ffn",), {Part.FFN}),
    ],
)
def test_selective_recomputes_its_part_in_every_layer(
    overrides: tuple[str, ...], parts: set[Part], tiny_spec: SpecFn
) -> None:
    plan = make_plan(tiny_spec("strategy=selective", *overrides))
    assert plan.segments == ()
    assert [set(plan.parts_of(layer)) for layer in range(4)] == [parts] * 4


@pytest.mark.parametrize(("n", "layers"), [(1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), (4, [3])])
def test_every_n_checkpoints_layers_n_2n_and_so_on(
    n: int, layers: list[int], tiny_spec: SpecFn
) -> None:
    plan = make_plan(tiny_spec("strategy=every_n", f"strategy.n={n}"))
    assert plan.segments == tuple((layer, layer + 1) for layer in layers)
    assert plan.parts == ()


def test_every_n_of_one_is_full(tiny_spec: SpecFn) -> None:
    assert make_plan(tiny_spec("strategy=every_n", "strategy.n=1")) == make_plan(
        tiny_spec("strategy=full")
    )


def test_op_policy_keeps_matmul_outputs_and_drops_the_rest(tiny_spec: SpecFn) -> None:
    """Saved for backward under the policy: the kept matmul outputs hold fewer bytes than `none`
    saves but more than a plain full checkpoint, which keeps only layer inputs."""
    spec = tiny_spec("strategy=op")
    plan = make_plan(spec)
    assert plan.op_policy == "save_matmuls"
    assert plan.segments == tuple((layer, layer + 1) for layer in range(4))

    def forward_end_bytes(plan: CheckpointPlan) -> int:
        work = build_workload(spec, plan, "cpu")
        return tracked_step(work).phase_bytes["forward_peak"]

    op_bytes = forward_end_bytes(plan)
    assert forward_end_bytes(make_plan(tiny_spec("strategy=full"))) < op_bytes
    assert op_bytes < forward_end_bytes(CheckpointPlan.nothing(4))


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (("strategy=selective", "strategy.part=mlp"), "strategy.part"),
        (("strategy=every_n", "strategy.n=0"), "strategy.n"),
        (("strategy=every_n", "strategy.n=5"), "strategy.n"),
        (("strategy=op", "strategy.policy=save_everything"), "strategy.policy"),
        (
            ("strategy=adaptive", "strategy.budget_mb=100", "strategy.budget_ratio=0.5"),
            "strategy.budget_mb",
        ),
        (("strategy=adaptive", "strategy.budget_mb=0"), "strategy.budget_mb"),
        (("strategy=adaptive", "strategy.budget_ratio=0"), "strategy.budget_ratio"),
        (("strategy=adaptive", "strategy.budget_ratio=1.5"), "strategy.budget_ratio"),
        (("strategy=adaptive", "strategy.max_rounds=0"), "strategy.max_rounds"),
        (("strategy=adaptive", "strategy.budget_scope=optimizer"), "strategy.budget_scope"),
    ],
)
def test_bad_strategy_fields_are_config_errors(
    overrides: tuple[str, ...], field: str, tiny_cfg: Callable[..., DictConfig]
) -> None:
    with pytest.raises(ConfigError) as raised:
        validate(tiny_cfg(*overrides), cuda_available=False)
    assert raised.value.field_name == field


# --- records -------------------------------------------------------------------------------


@pytest.mark.slow
def test_offload_on_the_cpu_is_recorded_not_applicable_with_its_reason(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    run_job(tiny_cfg("strategy=offload", "device=cpu"), tmp_path, {})
    record = read_result(tmp_path)
    assert record.status == STATUS_NOT_APPLICABLE
    assert "host memory already" in record.message
    assert record.peak_bytes is None and record.step_ms_median is None


@pytest.mark.slow
def test_bf16_is_applied_and_recorded(
    tiny_cfg: Callable[..., DictConfig], tiny_spec: SpecFn, tmp_path: Path
) -> None:
    """The record says bf16, and autocast really ran: the activations saved are smaller."""
    run_job(tiny_cfg("strategy=selective", "precision=bf16", "measure.repeat=1"), tmp_path, {})
    record = read_result(tmp_path)
    assert (record.status, record.precision, record.strategy) == (STATUS_OK, "bf16", "selective")
    spec = tiny_spec("strategy=selective")
    work = build_workload(spec, make_plan(spec), "cpu")
    with counting_saved_bytes(work.model) as saved_so_far:
        forward_loss(work, in_place=True)
        fp32_saved = saved_so_far()
    assert record.saved_activation_bytes < fp32_saved


@pytest.mark.parametrize("name", ["none", "full", "sqrt", "selective", "every_n", "op"])
def test_a_strategy_plans_once_and_measures_once(name: str, tiny_spec: SpecFn) -> None:
    spec = tiny_spec(f"strategy={name}")
    measured: list[CheckpointPlan] = []
    outcome = STRATEGIES[name].execute(spec, measured.append)
    assert measured == [make_plan(spec)]
    assert outcome == Outcome()
