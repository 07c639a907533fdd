"""torch.compile's partition as memexp records, prices and watches it (memexp.compile_partition).

Every test compiles (seconds each), so all are slow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch._functorch import config as functorch_config
from torch.utils._python_dispatch import TorchDispatchMode

from memexp.compile_partition import PartitionRecorder
from memexp.config import ExperimentSpec
from memexp.measure.flops import CompiledRecompute, compiled_recompute
from memexp.measure.saved import counting_saved_bytes
from memexp.measure.tracker import TensorTracker
from memexp.model import compile_memory_budget
from memexp.plan import CheckpointPlan, CompiledForward
from memexp.training import backward, build_workload, forward_loss, train_step

SpecFn = Callable[..., ExperimentSpec]
LAYERS = 3
pytestmark = pytest.mark.slow


def compiled_plan(fraction: float) -> CheckpointPlan:
    return CheckpointPlan(LAYERS, compiled=CompiledForward("aot_eager_decomp_partition", fraction))


def test_recomputed_nodes_are_priced_on_the_roofline_formula() -> None:
    """sin(x @ w).sum() at budget 0 saves x and w and recomputes x @ w in the backward (for
    cos(x @ w)); at budget 1 it saves x @ w. By hand, at 2 TFLOP/s and 200 GB/s: the matmul is
    2·64·32·32 = 131,072 FLOPs (65,536 ps) and moves (64·32 + 32·32 + 64·32)·4 = 20,480 bytes
    (102,400 ps), so it takes 102,400 ps."""
    priced: dict[float, CompiledRecompute] = {}
    for budget in (0.0, 1.0):
        torch._dynamo.reset()
        recorder = PartitionRecorder()
        function = torch.compile(lambda x, w: torch.sin(x @ w).sum(), backend=recorder)
        x = torch.randn(64, 32, requires_grad=True)
        w = torch.randn(32, 32, requires_grad=True)
        with functorch_config.patch(activation_memory_budget=budget):
            function(x, w).backward()
        priced[budget] = compiled_recompute(recorder, (2.0, 200.0))
    assert priced[0.0] == CompiledRecompute(operators=1, flops=131_072, picoseconds=102_400)
    assert priced[1.0] == CompiledRecompute(operators=0, flops=0, picoseconds=0)


def test_at_budget_zero_the_backward_recomputes_every_layers_forward_matmuls(
    tiny_spec: SpecFn,
) -> None:
    """Saving as little as it can, the partitioner keeps the layers' inputs too and recomputes
    the residual stream: every matrix product of every layer's forward runs again, the head's
    not (the logits are the compiled forward's output). The seed layer's forward matmul FLOPs,
    with T = batch·seq tokens, h hidden, f FFN, n heads of d: 2·T·(3h² + h² + 2hf) for the
    projections and 2·(2·batch·n·seq²·d) for QKᵀ and ·V."""
    spec = tiny_spec(f"model.layers={LAYERS}")
    model = spec.model
    tokens = spec.batch_size * spec.seq_len
    hidden, ffn, heads = model.hidden, model.ffn_hidden, model.heads
    projections = 2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn)
    attention = 2 * 2 * spec.batch_size * heads * spec.seq_len**2 * (hidden // heads)
    work = build_workload(spec, compiled_plan(0.0), "cpu")
    train_step(work)
    assert work.partition is not None
    recompute = compiled_recompute(work.partition, spec.roofline_rates)
    assert recompute.flops == LAYERS * (projections + attention)


def test_the_recorder_partitions_as_pytorchs_own_backend(tiny_spec: SpecFn) -> None:
    """The recorder is PyTorch's `aot_eager_decomp_partition` put together from the same parts:
    at the same budget the compiled forward saves the same bytes, and the step computes the
    same loss and bit-identical gradients."""
    spec = tiny_spec(f"model.layers={LAYERS}")
    plan = compiled_plan(0.3)
    steps = {}
    for backend in ("recorder", "aot_eager_decomp_partition"):
        torch._dynamo.reset()
        work = build_workload(spec, plan, "cpu")
        if backend != "recorder":
            work.model.compiled_forward = torch.compile(work.model._forward, backend=backend)
        with counting_saved_bytes(work.model) as saved, compile_memory_budget(plan.compiled):
            loss = forward_loss(work, in_place=True)
        backward(loss)
        grads = {name: p.grad for name, p in work.model.named_parameters()}
        steps[backend] = (saved(), float(loss.detach()), grads)
    (ours_saved, ours_loss, ours), (their_saved, their_loss, theirs) = steps.values()
    assert ours_saved == their_saved > 0
    assert ours_loss == their_loss
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)


class OperatorLog(TorchDispatchMode):
    """Writes down every operator run inside it, compiled code's included."""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __init__(self) -> None:
        super().__init__()
        self.operators: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.operators.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_tracker_watches_every_compiled_operator_and_changes_none(tiny_spec: SpecFn) -> None:
    """Under the tensor tracker the compiled step runs compiled, the tracker sees each of its
    operators, and the step runs exactly the operators it runs untracked: in particular autograd
    takes the gradients the compiled backward returns instead of copying them, which a
    multi-grad hook on the logits would make it do."""
    spec = tiny_spec(f"model.layers={LAYERS}")
    plan = compiled_plan(0.3)
    work = build_workload(spec, plan, "cpu")
    train_step(work)  # compiles forward and backward, and makes the optimizer's state
    logs = {}
    for tracked in (False, True):
        tracker = TensorTracker(
            work.tokens.device, work.model, work.optimizer, work.tokens, work.targets, compiled=True
        )
        with tracker if tracked else contextlib.nullcontext(), OperatorLog() as log:
            backward(forward_loss(work))
        work.optimizer.zero_grad(set_to_none=True)
        logs[tracked] = log.operators
        if tracked:
            assert len(tracker.result().timeline) == len(log.operators)
    assert logs[True] == logs[False]
    assert "aten.new_empty_strided.default" not in logs[True]  # no gradient is copied
    assert len(work.partition.backward_graphs) == 1  # nothing recompiled under the tracker


def test_every_compiled_plan_compiles_afresh_for_its_own_static_shapes(tiny_spec: SpecFn) -> None:
    """Every model's forward is one code object to dynamo, so one process (a sweep, this test
    session) compiling several would recompile it: with shapes made dynamic after the first,
    and past the recompile limit (here 1) running eagerly. Each compiled plan compiles afresh
    instead, so every job's step is compiled, for its own shapes."""
    with torch._dynamo.config.patch(recompile_limit=1):
        for seq in (16, 12, 8):
            spec = tiny_spec(f"model.layers={LAYERS}", f"seq.len={seq}")
            work = build_workload(spec, compiled_plan(0.3), "cpu")
            train_step(work)
            assert work.partition is not None
            (graph,) = work.partition.backward_graphs
            shapes = [
                node.meta["val"].shape
                for node in graph.graph.find_nodes(op="placeholder")
                if isinstance(node.meta.get("val"), torch.Tensor)
            ]
            assert all(isinstance(size, int) for shape in shapes for size in shape)
            assert any(seq in shape for shape in shapes)
