"""The deterministic figures: saved-activation bytes against the hand derivation, recompute FLOPs.

Saved bytes are compared with `memexp.analytic`, whose every term is derived from the model's
code (see its docstring), at two shapes whose dimensions are all different, so no term can stand
in for another. The FLOPs a plan adds must be exactly the forward FLOPs of what it reruns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch.utils.checkpoint

from memexp import analytic
from memexp.config import ConfigError, ExperimentSpec
from memexp.measure.flops import count_flops, fake_workload, step_flops
from memexp.measure.memory import measure_memory
from memexp.measure.timing import first_step
from memexp.plan import CheckpointPlan, Part
from memexp.results import SCOPE_FORWARD_BACKWARD, SCOPE_STEP
from memexp.strategies import make_plan
from memexp.training import build_workload, forward_loss, train_step

SpecFn = Callable[..., ExperimentSpec]

# Two workloads with b, s, h, a, f, V and L all distinct (and d = h/a distinct from them too).
SHAPES = {
    "b3 s5 h12 a3 f20 V11 L3": (
        "batch.size=3", "seq.len=5", "model.hidden=12", "model.heads=3",
        "model.ffn_hidden=20", "model.vocab_size=11", "model.layers=3",
    ),
    "b2 s7 h16 a2 f24 V13 L5": (
        "batch.size=2", "seq.len=7", "model.hidden=16", "model.heads=2",
        "model.ffn_hidden=24", "model.vocab_size=13", "model.layers=5",
    ),
}  # fmt: skip
STRATEGIES = {
    "none": ("strategy=none",),
    "full layer": ("strategy=full", "strategy.granularity=layer"),
    "full sublayer": ("strategy=full", "strategy.granularity=sublayer"),
    "sqrt": ("strategy=sqrt",),
}


def measured_saved_bytes(spec: ExperimentSpec, plan: CheckpointPlan) -> int:
    """Counted as a job counts them: in its first step, under the plan's storage."""
    return first_step(build_workload(spec, plan, "cpu"))[1]


@pytest.mark.parametrize("attention", ["naive", "sdpa"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_saved_bytes_equal_the_closed_form(
    shape: str, strategy: str, attention: str, tiny_spec: SpecFn
) -> None:
    spec = tiny_spec(*SHAPES[shape], *STRATEGIES[strategy], f"model.attention={attention}")
    plan = make_plan(spec)
    assert measured_saved_bytes(spec, plan) == analytic.saved_activation_bytes(spec, plan)


def mixed_plan(layers: int, storage: str = "keep") -> CheckpointPlan:
    """Each Part once and a one-layer segment at the end (from 5 layers on, a plain layer too)."""
    parts = ((0, Part.ATTENTION_CORE), (1, Part.ATTENTION), (1, Part.FFN), (2, Part.FFN))
    return CheckpointPlan(layers, segments=((layers - 1, layers),), parts=parts, storage=storage)


@pytest.mark.parametrize("storage", ["keep", "host", "disk"])
def test_saved_bytes_of_parts_equal_the_closed_form(storage: str, tiny_spec: SpecFn) -> None:
    """Offloading moves saved tensors, it does not change them: counted where they are made."""
    spec = tiny_spec(*SHAPES["b2 s7 h16 a2 f24 V13 L5"])
    plan = mixed_plan(spec.model.layers, storage)
    assert measured_saved_bytes(spec, plan) == analytic.saved_activation_bytes(spec, plan)


def test_closed_form_for_the_tiny_model_by_hand(tiny_spec: SpecFn) -> None:
    """b=2, s=16, h=32, a=4, f=128, V=128, L=4, worked out on paper."""
    # outside the layers: ids 2·16·8=256, positions 16·8=128, final norm (1024+64)·4=4352,
    # head input 1024·4=4096, log-softmax 4096·4=16384, targets 256, total_weight 4
    outside = 256 + 128 + 4352 + 4096 + 16384 + 256 + 4
    assert outside == 25476
    residual = 2 * 16 * 32 * 4  # one checkpoint input: 4096
    # a layer: 8 b·s·h tensors, 4 b·s norm statistics, a·b·s² probabilities, 2 b·s·f for GELU
    layer = 8 * 4096 + 4 * 32 * 4 + 4 * 2 * 16 * 16 * 4 + 2 * 2 * 16 * 128 * 4
    assert layer == 74240
    expected = {
        "none": outside + 4 * layer,
        "full layer": outside + 4 * residual,
        "full sublayer": outside + 8 * residual,
        "sqrt": outside + 2 * residual,  # ⌈√4⌉ = 2 segments
    }
    for strategy, overrides in STRATEGIES.items():
        spec = tiny_spec(*overrides)
        assert analytic.saved_activation_bytes(spec, make_plan(spec)) == expected[strategy]


def test_closed_form_refuses_reduced_precision(tiny_spec: SpecFn) -> None:
    spec = tiny_spec("precision=bf16")
    with pytest.raises(ConfigError) as error:
        analytic.saved_activation_bytes(spec, make_plan(spec))
    assert error.value.field_name == "precision"


def test_closed_form_refuses_op_level_policies(tiny_spec: SpecFn) -> None:
    spec = tiny_spec()
    plan = CheckpointPlan(4, segments=((0, 4),), op_policy="save_matmuls")
    with pytest.raises(ConfigError, match=r"plan\.op_policy='save_matmuls'"):
        analytic.saved_activation_bytes(spec, plan)


def forward_flops_by_module(spec: ExperimentSpec) -> dict[str, int]:
    """Forward-only FLOPs of every module (fully qualified name), counted without checkpoints."""
    mode, work = fake_workload(spec, CheckpointPlan.nothing(spec.model.layers))
    with mode:
        counter = count_flops(lambda: forward_loss(work))
    return {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()}


@dataclass(frozen=True)
class Baseline:
    """What no checkpointing costs for one workload: the whole step, and each module's forward."""

    step_flops: int
    forward: dict[str, int]

    @classmethod
    def of(cls, spec: ExperimentSpec) -> Baseline:
        nothing = CheckpointPlan.nothing(spec.model.layers)
        return cls(step_flops(spec, nothing), forward_flops_by_module(spec))

    def layers_forward(self, layers: int) -> int:
        return sum(self.forward[f"Transformer.layers.{i}"] for i in range(layers))

    def rerun_flops(self, plan: CheckpointPlan) -> int:
        """Forward FLOPs of every checkpointed region up to, not including, its last matmul.

        Non-reentrant checkpointing stops recomputing as soon as backward has every tensor it
        needs (PyTorch's checkpoint early stop, on by default). A region's last matmul saves only
        its inputs, which autograd packs before the matmul runs, so that matmul is never rerun:
        the FFN's down projection, the attention block's output projection, the core's probs·V.
        """
        forward, total = self.forward, 0
        for start, end in plan.segments:
            total += sum(forward[f"Transformer.layers.{i}"] for i in range(start, end))
            total -= forward[f"Transformer.layers.{end - 1}.ffn.down"]
        for layer, part in plan.parts:
            block = f"Transformer.layers.{layer}.{'ffn' if part is Part.FFN else 'attention'}"
            if part is Part.FFN:
                total += forward[block] - forward[f"{block}.down"]
            elif part is Part.ATTENTION:
                total += forward[block] - forward[f"{block}.out"]
            else:  # the core is QKᵀ and probs·V, two batched matmuls of equal FLOPs: QKᵀ reruns
                core = forward[block] - forward[f"{block}.qkv"] - forward[f"{block}.out"]
                total += core // 2
        return total


@pytest.fixture(scope="module")
def tiny_baseline(tiny_spec: SpecFn) -> Baseline:
    """The tiny model's baseline; every strategy of the same workload shares it."""
    return Baseline.of(tiny_spec())


@pytest.mark.parametrize(
    "overrides",
    [
        ("strategy=full",),
        pytest.param(("strategy=full", "strategy.granularity=sublayer"), marks=pytest.mark.slow),
        ("strategy=sqrt",),
        pytest.param(("strategy=sqrt", "strategy.segments=3"), marks=pytest.mark.slow),
    ],
    ids=" ".join,
)
def test_recompute_flops_are_each_regions_forward_but_its_last_matmul(
    overrides: tuple[str, ...], tiny_spec: SpecFn, tiny_baseline: Baseline
) -> None:
    spec = tiny_spec(*overrides)
    plan = make_plan(spec)
    recompute = step_flops(spec, plan) - tiny_baseline.step_flops
    assert recompute == tiny_baseline.rerun_flops(plan)
    assert 0 < recompute < tiny_baseline.layers_forward(spec.model.layers)


@pytest.mark.slow
def test_without_early_stop_recomputation_is_one_full_forward_of_the_layers(
    tiny_spec: SpecFn, tiny_baseline: Baseline
) -> None:
    spec = tiny_spec("strategy=full")
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        recompute = step_flops(spec, make_plan(spec)) - tiny_baseline.step_flops
    assert recompute == tiny_baseline.layers_forward(spec.model.layers)


@pytest.mark.slow
def test_recompute_flops_of_parts_are_their_forward(
    tiny_spec: SpecFn, tiny_baseline: Baseline
) -> None:
    spec = tiny_spec()
    plan = mixed_plan(spec.model.layers)
    assert step_flops(spec, plan) - tiny_baseline.step_flops == tiny_baseline.rerun_flops(plan)


# --- the two peaks -------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["none", "full sublayer"])
def test_the_step_peak_is_the_higher_of_the_fwd_bwd_peak_and_the_optimizer_steps(
    strategy: str, tiny_spec: SpecFn
) -> None:
    """The tracker's whole-step peak, taken by itself, is the highest of its phase peaks; the
    fwd+bwd peak leaves the optimizer step out, and `peak_in` names both scopes."""
    spec = tiny_spec(*STRATEGIES[strategy], "model.layers=3")
    work = build_workload(spec, make_plan(spec), "cpu")
    train_step(work)  # the optimizer's state exists, as in every memory step
    memory = measure_memory(work)
    phases = memory.phase_bytes
    fwd_bwd = max(phases["forward_peak"], phases["backward_peak"])
    assert memory.forward_backward_peak_bytes == fwd_bwd
    assert memory.peak_bytes == max(fwd_bwd, phases["optimizer_peak"])
    assert memory.peak_in(SCOPE_STEP) == memory.peak_bytes
    assert memory.peak_in(SCOPE_FORWARD_BACKWARD) == fwd_bwd
