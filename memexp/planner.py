"""The adaptive planner: profile what each recomputation option costs and saves, predict the
step's peak for any per-layer plan, and find the plan of least recompute time within a budget
exactly.

Units and options. In every layer a plan may recompute the attention core (QKᵀ, softmax, ·V),
the attention sub-block, the FFN sub-block or the whole layer, each either whole or
element-wise (`unit@save_matmuls`: a selective checkpoint context that keeps the outputs of
matrix products and fused attention and recomputes only LayerNorm, softmax, GELU, casts and
copies). A unit excludes its own sub-units, so one layer has 17 options (`OPTIONS`): the
attention side kept, its core or its block recomputed whole or element-wise (5 ways), times
the FFN block kept, recomputed whole or element-wise (3 ways), plus the whole layer recomputed
whole or element-wise. Every fixed strategy's layer is one of them: `op`'s is
`layer@save_matmuls`, `full`'s `layer` (or `attention+ffn`), `selective`'s a single unit.
Inside a unit, the whole layer may also be recomputed keeping a chosen set of its operators'
outputs (`layer@keep:mm#0,bmm#1`; `CheckpointPlan.saved_ops`), one option per set that
memexp.operator_choices offers (the Pareto frontier of bytes kept and recompute time saved):
the choices PyTorch's own ILP makes per layer, mixed freely across layers here.
Given storage kinds (`layer_options`), every option that still saves tensors (all but
the whole layer recomputed) is offered again per kind: `+saved:int8`, what the layer saves
stored that way (memexp.storage; `CheckpointPlan.stored`), compressed on the device or
offloaded to host memory or disk; and `+saved:int8@attention` (or `@attention_core`, `@ffn`),
what one unit it does not recompute saves stored that way and the rest kept
(`CheckpointPlan.stored_units`).

Profile. All layers are identical, so one layer per option tells everything: a model of 17
layers (more with operator choices and storage kinds), layer i under option i, runs one forward
and backward on fake tensors (no compute)
under the project's tensor tracker, and phase marks from module and gradient hooks cut its
timeline into the embedding, each layer's forward, the head's forward (norm, vocabulary
projection, loss), the head's backward, each layer's backward and the embedding's backward.
Per option this gives, in bytes relative to the memory when that layer's phase begins:

    kept      net growth over the layer's forward
    cache     of the kept bytes, those freed when the forward ends: bf16 weight copies the
              autocast cache holds and nothing saved (0 in fp32)
    held      kept − cache: what the layer holds from the end of the forward to its backward
    fwd peak  the highest point inside its forward (its temporaries included)
    bwd peak  the highest point inside its backward: recomputed tensors, gradient temporaries,
              its weight gradients as they appear

and, from a second pass under the FLOP counter, the extra FLOPs of its backward (the
recomputation; non-reentrant checkpointing stops recomputing once every saved tensor is
back, so a unit's last matmul, whose output nothing inside it saves, is not redone). After its
backward a layer leaves only its weight gradients (g bytes), whatever it recomputed.

Cost. The solver minimises recompute time, not FLOPs: an element-wise recomputation costs no
matmul FLOPs but reads and writes its tensors, and softmax, GELU and LayerNorm are
memory-bound. Each option's cost is the time its forward and backward take beyond those of
the layer that recomputes nothing (a storage packs in the forward and unpacks in the
backward), from one of two sources (`StepProfile.cost_source`):

    roofline  the second pass prices every operator at max(FLOPs / peak rate, bytes moved /
              memory rate) (memexp.measure.flops.RooflineClock; views move nothing), with
              `device.peak_tflops` and `device.memory_gbps`, else the imagined device's rates
              (memexp.config.ROOFLINE_DEFAULTS): deterministic, the fake device's source
    measured  one layer at the job's shapes, its forward and backward timed on the job's
              device under each option (`with_measured_costs`: median of repeats, interleaved,
              less the layer that recomputes nothing; a difference inside the timing noise is
              priced on the roofline, scaled by the resolved options' measured / roofline ratio)

On the roofline an offloading option also pays its transfers: the bytes it takes off the
device (what it holds less than the same option kept), out and back, over `device.host_gbps`
or `device.disk_gbps` (`StepProfile.with_transfers`); measured, they are in the timing.

Peak model. A plan is one option per layer, o_0 … o_{L-1}. With S the resting memory
(parameters, optimizer state, batch: `memexp.analytic`), K_i and H_i what the layers before i
keep and hold, K and H what all layers keep and hold, the step's memory passes through these
highest points:

    embedding forward      S + emb_peak
    forward of layer i     S + M0 + K_i + fwd_peak(o_i)
    head forward           S + M0 + K + head_fwd_peak
    head backward          S + M0 + H + head_fwd_net + head_bwd_peak
    backward of layer i    S + M0 + head_fwd_net + head_bwd_net + H_i + held(o_i)
                             + (L-1-i)·g + bwd_peak(o_i)
    embedding backward     S + M0 + head_fwd_net + head_bwd_net + L·g + emb_bwd_peak
    optimizer step         parameters + gradients + optimizer state + batch + the step's
                           scratch (`memexp.analytic`, per-tensor loop on the CPU, foreach on CUDA)

(M0: what the embedding leaves for layer 0; head_fwd_net: the head's own change over its
forward, the layers' cache aside.) So the tracker's peak holds, besides the kept activations,
the logits, log-softmax and their gradient in the head's phases, each layer's backward
temporaries and recomputed tensors, and the weight gradients made so far: by the time layer i
is recomputed the layers above it have freed their activations and made their gradients, which
is why the model is positional rather than "all kept activations plus the largest recomputed
unit plus all gradients" (an upper bound that would buy needless recomputation). On the CPU the
prediction equals the tensor tracker's measurement byte for byte (tests check it, fp32 and
bf16, explicit and fused attention); on a GPU the allocator rounds and caches and the kernels
differ from the CPU's the profile ran, so the adaptive strategy measures every plan and
re-plans.

Solver. Minimise the recompute time subject to every highest point being within the budget:
a dynamic program over the layers whose state is what the layers so far keep and hold. A
partial plan is dropped only when another keeps and holds no more, costs no more time and
(at equal time) has no higher peak so far: every later constraint grows with kept and held
bytes, so the optimum is never lost and the result is exact, as an exhaustive search over all
17^3 plans of a 3-layer model confirms in the tests. Sorted by kept bytes, the undominated
partial plans are found with a staircase of (held, cost) and bisection, and options another
option beats in every figure (kept, held, forward peak, held + backward peak, cost) are never
extended, so 32 layers solve in well under a second of CPU (scripts/bench_solver.py). Ties go
to the lower predicted peak. `leanest` first finds the lowest reachable peak the same way
(dominance on bytes and peak), then the cheapest plan at that peak.

Scope. The budget holds the highest point over one of two scopes (memexp.results.PEAK_FIELDS):
`step`, every point above, or `forward_backward`, every point but the optimizer step's, which
no plan changes and which (Adam's scratch, in fp32) can set the whole step's peak whatever the
plan. `predict` names every point, so it gives both peaks of a plan.
"""

from __future__ import annotations

import bisect
import functools
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from operator import itemgetter
from typing import Any, NamedTuple

import torch

from memexp import analytic, sharded_states
from memexp.config import ExperimentSpec
from memexp.measure.flops import RooflineClock, fake_workload, flop_counter
from memexp.measure.saved import counting_saved_bytes
from memexp.measure.timing import time_layer_steps
from memexp.memo import cached
from memexp.model import Recompute, Stored, layer_units, saved_ops_context
from memexp.operator_choices import kept_output_choices
from memexp.plan import LAYER, STORABLE_UNITS, UNITS, CheckpointPlan, Part
from memexp.results import SCOPE_FORWARD_BACKWARD, SCOPE_STEP
from memexp.storage import saved_tensor_storage
from memexp.training import Workload, backward, forward_loss

LayerOption = tuple[str, ...]  # how one layer runs: tokens (`unit_token`, `storage_token`)
# The op-level policy of a unit recomputed element-wise: matrix products keep their outputs.
ELEMENTWISE = "save_matmuls"
SELECTIVE_MARK = "@"  # `ffn@save_matmuls`: the FFN block recomputed under that op policy
# `layer@keep:mm#0,mm#2`: the whole layer recomputed, keeping those operators' outputs
KEEP_MARK = "keep:"
STORAGE_MARK = "saved:"  # `saved:int8`: what the layer still saves, stored as int8
# `saved:int8@attention`: what the attention block saves, stored as int8 (the rest as made)
OFFLOADS = ("host", "disk")  # the storage kinds that move bytes over a link (memexp.storage)


def unit_token(unit: str, policy: str | None = None) -> str:
    """A unit recomputed whole (`ffn`) or under an op-level policy (`ffn@save_matmuls`)."""
    return unit if policy is None else f"{unit}{SELECTIVE_MARK}{policy}"


def kept_outputs_token(names: Sequence[str]) -> str:
    """The whole layer recomputed, keeping the outputs of the operators `names` (`mm#0`, …:
    memexp.model.SavedOpsPolicy's numbering) and recomputing every other one."""
    return unit_token(LAYER, KEEP_MARK + ",".join(names))


def keeps_chosen_outputs(option: LayerOption) -> bool:
    """Whether `option` recomputes the whole layer keeping its own set of operator outputs."""
    return any(token.startswith(unit_token(LAYER, KEEP_MARK)) for token in option)


def storage_token(kind: str) -> str:
    """The layer's saved tensors stored as `kind` (memexp.storage), whatever it recomputes."""
    return f"{STORAGE_MARK}{kind}"


def unit_storage_token(kind: str, unit: str) -> str:
    """The saved tensors of one unit (`memexp.plan.STORABLE_UNITS`) stored as `kind`."""
    return f"{STORAGE_MARK}{kind}{SELECTIVE_MARK}{unit}"


def _storage_kind(option: LayerOption) -> str | None:
    """How `option` stores what it saves, the whole layer's or one unit's, if it does."""
    for token in option:
        if token.startswith(STORAGE_MARK):
            return token.removeprefix(STORAGE_MARK).partition(SELECTIVE_MARK)[0]
    return None


def _unit_options() -> tuple[LayerOption, ...]:
    """Every way to recompute one layer's units, the seven whole-unit options first.

    The attention side is kept, its core or its block recomputed, whole or element-wise; the
    FFN side likewise; or the whole layer, whole or element-wise (which is `op`'s layer).
    """
    core, attention, ffn = (p.value for p in (Part.ATTENTION_CORE, Part.ATTENTION, Part.FFN))
    ways = (None, ELEMENTWISE)
    attention_side = [()] + [(unit_token(u, w),) for u in (core, attention) for w in ways]
    ffn_side = [()] + [(unit_token(ffn, w),) for w in ways]
    blocks = [a + f for a in attention_side for f in ffn_side]
    whole = [(unit_token(LAYER, w),) for w in ways]
    first = [(), (core,), (attention,), (ffn,), (core, ffn), (attention, ffn), (LAYER,)]
    return (*first, *[o for o in blocks + whole if o not in first])


OPTIONS: tuple[LayerOption, ...] = _unit_options()


def layer_options(
    kinds: Sequence[str] = (), kept_outputs: Sequence[Sequence[str]] = ()
) -> tuple[LayerOption, ...]:
    """`OPTIONS`; then the whole layer recomputed keeping each of `kept_outputs` (lists of
    operator outputs, memexp.operator_choices); then each option that keeps something in saved
    tensors (not the whole layer recomputed: a checkpoint keeps only its input, and a kept
    operator output sits in the checkpoint's own cache) with that stored as each of `kinds`:
    the whole layer's, then each storable unit's that it does not recompute, the rest kept."""
    stored = []
    for kind in kinds:
        for option in OPTIONS:
            recomputed = {token.partition(SELECTIVE_MARK)[0] for token in option}
            if LAYER in recomputed:
                continue
            stored.append((*option, storage_token(kind)))
            stored += [
                (*option, unit_storage_token(kind, unit))
                for unit, containing in STORABLE_UNITS.items()
                if not recomputed & set(containing)
            ]
    keeping = [(kept_outputs_token(names),) for names in kept_outputs]
    return (*OPTIONS, *keeping, *stored)


PROFILE_SOURCE = "tensor_tracker_and_flop_counter_on_fake_tensors"
COST_ROOFLINE = "roofline"  # per operator: max(FLOPs / peak rate, bytes moved / memory rate)
COST_MEASURED = "measured"  # each option's backward timed on the job's device
MEASURED_REPEATS = 5
OPTIMIZER_POINT = "optimizer step"  # the one highest point outside forward and backward
PASSES = ("forward", "backward")


def option_name(option: LayerOption) -> str:
    return "+".join(option) or "nothing"


def option_of(name: str) -> LayerOption:
    """The option `option_name` names (no token holds a `+`)."""
    return () if name == "nothing" else tuple(name.split("+"))


def plan_of(choices: Sequence[LayerOption]) -> CheckpointPlan:
    """The CheckpointPlan that runs layer i under `choices[i]`."""
    segments, parts, selective, stored, stored_units, saved_ops = [], [], [], [], [], []
    for index, option in enumerate(choices):
        for token in option:
            unit, _, policy = token.partition(SELECTIVE_MARK)
            if token.startswith(STORAGE_MARK):
                kind, _, unit = token.removeprefix(STORAGE_MARK).partition(SELECTIVE_MARK)
                if unit:
                    stored_units.append((index, unit, kind))
                else:
                    stored.append((index, kind))
            elif policy.startswith(KEEP_MARK):
                segments.append((index, index + 1))
                names = policy.removeprefix(KEEP_MARK).split(",")
                saved_ops.append((index, tuple(name for name in names if name)))
            elif policy:
                selective.append((index, unit, policy))
            elif unit == LAYER:
                segments.append((index, index + 1))
            else:
                parts.append((index, Part(unit)))
    return CheckpointPlan(
        len(choices),
        segments=tuple(segments),
        parts=tuple(parts),
        selective=tuple(selective),
        stored=tuple(stored),
        stored_units=tuple(stored_units),
        saved_ops=tuple(saved_ops),
    )


def options_of(plan: CheckpointPlan) -> tuple[LayerOption, ...]:
    """Layer i's option in `plan`, for every layer: the inverse of `plan_of`, so that any plan
    built from per-layer units (a fixed strategy's, a peer planner's) can be priced and
    predicted by the same profile as adaptive's own.

    A one-layer segment is the whole layer recomputed: keeping its own list of operator
    outputs if it has one (sac_milp's plans: `layer@keep:…`), whole if that list is empty, else
    under the plan's op policy if it has one (`op`'s plan is `layer@save_matmuls` in every
    layer). ValueError, saying why, for what no layer option expresses: a segment of several
    layers (one checkpoint keeps only its first input), a compiled forward (its partitioner
    decides) or one storage kind for the whole plan.
    """
    if plan.compiled is not None:
        raise ValueError("a compiled forward's recomputation is its partitioner's, not per layer")
    if plan.storage != "keep":
        raise ValueError(f"storage {plan.storage!r} is set for the whole plan, not per layer")
    return tuple(_layer_option(plan, layer) for layer in range(plan.num_layers))


def _layer_option(plan: CheckpointPlan, layer: int) -> LayerOption:
    """Layer `layer`'s option: its units in `UNITS` order, then how it stores what it saves."""
    segment = next(((s, e) for s, e in plan.segments if s <= layer < e), None)
    if segment is not None:
        start, end = segment
        if end - start > 1:
            raise ValueError(f"layers {start}-{end - 1} are recomputed as one checkpoint")
        saved = plan.saved_ops_of(start)
        if saved:
            return (kept_outputs_token(saved),)
        return (unit_token(LAYER, None if saved is not None else plan.op_policy),)
    whole = {part.value for part in plan.parts_of(layer)}
    selective = plan.selective_of(layer)
    units = tuple(
        unit_token(unit, selective.get(unit))
        for unit in UNITS
        if unit in whole or unit in selective
    )
    kind = plan.storage_of(layer)
    if kind is not None:
        return (*units, storage_token(kind))
    stored = plan.units_stored_in(layer)
    return (*units, *(unit_storage_token(stored[u], u) for u in STORABLE_UNITS if u in stored))


# --- profiling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionProfile:
    """One layer under one option: bytes relative to the memory as its phase begins, and FLOPs."""

    kept_bytes: int  # net growth over its forward
    forward_peak_bytes: int
    backward_peak_bytes: int
    cache_bytes: int  # of the kept bytes, those the end of the forward frees (autocast cache)
    recompute_flops: int  # its backward's FLOPs minus those of the same layer recomputing nothing
    recompute_ps: int  # its backward's time minus that of the same layer recomputing nothing

    @property
    def held_bytes(self) -> int:
        """What the layer holds from the end of the forward until its backward."""
        return self.kept_bytes - self.cache_bytes


@dataclass(frozen=True)
class StepProfile:
    """Everything the peak model needs for one job (see the module docstring for the symbols)."""

    layers: int
    options: dict[LayerOption, OptionProfile]
    embedding_peak_bytes: int
    embedding_net_bytes: int  # M0
    head_forward_peak_bytes: int
    head_forward_net_bytes: int  # the head's own change, before the layers' cache is freed
    head_backward_peak_bytes: int
    head_backward_net_bytes: int
    embedding_backward_peak_bytes: int
    layer_gradient_bytes: int  # what every layer leaves after its backward: its weight gradients
    resting_bytes: int  # S: parameters, optimizer state, batch
    gradient_bytes: int
    optimizer_peak_bytes: int
    layer_saved_bytes: int  # saved for backward by a layer recomputing nothing (saved-tensor hooks)
    outside_saved_bytes: int  # saved for backward outside the layers (embeddings, head, loss)
    layer_forward_flops: int
    cost_source: str  # where `recompute_ps` comes from (COST_ROOFLINE or COST_MEASURED, …)

    def cost(self, option: LayerOption) -> int:
        """What the solver minimises: the option's recompute time, in picoseconds."""
        return self.options[option].recompute_ps

    def with_transfers(self, spec: ExperimentSpec) -> StepProfile:
        """Each offloading option's cost plus its transfers, out in the forward and back in the
        backward, of the bytes it takes off the device (what it holds less than the same option
        kept), at `spec.link_gbps`; nothing overlaps them with compute."""
        costs, links = {}, set()
        for option, stats in self.options.items():
            costs[option] = stats.recompute_ps
            kind = _storage_kind(option)
            if kind in OFFLOADS:
                kept = self.options[tuple(t for t in option if not t.startswith(STORAGE_MARK))]
                away = kept.held_bytes - stats.held_bytes
                costs[option] += round(2 * away * 1000 / spec.link_gbps(kind))
                links.add(f"{kind} {spec.link_gbps(kind):g} GB/s")
        if not links:
            return self
        transfers = f"; offloads add 2 × bytes taken off the device over {', '.join(sorted(links))}"
        return self.with_costs(costs, self.cost_source + transfers)

    def with_costs(self, recompute_ps: dict[LayerOption, int], source: str) -> StepProfile:
        """The same profile with each option's recompute time taken from elsewhere."""
        options = {o: replace(s, recompute_ps=recompute_ps[o]) for o, s in self.options.items()}
        return replace(self, options=options, cost_source=source)

    @property
    def _after_head(self) -> int:
        """Memory after the head's backward, less what the layers hold."""
        return (
            self.resting_bytes
            + self.embedding_net_bytes
            + self.head_forward_net_bytes
            + self.head_backward_net_bytes
        )

    def layer_peak(self, index: int, kept: int, held: int, option: LayerOption) -> int:
        """The higher of layer `index`'s forward and backward peaks, given what the layers
        before it keep during the forward (`kept`) and hold into the backward (`held`)."""
        stats = self.options[option]
        forward = self.resting_bytes + self.embedding_net_bytes + kept + stats.forward_peak_bytes
        gradients_above = (self.layers - 1 - index) * self.layer_gradient_bytes
        backward = (
            self._after_head + held + stats.held_bytes + gradients_above + stats.backward_peak_bytes
        )
        return max(forward, backward)

    def head_peak(self, kept: int, held: int) -> int:
        """The head's forward and backward peaks, given what all layers keep and hold."""
        before_head = self.resting_bytes + self.embedding_net_bytes
        return max(
            before_head + kept + self.head_forward_peak_bytes,
            before_head + held + self.head_forward_net_bytes + self.head_backward_peak_bytes,
        )

    def fixed_peaks(self, scope: str = SCOPE_STEP) -> dict[str, int]:
        """The highest points in `scope` no plan changes (the optimizer step's only in `step`)."""
        points = {
            "embedding forward": self.resting_bytes + self.embedding_peak_bytes,
            "embedding backward": self._after_head
            + self.layers * self.layer_gradient_bytes
            + self.embedding_backward_peak_bytes,
        }
        if scope == SCOPE_STEP:
            points[OPTIMIZER_POINT] = self.optimizer_peak_bytes
        return points

    def saved_activation_bytes(self) -> int:
        """Bytes autograd saves for backward under the `none` plan (that job's recorded figure)."""
        return self.outside_saved_bytes + self.layers * self.layer_saved_bytes

    @property
    def static_bytes(self) -> int:
        """Parameters, their gradients, optimizer state and batch: what any step holds."""
        return self.resting_bytes + self.gradient_bytes


@dataclass(frozen=True)
class PeakPrediction:
    """A plan's highest points, named (`forward of layer 3`, `optimizer step`, …), and its cost."""

    points: dict[str, int]
    recompute_flops: int
    recompute_ps: int

    def _in(self, scope: str) -> dict[str, int]:
        if scope == SCOPE_STEP:
            return self.points
        return {name: bytes_ for name, bytes_ in self.points.items() if name != OPTIMIZER_POINT}

    def where_in(self, scope: str) -> str:
        """The point that sets the peak over `scope`."""
        points = self._in(scope)
        return max(points, key=lambda name: points[name])

    def peak_in(self, scope: str) -> int:
        return self.points[self.where_in(scope)]

    @property
    def peak_bytes(self) -> int:
        """The whole step's peak (the record's `peak_bytes`)."""
        return self.peak_in(SCOPE_STEP)

    @property
    def forward_backward_peak_bytes(self) -> int:
        """Forward, loss and backward's peak (the record's `forward_backward_peak_bytes`)."""
        return self.peak_in(SCOPE_FORWARD_BACKWARD)


def predict(profile: StepProfile, choices: Sequence[LayerOption]) -> PeakPrediction:
    """The predicted peaks of a plan by walking the step phase by phase (the solver's reference)."""
    if len(choices) != profile.layers:
        raise ValueError(f"{len(choices)} choices for {profile.layers} layers")
    points = dict(profile.fixed_peaks(SCOPE_STEP))
    now = profile.resting_bytes + profile.embedding_net_bytes
    for index, option in enumerate(choices):
        points[f"forward of layer {index}"] = now + profile.options[option].forward_peak_bytes
        now += profile.options[option].kept_bytes
    points["head forward"] = now + profile.head_forward_peak_bytes
    now += profile.head_forward_net_bytes - sum(profile.options[o].cache_bytes for o in choices)
    points["head backward"] = now + profile.head_backward_peak_bytes
    now += profile.head_backward_net_bytes
    for index in reversed(range(profile.layers)):
        stats = profile.options[choices[index]]
        points[f"backward of layer {index}"] = now + stats.backward_peak_bytes
        # the layer's held activations go; its weight gradients stay
        now += profile.layer_gradient_bytes - stats.held_bytes
    return PeakPrediction(
        points,
        recompute_flops=sum(profile.options[option].recompute_flops for option in choices),
        recompute_ps=sum(profile.cost(option) for option in choices),
    )


class _PhaseMarks:
    """Calls `mark(name)` as each part of one forward and backward begins.

    Forward phases come from module pre-hooks; backward phases from hooks on the gradients of
    the residual stream between layers (layer i's backward begins when the gradient of its
    output is complete). Module hooks that fire again while a checkpoint recomputes in
    backward are ignored.
    """

    def __init__(self, mark: Callable[[str], None]) -> None:
        self._mark = mark
        self.in_backward = False

    def __call__(self, name: str) -> None:
        self._mark(name)

    @contextmanager
    def installed(self, work: Workload) -> Iterator[None]:
        model = work.model
        handles = [model.norm.register_forward_pre_hook(self._forward_hook("head_forward"))]
        for index, layer in enumerate(model.layers):
            handles.append(layer.register_forward_pre_hook(self._layer_start(index)))
            handles.append(layer.register_forward_hook(self._layer_end(index)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if not self.in_backward:
                self(name)

        return hook

    def _layer_start(self, index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            if self.in_backward:
                return
            self(f"forward:{index}")
            if index == 0:
                args[0].register_hook(lambda grad: self("embedding_backward"))

        return hook

    def _layer_end(self, index: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if not self.in_backward:
                output.register_hook(lambda grad: self(f"backward:{index}"))

        return hook

    def run(self, work: Workload) -> None:
        """One forward and backward of `work`, marked."""
        with self.installed(work):
            self("embedding")
            loss = forward_loss(work)
            self.in_backward = True
            self("head_backward")
            backward(loss)
            del loss
            self("end")


@dataclass
class _Phase:
    start: int
    peak: int
    saved: int  # saved-tensor bytes counted when the phase began


def _memory_phases(work: Workload) -> dict[str, _Phase]:
    """Bytes at each phase's start and its highest point, from the tracker's op-by-op timeline.

    At each mark a zero-byte tensor is made, so the timeline records the memory at the moment
    the phase begins (a tensor freed between two operators shows up only at the next one).
    """
    from memexp.measure.tracker import TensorTracker  # heavy import, needed only when profiling

    tracker = TensorTracker(work.tokens.device, work.model, work.tokens, work.targets)
    saved_at: dict[str, int] = {}
    order: list[str] = []
    with counting_saved_bytes(work.model) as saved_so_far:

        def mark(name: str) -> None:
            order.append(name)
            saved_at[name] = saved_so_far()
            tracker.set_phase(name)
            torch.empty(0)

        with tracker:
            _PhaseMarks(mark).run(work)
    phases: dict[str, _Phase] = {}
    for _, allocated, name in tracker.result().timeline:
        if name not in phases:
            phases[name] = _Phase(start=allocated, peak=allocated, saved=saved_at.get(name, 0))
        phases[name].peak = max(phases[name].peak, allocated)
    return {name: phases[name] for name in order}


def _counts_at_marks(work: Workload, rates: tuple[float, float]) -> dict[str, tuple[int, int]]:
    """FLOPs and roofline picoseconds (at `rates`: peak TFLOP/s, memory GB/s) counted when
    each phase began (a separate pass: the counter's module hooks hold tensors a little
    longer, which the memory pass must not see)."""
    counts: dict[str, tuple[int, int]] = {}
    with flop_counter() as counter, RooflineClock(counter, *rates) as clock:

        def mark(name: str) -> None:
            counts[name] = (counter.get_total_flops(), clock.picoseconds)

        _PhaseMarks(mark).run(work)
    return counts


STEP_PROFILE = "step_profile"  # its name in a sweep's cache (memexp.memo)


def profile_to_data(profile: StepProfile) -> dict[str, Any]:
    """The profile as JSON data: options keyed by their names (`attention_core+ffn`, `nothing`)."""
    data = asdict(profile)
    data["options"] = {option_name(o): asdict(p) for o, p in profile.options.items()}
    return data


def profile_from_data(data: dict[str, Any]) -> StepProfile:
    options = {option_of(name): OptionProfile(**fields) for name, fields in data["options"].items()}
    return StepProfile(**{**data, "options": options})


def profile_step(
    spec: ExperimentSpec, storage_kinds: Sequence[str] = (), operator_choices: bool = False
) -> StepProfile:
    """Profile the job's layer under every option (`layer_options`: with `storage_kinds`, and
    with `operator_choices` the layer's sets of operator outputs worth keeping,
    memexp.operator_choices) on fake tensors (no compute, any model size); profiled once per
    workload and option set in a sweep (memexp.memo), whatever the strategy's other settings."""
    figure = "-".join((STEP_PROFILE, *storage_kinds, *(["operators"] * operator_choices)))
    return cached(
        figure,
        spec,
        lambda: _profile_step(spec, storage_kinds, operator_choices),
        profile_to_data,
        profile_from_data,
    )


def _profile_step(
    spec: ExperimentSpec, storage_kinds: Sequence[str], operator_choices: bool
) -> StepProfile:
    """Offloaded tensors leave the device where the job's tensors stand for an accelerator's;
    on a CPU host memory is where they already are."""
    kept_outputs = kept_output_choices(spec) if operator_choices else ()
    profiled = layer_options(storage_kinds, kept_outputs)
    shallow = replace(spec, model=replace(spec.model, layers=len(profiled)))
    plan = plan_of(profiled)
    host_apart = spec.imagined_device == "cuda"
    mode, work = fake_workload(shallow, plan, host_apart)
    with mode:
        phases = _memory_phases(work)
    rates = spec.roofline_rates
    mode, work = fake_workload(shallow, plan, host_apart)
    with mode:
        counts = _counts_at_marks(work, rates)
        gradient_bytes = sum(
            p.numel() * p.element_size() for p in work.model.layers[0].parameters()
        )
    names = list(phases)

    def after(name: str) -> str:
        return names[names.index(name) + 1]

    def spent(phase: str, k: int) -> int:
        return counts[after(phase)][k] - counts[phase][k]

    def option_counts(index: int) -> tuple[int, int]:
        """What layer `index`'s option adds over the `nothing` layer (index 0): FLOPs in its
        backward (what it recomputes), roofline picoseconds in its forward and backward (a
        storage packs in the forward and unpacks in the backward)."""
        flops = spent(f"backward:{index}", 0) - spent("backward:0", 0)
        ps = sum(spent(f"{phase}:{index}", 1) - spent(f"{phase}:0", 1) for phase in PASSES)
        return flops, ps

    options: dict[LayerOption, OptionProfile] = {}
    layer_saved: dict[LayerOption, int] = {}
    for index, option in enumerate(profiled):
        forward, backward_phase = phases[f"forward:{index}"], phases[f"backward:{index}"]
        forward_end = phases[after(f"forward:{index}")]
        backward_end = phases[after(f"backward:{index}")]
        kept = forward_end.start - forward.start
        layer_saved[option] = forward_end.saved - forward.saved
        cache = kept + (backward_end.start - backward_phase.start) - gradient_bytes
        # Negative when the layer's backward frees what was made before its forward: on a real
        # architecture (memexp.hf_model), the rotary embeddings, mask and positions every
        # layer's attention shares, freed by the last backward (or attention-core checkpoint)
        # to hold them. Counted as no cache, the layer holds those bytes a little longer in the
        # peak model than in the step: the model errs high, by at most those bytes.
        cache = max(cache, 0)
        recompute_flops, recompute_ps = option_counts(index)
        options[option] = OptionProfile(
            kept_bytes=kept,
            forward_peak_bytes=forward.peak - forward.start,
            backward_peak_bytes=backward_phase.peak - backward_phase.start,
            cache_bytes=cache,
            recompute_flops=recompute_flops,
            recompute_ps=recompute_ps,
        )
    start = phases["embedding"].start
    head_forward, head_backward = phases["head_forward"], phases["head_backward"]
    embedding_backward = phases["embedding_backward"]
    multi_tensor = spec.imagined_device == "cuda"  # PyTorch's default (foreach) path on CUDA
    # One rank's states under the job's sharding (one device's under parallel=none): the
    # activations are every rank's own, the states are what sharding divides.
    rank = sharded_states.rank_states(spec, multi_tensor)
    batch = analytic.batch_bytes(spec)
    return StepProfile(
        layers=spec.model.layers,
        options=options,
        embedding_peak_bytes=phases["embedding"].peak - start,
        embedding_net_bytes=phases["forward:0"].start - start,
        head_forward_peak_bytes=head_forward.peak - head_forward.start,
        head_forward_net_bytes=head_backward.start
        - head_forward.start
        + sum(o.cache_bytes for o in options.values()),
        head_backward_peak_bytes=head_backward.peak - head_backward.start,
        head_backward_net_bytes=phases[after("head_backward")].start - head_backward.start,
        embedding_backward_peak_bytes=embedding_backward.peak - embedding_backward.start,
        layer_gradient_bytes=rank.layer_grads_bytes,
        resting_bytes=rank.params_bytes + rank.optimizer_state_bytes + batch + rank.gathered_bytes,
        gradient_bytes=rank.grads_bytes,
        optimizer_peak_bytes=rank.optimizer_step_bytes + batch,
        layer_saved_bytes=layer_saved[()],
        outside_saved_bytes=phases["end"].saved - sum(layer_saved.values()),
        layer_forward_flops=counts["forward:1"][0] - counts["forward:0"][0],
        cost_source=roofline_source(rates),
    ).with_transfers(spec)


def roofline_source(rates: tuple[float, float]) -> str:
    peak, memory = rates
    return (
        f"{COST_ROOFLINE}: per operator max(FLOPs / {peak:g} TFLOP/s, bytes moved / "
        f"{memory:g} GB/s), on fake tensors"
    )


def option_units(option: LayerOption) -> dict[str, Recompute | Stored]:
    """The units one layer recomputes under `option`, each with how, as the layer takes them:
    a whole layer recomputed (a one-layer segment in the plan) included, and each unit stored
    its own way, in its storage."""
    plan = plan_of((option,))
    units: dict[str, Recompute | Stored] = {**layer_units(plan, 0)}
    if plan.segments:
        saved = plan.saved_ops_of(0)
        units[LAYER] = Recompute(None if saved is None else saved_ops_context(saved))
    for unit, kind in plan.units_stored_in(0).items():
        units[unit] = Stored(functools.partial(saved_tensor_storage, kind))
    return units


def with_measured_costs(profile: StepProfile, spec: ExperimentSpec) -> StepProfile:
    """`profile` with each option's cost measured on the job's device: one layer's forward and
    backward under the option less under `nothing` (median of repeats, interleaved; storage
    runs for real, its transfers included).

    A difference counts as measured only where it is larger than the noise: the difference of
    the medians above half the sum of the two interquartile ranges. An option whose difference
    is not (its cost hidden in the host's other work, or no cost at all) is priced on the
    roofline instead, scaled into this device's time by the median measured / roofline ratio
    of the options that are resolved; with none resolved, the roofline profile is kept. A
    difference is never clamped to zero, so no option looks free for noise.
    """
    ways = {
        option: (option_units(option), plan_of((option,)).storage_of(0))
        for option in profile.options
    }
    timed = time_layer_steps(spec, ways, MEASURED_REPEATS)
    base = timed[()]
    resolved = {
        option: round((stats.median - base.median) * 1e9)
        for option, stats in timed.items()
        if stats.median - base.median > (stats.iqr + base.iqr) / 2
    }
    ratios = [ps / profile.cost(option) for option, ps in resolved.items() if profile.cost(option)]
    how = (
        f"one layer's forward and backward per option on {spec.device}, median of "
        f"{MEASURED_REPEATS}, less those of the layer that recomputes nothing"
    )
    if not ratios:
        return replace(
            profile,
            cost_source=f"{profile.cost_source} ({COST_MEASURED} was tried, {how}: no option's "
            "difference was larger than the timing noise)",
        )
    scale = statistics.median(ratios)
    costs = {
        option: resolved.get(option, round(profile.cost(option) * scale))
        for option in profile.options
    }
    costs[()] = 0
    source = (
        f"{COST_MEASURED}: {how}; {len(resolved)} of {len(costs) - 1} options above the timing "
        f"noise (difference of medians > half the sum of the IQRs), the others on the roofline "
        f"× {scale:.3g} (the median measured / roofline ratio of those)"
    )
    return profile.with_costs(costs, source)


# --- solving -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Solution:
    choices: tuple[LayerOption, ...]
    recompute_ps: int  # the cost solved for: predicted recompute time, in picoseconds
    recompute_flops: int
    peak_bytes: int  # predicted, over the scope the plan was solved for

    @property
    def plan(self) -> CheckpointPlan:
        return plan_of(self.choices)


Trail = tuple[LayerOption, Any] | None  # (last choice, the trail before it): a shared list


class _Partial(NamedTuple):
    """The first layers of a plan: bytes they keep in the forward and hold into the backward,
    their recompute time (the cost), the highest point so far, and their choices. A tuple: the
    search makes millions of them on deep models, and a plain tuple costs a tenth of a frozen
    dataclass to make (the inner loop builds plain tuples of these fields)."""

    kept: int
    held: int
    cost: int
    peak: int
    trail: Trail = None

    @property
    def choices(self) -> tuple[LayerOption, ...]:
        out: list[LayerOption] = []
        node = self.trail
        while node is not None:
            out.append(node[0])
            node = node[1]
        return tuple(reversed(out))


@dataclass(frozen=True)
class _Rank:
    """What a search minimises over `_Partial` tuples (`value`, compared as a whole), and the
    order it sweeps them in (`order`: kept, held, then the value), both C-level item getters:
    they run once for every partial plan the search makes."""

    value: Callable[[tuple[Any, ...]], Any]
    order: Callable[[tuple[Any, ...]], Any]


_BY_COST = _Rank(value=itemgetter(2, 3), order=itemgetter(0, 1, 2, 3))  # cost, then peak
_BY_PEAK = _Rank(value=itemgetter(3), order=itemgetter(0, 1, 3))


def _undominated(partials: list[tuple[Any, ...]], rank: _Rank) -> list[tuple[Any, ...]]:
    """Keep only the partial plans no other one dominates: keeps and holds no more bytes and
    ranks no worse (the first of identical ones).

    Every later constraint grows with kept and held bytes, so a dominated partial plan can
    never end better than the one dominating it. Sorted by kept bytes, a plan is dominated
    exactly when one before it holds no more and ranks no worse: a staircase of the best rank
    seen at each held size (held rising, rank falling) answers that by bisection.
    """
    frontier: list[tuple[Any, ...]] = []
    stair_held: list[int] = []
    stair_rank: list[Any] = []
    for partial in sorted(partials, key=rank.order):  # stable: the first of identical ones
        held, value = partial[1], rank.value(partial)
        at = bisect.bisect_right(stair_held, held)
        if at and stair_rank[at - 1] <= value:
            continue
        frontier.append(partial)
        if at and stair_held[at - 1] == held:
            at -= 1
        end = at
        while end < len(stair_held) and stair_rank[end] >= value:
            end += 1
        stair_held[at:end] = [held]
        stair_rank[at:end] = [value]
    return frontier


def _useful_options(profile: StepProfile, with_cost: bool) -> list[LayerOption]:
    """The options no other one beats wherever it stands: keeps, holds, peaks in its forward
    and (held + its backward's peak) no more, and, `with_cost`, costs no more. Dropping the
    others loses no optimum and shrinks every step of the search."""

    def figures(option: LayerOption) -> tuple[int, ...]:
        s = profile.options[option]
        own = (
            s.kept_bytes,
            s.held_bytes,
            s.forward_peak_bytes,
            s.held_bytes + s.backward_peak_bytes,
        )
        return (*own, s.recompute_ps) if with_cost else own

    table = {option: figures(option) for option in profile.options}

    def beats(a: LayerOption, b: LayerOption) -> bool:
        return all(x <= y for x, y in zip(table[a], table[b], strict=True))

    order = list(profile.options)
    return [
        b
        for i, b in enumerate(order)
        if not any(
            beats(a, b) and (j < i or not beats(b, a)) for j, a in enumerate(order) if a != b
        )
    ]


def _search(profile: StepProfile, limit: int | None, rank: _Rank, scope: str) -> list[_Partial]:
    """Every undominated whole plan (by `rank`) whose predicted peak over `scope` is within
    `limit` bytes, with its peak."""
    fixed = max(profile.fixed_peaks(scope).values())
    if limit is not None and fixed > limit:
        return []
    options = _useful_options(profile, with_cost=rank is _BY_COST)
    before_layers = profile.resting_bytes + profile.embedding_net_bytes
    steps = []  # per option: kept, held, cost, forward point less kept, backward point less held
    for option in options:
        s = profile.options[option]
        steps.append(
            (
                option,
                s.kept_bytes,
                s.held_bytes,
                s.recompute_ps,
                before_layers + s.forward_peak_bytes,
                profile._after_head + s.held_bytes + s.backward_peak_bytes,
            )
        )
    frontier: list[Any] = [(0, 0, 0, fixed, None)]  # plain `_Partial` tuples
    for index in range(profile.layers):
        gradients_above = (profile.layers - 1 - index) * profile.layer_gradient_bytes
        grown = []
        for so_far_kept, so_far_held, so_far_cost, so_far_peak, trail in frontier:
            for option, kept, held, cost, forward_point, backward_point in steps:
                peak = max(
                    so_far_peak,
                    forward_point + so_far_kept,
                    backward_point + so_far_held + gradients_above,
                )
                if limit is not None and peak > limit:
                    continue
                grown.append(
                    (
                        so_far_kept + kept,
                        so_far_held + held,
                        so_far_cost + cost,
                        peak,
                        (option, trail),
                    )
                )
        frontier = _undominated(grown, rank)
    finals = []
    for kept, held, cost, peak, trail in frontier:
        peak = max(peak, profile.head_peak(kept, held))
        if limit is None or peak <= limit:
            finals.append(_Partial(kept, held, cost, peak, trail))
    return finals


def _solution(profile: StepProfile, partial: _Partial) -> Solution:
    choices = partial.choices
    flops = sum(profile.options[option].recompute_flops for option in choices)
    return Solution(choices, partial.cost, flops, partial.peak)


def _order(profile: StepProfile, choices: Sequence[LayerOption]) -> tuple[int, ...]:
    """Ties between equal plans go to the one with lighter options in earlier layers."""
    order = list(profile.options)
    return tuple(order.index(option) for option in choices)


def cheapest_within(
    profile: StepProfile, budget_bytes: int, scope: str = SCOPE_STEP
) -> Solution | None:
    """The plan with the least recompute time whose predicted peak over `scope` is within the
    budget (the lowest peak among equals)."""
    finals = [_solution(profile, p) for p in _search(profile, budget_bytes, _BY_COST, scope)]
    return min(
        finals,
        key=lambda s: (s.recompute_ps, s.peak_bytes, _order(profile, s.choices)),
        default=None,
    )


def lowest_peak(profile: StepProfile, scope: str = SCOPE_STEP) -> int:
    """The lowest predicted peak over `scope` any plan reaches."""
    return min(p.peak for p in _search(profile, None, _BY_PEAK, scope))


def leanest(profile: StepProfile, scope: str = SCOPE_STEP) -> Solution:
    """The plan with the lowest predicted peak over `scope` (the cheapest among equals)."""
    solution = cheapest_within(profile, lowest_peak(profile, scope), scope)
    assert solution is not None  # the lowest peak is some plan's
    return solution
