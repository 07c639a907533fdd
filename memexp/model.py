"""The transformer under study, and the one place a CheckpointPlan is executed.

The layer is the seed's: a pre-LayerNorm attention sub-block (QKV projection, the explicit
softmax(QKᵀ/√d)·V that materialises the seq×seq scores, output projection, residual) and a
pre-LayerNorm FFN sub-block (hidden→ffn, GELU, ffn→hidden, residual). As in the seed no linear
layer has a bias; `bias: true` gives the four projections of a layer one, as GPT-2 has (the
vocabulary head stays bias-free). `attention: sdpa` swaps the explicit core for torch's fused
scaled_dot_product_attention. There is no causal mask and no dropout, as in the seed: neither
changes which tensors dominate memory.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import any_torch_dispatch_mode_on_stack
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from memexp.config import ModelConfig
from memexp.plan import LAYER, CheckpointPlan, CompiledForward, Part

if TYPE_CHECKING:
    from memexp.compile_partition import PartitionRecorder

ContextFactory = Callable[[], Any]
# Opens a saved-tensor storage of one kind (memexp.storage, handed in by memexp.training).
StorageContext = Callable[[str], contextlib.AbstractContextManager]

_aten = torch.ops.aten
# The operators of each policy in `memexp.plan.OP_POLICY_NAMES`: the operators whose outputs a checkpointed
# segment keeps; every other operator inside it is recomputed in backward.
OP_POLICIES: dict[str, tuple[Any, ...]] = {
    # Matrix products (linear layers, QKᵀ, ·V) and fused attention are kept: recomputing them
    # is what costs FLOPs. LayerNorm, GELU, softmax, casts and copies are recomputed.
    "save_matmuls": (
        _aten.mm.default,
        _aten.addmm.default,
        _aten.bmm.default,
        _aten._scaled_dot_product_flash_attention.default,
        _aten._scaled_dot_product_efficient_attention.default,
        _aten._scaled_dot_product_cudnn_attention.default,
        _aten._scaled_dot_product_flash_attention_for_cpu.default,
    ),
}


# Operators the selective checkpoint's policy sees but a saved-operator list does not number:
# PyTorch's SAC estimator skips them (`OPS_TO_ALWAYS_SKIP` beyond checkpoint's own
# `SAC_IGNORED_OPS`), so the names `<op>#<n>` it decides on count the same operators.
UNNUMBERED_OPS = frozenset(
    {
        _aten.lift_fresh.default,
        _aten.clone.default,
        torch.ops.profiler._record_function_exit._RecordFunction,
    }
)


class SavedOpsPolicy:
    """Keep the outputs of the operators named `<op>#<occurrence>`, recompute every other one.

    Operators are numbered per name in the order the segment runs them, separately in the
    forward and in the recomputation, so both number an operator alike.
    """

    def __init__(self, saved: frozenset[str]) -> None:
        self.saved = saved
        self.seen: dict[bool, dict[str, int]] = {False: {}, True: {}}

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in UNNUMBERED_OPS:
            return CheckpointPolicy.PREFER_RECOMPUTE
        name = op.overloadpacket.__name__
        counts = self.seen[ctx.is_recompute]
        occurrence = counts.get(name, 0)
        counts[name] = occurrence + 1
        if f"{name}#{occurrence}" in self.saved:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def saved_ops_context(saved: tuple[str, ...]) -> ContextFactory:
    """The `context_fn` of a segment that keeps exactly the operator outputs in `saved`
    (a fresh numbering for every run of the segment)."""
    names = frozenset(saved)
    return lambda: create_selective_checkpoint_contexts(SavedOpsPolicy(names))


def op_policy_context(policy: str | None) -> ContextFactory | None:
    """The `context_fn` that makes a checkpoint selective under `policy` (None: plain checkpoint)."""
    if policy is None:
        return None
    if policy not in OP_POLICIES:
        raise ValueError(f"unknown op policy {policy!r}; known: {', '.join(OP_POLICIES)}")
    return functools.partial(create_selective_checkpoint_contexts, list(OP_POLICIES[policy]))


def run_checkpointed(
    fn: Callable[..., torch.Tensor], *args: Any, context_fn: ContextFactory | None = None
) -> torch.Tensor:
    """Non-reentrant checkpoint with the RNG state preserved, so recomputation is bit-identical."""
    if context_fn is None:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn
    )


@dataclass(frozen=True)
class Recompute:
    """How one unit is recomputed: whole (`context_fn` None) or under an op-level policy's
    selective checkpoint context, which keeps the outputs of the policy's operators."""

    context_fn: ContextFactory | None = None

    def run(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return run_checkpointed(fn, *args, context_fn=self.context_fn)


@dataclass(frozen=True)
class Stored:
    """How one unit is stored: run inside `context` (a storage of memexp.storage), which packs
    what the unit saves for backward its own way."""

    context: Callable[[], contextlib.AbstractContextManager]

    def run(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        with self.context():
            return fn(*args)


# How one layer runs its units: unit name (`memexp.plan.UNITS`) → recomputed how, or (one of
# `memexp.plan.STORABLE_UNITS`) stored how; a unit absent is kept, as made.
LayerUnits = Mapping[str, Recompute | Stored]


def run_unit(unit: Recompute | Stored | None, fn: Callable[..., torch.Tensor], *args: Any) -> Any:
    """`fn(*args)` as `unit` says: recomputed, stored its own way, or (None) kept as made."""
    return fn(*args) if unit is None else unit.run(fn, *args)


def layer_units(plan: CheckpointPlan, layer: int) -> dict[str, Recompute]:
    """The units `plan` recomputes in `layer` (outside its segments), each with how."""
    units = {part.value: Recompute() for part in plan.parts_of(layer)}
    for unit, policy in plan.selective_of(layer).items():
        units[unit] = Recompute(op_policy_context(policy))
    return units


def naive_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def fused_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)


ATTENTION_CORES = {"naive": naive_attention_core, "sdpa": fused_attention_core}


class AttentionBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, kind: str, bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=bias)
        self.out = nn.Linear(hidden, hidden, bias=bias)
        self.core = ATTENTION_CORES[kind]

    def forward(self, x: torch.Tensor, core: Recompute | Stored | None = None) -> torch.Tensor:
        batch, seq, hidden = x.shape
        qkv = self.qkv(self.norm(x)).view(batch, seq, 3, self.heads, hidden // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        context = self.core(q, k, v) if core is None else core.run(self.core, q, k, v)
        context = context.transpose(1, 2).reshape(batch, seq, hidden)
        return x + self.out(context)


class FeedForwardBlock(nn.Module):
    def __init__(self, hidden: int, ffn_hidden: int, bias: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.up = nn.Linear(hidden, ffn_hidden, bias=bias)
        self.down = nn.Linear(ffn_hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention = AttentionBlock(cfg.hidden, cfg.heads, cfg.attention, cfg.bias)
        self.ffn = FeedForwardBlock(cfg.hidden, cfg.ffn_hidden, cfg.bias)

    def unit_runs(self, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        """One forward of each recomputable unit of this layer on the residual stream `x` (the
        core on q, k and v of its shape): what recomputing each costs."""
        batch, seq, hidden = x.shape
        head_shape = (batch, self.attention.heads, seq, hidden // self.attention.heads)
        q, k, v = (torch.randn(head_shape, device=x.device, requires_grad=True) for _ in range(3))
        return {
            Part.ATTENTION_CORE.value: lambda: self.attention.core(q, k, v),
            Part.ATTENTION.value: lambda: self.attention(x),
            Part.FFN.value: lambda: self.ffn(x),
            LAYER: lambda: self(x),
        }

    def forward(self, x: torch.Tensor, units: LayerUnits | None = None) -> torch.Tensor:
        """One layer, each unit in `units` recomputed as it says (nothing given: all kept)."""
        units = units or {}
        if LAYER in units:
            return units[LAYER].run(self._blocks, x, {})
        return self._blocks(x, units)

    def _blocks(self, x: torch.Tensor, units: LayerUnits) -> torch.Tensor:
        core = units.get(Part.ATTENTION_CORE.value)
        attention = functools.partial(self.attention, core=core)
        x = run_unit(units.get(Part.ATTENTION.value), attention, x)
        return run_unit(units.get(Part.FFN.value), self.ffn, x)


class PlannedLayers(nn.Module):
    """A stack of decoder layers that executes a CheckpointPlan: the one loop over layers that
    every model's forward runs (the seed's here, the real architectures' in memexp.hf_model).

    A layer is called as `layer(x, units, *inputs)`: `units` are the units the plan recomputes
    in it, each with how (memexp.model.layer_units), `inputs` whatever else the model's layers
    take (a mask, rotary embeddings). A segment runs under one checkpoint, keeping its own
    saved-operator list or else the plan's `op_policy`; a layer the plan stores its own way
    runs inside its storage context; a compiled plan compiles the model's `_forward`.
    """

    layers: nn.ModuleList

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.plan = CheckpointPlan.nothing(num_layers)
        self.context_fns: dict[int, ContextFactory | None] = {}
        self.compiled_forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        # The compiled forward's backend where it records its backward graphs (else None).
        self.partition: PartitionRecorder | None = None
        # How a layer the plan stores its own way stores its saved tensors; the model knows
        # no storage, its workload hands one in (memexp.training.build_workload).
        self.storage_context: StorageContext | None = None

    def apply_plan(self, plan: CheckpointPlan) -> None:
        """Execute `plan` from the next forward on: a segment keeps its own saved-operator list,
        else runs under the plan's `op_policy`; a compiled plan compiles the forward (lazily, at
        its first call)."""
        if plan.num_layers != len(self.layers):
            raise ValueError(f"plan is for {plan.num_layers} layers, model has {len(self.layers)}")
        self.plan = plan
        policy = op_policy_context(plan.op_policy)
        self.context_fns = {}
        for start, _ in plan.segments:
            saved = plan.saved_ops_of(start)
            self.context_fns[start] = policy if saved is None else saved_ops_context(saved)
        self.compiled_forward, self.partition = None, None
        if plan.compiled is not None:
            # Imported here: torch's compiler stack takes seconds to import.
            from memexp.compile_partition import compile_backend

            backend = compile_backend(plan.compiled)
            # Every model's `_forward` is one code object to dynamo: a second model would be a
            # recompile of the first, with shapes made dynamic from then on, and past its
            # recompile limit the frame silently runs eagerly. So each compiled plan compiles
            # afresh, for the job's own static shapes.
            torch._dynamo.reset()
            self.compiled_forward = torch.compile(self._forward, backend=backend, dynamic=False)
            self.partition = None if isinstance(backend, str) else backend

    def layer_inputs(self, x: torch.Tensor) -> tuple[Any, ...]:
        """What every layer takes besides the residual stream `x` (none for the seed's)."""
        return ()

    def unit_runs(self, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        """One forward of each recomputable unit (memexp.plan's parts and a whole layer) of the
        first layer on the residual stream `x`: what the adaptive strategy records it costs."""
        return self.layers[0].unit_runs(x, *self.layer_inputs(x))

    def _layer_storage(self, index: int) -> contextlib.AbstractContextManager:
        kind = self.plan.storage_of(index)
        if kind is None:
            return contextlib.nullcontext()
        if self.storage_context is None:
            raise RuntimeError(f"layer {index} is stored as {kind}, and no storage was given")
        return self.storage_context(kind)

    def _units_stored(self, index: int) -> dict[str, Stored]:
        """The units of layer `index` the plan stores their own way, each in its storage."""
        kinds = self.plan.units_stored_in(index)
        if not kinds:
            return {}
        storage = self.storage_context
        if storage is None:
            raise RuntimeError(f"layer {index} stores units, and no storage was given")
        return {unit: Stored(functools.partial(storage, kind)) for unit, kind in kinds.items()}

    def _run_layers(self, x: torch.Tensor, start: int, end: int, *inputs: Any) -> torch.Tensor:
        for index in range(start, end):
            x = self.layers[index](x, None, *inputs)
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The compiled forward where the plan has one, except under a TorchDispatchMode that
        does not let compiled code run under it (fake tensors, the FLOP counter): torch.compile
        would run the frame eagerly there, and a compile attempted under fake tensors can leave
        the frame marked to run eagerly for the rest of the process. The tensor tracker lets
        compiled code run where the backend's graphs run operator by operator
        (memexp.compile_partition), and so measures the compiled step."""
        if (
            self.compiled_forward is None
            or self.plan.compiled is None
            or any_torch_dispatch_mode_on_stack()
        ):
            return self._forward(tokens)
        with compile_memory_budget(self.plan.compiled):
            return self.compiled_forward(tokens)

    def _forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens to logits: the model's embeddings, every layer as the plan says, its final norm
        and head.

        The residual stream is one name, rebound layer by layer in this frame: no reference
        outlives the layer that takes it, so a layer that keeps no copy of its input (stored in
        another format, or recomputed from elsewhere) frees it as soon as it returns, the first
        layer's as any other's. The peak model profiles a layer in the middle of the stack and
        counts on that.
        """
        x = self.embed(tokens)
        inputs = self.layer_inputs(x)
        index = 0
        while index < len(self.layers):
            segment = self.plan.segment_starting_at(index)
            if segment is not None:
                context_fn = self.context_fns[segment[0]]
                x = run_checkpointed(self._run_layers, x, *segment, *inputs, context_fn=context_fn)
                index = segment[1]
            else:
                units = {**layer_units(self.plan, index), **self._units_stored(index)}
                with self._layer_storage(index):
                    x = self.layers[index](x, units, *inputs)
                index += 1
        return self.head(self.norm(x))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens to the residual stream the first layer takes."""
        raise NotImplementedError


class Transformer(PlannedLayers):
    """Token + learned position embeddings, L layers, final LayerNorm, untied bias-free head.

    `cfg` is a validated spec's model: its `max_seq_len` is the resolved number of positions.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg.layers)
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position_embedding = nn.Embedding(cfg.max_seq_len, cfg.hidden)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.token_embedding(tokens) + self.position_embedding(positions)


def compile_memory_budget(compiled: CompiledForward) -> Any:
    """The partitioner's activation memory budget while a compiled forward runs: torch.compile
    partitions forward and backward at the first call, so the setting must hold then."""
    from torch._functorch import config as functorch_config

    return functorch_config.patch(activation_memory_budget=compiled.activation_memory_budget)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
