"""The adaptive planner: profile what each recomputation unit costs and saves, predict the step's
peak for any per-layer plan, and find the cheapest plan within a budget exactly.

Units and options. In every layer a plan may recompute the attention core (QKᵀ, softmax, ·V),
the attention sub-block, the FFN sub-block or the whole layer. A unit excludes its own
sub-units, so one layer has seven options (`OPTIONS`): nothing, core, attention, FFN,
core + FFN, attention + FFN, layer.

Profile. All layers are identical, so one layer per option tells everything: a model of seven
layers, layer i under option i, runs one forward and backward on fake tensors (no compute)
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

Solver. Minimise the recompute FLOPs subject to every highest point being within the budget:
a dynamic program over the layers whose state is what the layers so far keep and hold. A
partial plan is dropped only when another keeps and holds no more, costs no more FLOPs and
has no higher peak so far (every later constraint grows with kept and held bytes), so the
optimum is never lost: the result is exact, as an exhaustive search confirms in the tests.
Ties go to the lower predicted peak.

Scope. The budget holds the highest point over one of two scopes (memexp.results.PEAK_FIELDS):
`step`, every point above, or `forward_backward`, every point but the optimizer step's, which
no plan changes and which (Adam's scratch, in fp32) can set the whole step's peak whatever the
plan. `predict` names every point, so it gives both peaks of a plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from memexp import analytic
from memexp.config import ExperimentSpec
from memexp.measure.flops import fake_workload, flop_counter
from memexp.measure.saved import counting_saved_bytes
from memexp.memo import cached
from memexp.plan import LAYER, CheckpointPlan, Part
from memexp.results import SCOPE_FORWARD_BACKWARD, SCOPE_STEP
from memexp.training import Workload, backward, forward_loss

LayerOption = tuple[str, ...]  # the units one layer recomputes
OPTIONS: tuple[LayerOption, ...] = (
    (),
    (Part.ATTENTION_CORE.value,),
    (Part.ATTENTION.value,),
    (Part.FFN.value,),
    (Part.ATTENTION_CORE.value, Part.FFN.value),
    (Part.ATTENTION.value, Part.FFN.value),
    (LAYER,),
)
UNITS = (Part.ATTENTION_CORE.value, Part.ATTENTION.value, Part.FFN.value, LAYER)
PROFILE_SOURCE = "tensor_tracker_and_flop_counter_on_fake_tensors"
OPTIMIZER_POINT = "optimizer step"  # the one highest point outside forward and backward


def option_name(option: LayerOption) -> str:
    return "+".join(option) or "nothing"


def plan_of(choices: Sequence[LayerOption]) -> CheckpointPlan:
    """The CheckpointPlan that runs layer i under `choices[i]`."""
    segments = tuple((i, i + 1) for i, option in enumerate(choices) if option == (LAYER,))
    parts = tuple(
        (i, Part(unit)) for i, option in enumerate(choices) if option != (LAYER,) for unit in option
    )
    return CheckpointPlan(len(choices), segments=segments, parts=parts)


# --- profiling -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OptionProfile:
    """One layer under one option: bytes relative to the memory as its phase begins, and FLOPs."""

    kept_bytes: int  # net growth over its forward
    forward_peak_bytes: int
    backward_peak_bytes: int
    cache_bytes: int  # of the kept bytes, those the end of the forward frees (autocast cache)
    recompute_flops: int  # its backward's FLOPs minus those of the same layer recomputing nothing

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

    def cost(self, option: LayerOption) -> int:
        return self.options[option].recompute_flops

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
    return PeakPrediction(points, sum(profile.cost(option) for option in choices))


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


def _flops_at_marks(work: Workload) -> dict[str, int]:
    """FLOPs counted when each phase began (a separate pass: the counter's module hooks hold
    tensors a little longer, which the memory pass must not see)."""
    flops: dict[str, int] = {}
    with flop_counter() as counter:
        marks = _PhaseMarks(lambda name: flops.__setitem__(name, counter.get_total_flops()))
        marks.run(work)
    return flops


STEP_PROFILE = "step_profile"  # its name in a sweep's cache (memexp.memo)


def profile_to_data(profile: StepProfile) -> dict[str, Any]:
    """The profile as JSON data: options keyed by their names (`attention_core+ffn`, `nothing`)."""
    data = asdict(profile)
    data["options"] = {option_name(o): asdict(p) for o, p in profile.options.items()}
    return data


def profile_from_data(data: dict[str, Any]) -> StepProfile:
    by_name = {option_name(option): option for option in OPTIONS}
    options = {by_name[name]: OptionProfile(**fields) for name, fields in data["options"].items()}
    return StepProfile(**{**data, "options": options})


def profile_step(spec: ExperimentSpec) -> StepProfile:
    """Profile the job's layer under every option on fake tensors (no compute, any model size);
    profiled once per workload in a sweep (memexp.memo), whatever the strategy's settings."""
    return cached(
        STEP_PROFILE, spec, lambda: _profile_step(spec), profile_to_data, profile_from_data
    )


def _profile_step(spec: ExperimentSpec) -> StepProfile:
    shallow = replace(spec, model=replace(spec.model, layers=len(OPTIONS)))
    plan = plan_of(OPTIONS)
    mode, work = fake_workload(shallow, plan)
    with mode:
        phases = _memory_phases(work)
    mode, work = fake_workload(shallow, plan)
    with mode:
        flops = _flops_at_marks(work)
        gradient_bytes = sum(
            p.numel() * p.element_size() for p in work.model.layers[0].parameters()
        )
    names = list(phases)

    def after(name: str) -> str:
        return names[names.index(name) + 1]

    def backward_flops(index: int) -> int:
        name = f"backward:{index}"
        return flops[after(name)] - flops[name]

    options: dict[LayerOption, OptionProfile] = {}
    layer_saved: dict[LayerOption, int] = {}
    for index, option in enumerate(OPTIONS):
        forward, backward_phase = phases[f"forward:{index}"], phases[f"backward:{index}"]
        forward_end = phases[after(f"forward:{index}")]
        backward_end = phases[after(f"backward:{index}")]
        kept = forward_end.start - forward.start
        layer_saved[option] = forward_end.saved - forward.saved
        cache = kept + (backward_end.start - backward_phase.start) - gradient_bytes
        if cache < 0:
            raise RuntimeError(
                f"a layer under {option_name(option)} frees {-cache} bytes more in its backward "
                "than it kept; the peak model has no place for that"
            )
        options[option] = OptionProfile(
            kept_bytes=kept,
            forward_peak_bytes=forward.peak - forward.start,
            backward_peak_bytes=backward_phase.peak - backward_phase.start,
            cache_bytes=cache,
            recompute_flops=backward_flops(index) - backward_flops(OPTIONS.index(())),
        )
    start = phases["embedding"].start
    head_forward, head_backward = phases["head_forward"], phases["head_backward"]
    embedding_backward = phases["embedding_backward"]
    weights = analytic.parameter_count(spec.model) * analytic.FLOAT_BYTES
    multi_tensor = spec.imagined_device == "cuda"  # PyTorch's default (foreach) path on CUDA
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
        layer_gradient_bytes=gradient_bytes,
        resting_bytes=weights + analytic.optimizer_state_bytes(spec) + analytic.batch_bytes(spec),
        gradient_bytes=weights,
        optimizer_peak_bytes=analytic.optimizer_step_peak_bytes(spec, multi_tensor),
        layer_saved_bytes=layer_saved[()],
        outside_saved_bytes=phases["end"].saved - sum(layer_saved.values()),
        layer_forward_flops=flops["forward:1"] - flops["forward:0"],
    )


# --- solving -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Solution:
    choices: tuple[LayerOption, ...]
    recompute_flops: int
    peak_bytes: int  # predicted, over the scope the plan was solved for

    @property
    def plan(self) -> CheckpointPlan:
        return plan_of(self.choices)


@dataclass(frozen=True)
class _Partial:
    """The first layers of a plan: bytes they keep in the forward and hold into the backward,
    their recompute FLOPs, and the highest point so far."""

    kept: int
    held: int
    cost: int
    peak: int
    choices: tuple[LayerOption, ...]

    def covers(self, other: _Partial) -> bool:
        """No more bytes kept or held, no more FLOPs, no higher peak: `other` can be dropped."""
        return (
            self.kept <= other.kept
            and self.held <= other.held
            and self.cost <= other.cost
            and self.peak <= other.peak
        )


def _undominated(partials: list[_Partial]) -> list[_Partial]:
    """Keep only the partial plans no other one covers (the first of identical ones).

    Every later constraint grows with kept and held bytes, so a covered partial plan can never
    end better than the one covering it.
    """
    frontier: list[_Partial] = []
    ordered = sorted(partials, key=lambda p: (p.kept, p.held, p.cost, p.peak, _order(p.choices)))
    for partial in ordered:
        if not any(other.covers(partial) for other in frontier):
            frontier.append(partial)
    return frontier


def _search(
    profile: StepProfile, limit: int | None, objective: Callable[[Solution], Any], scope: str
) -> Solution | None:
    """The best plan by `objective` among those whose predicted peak over `scope` is within
    `limit` bytes."""
    fixed = max(profile.fixed_peaks(scope).values())
    if limit is not None and fixed > limit:
        return None
    frontier = [_Partial(kept=0, held=0, cost=0, peak=fixed, choices=())]
    for index in range(profile.layers):
        grown = []
        for partial in frontier:
            for option, stats in profile.options.items():
                peak = max(
                    partial.peak, profile.layer_peak(index, partial.kept, partial.held, option)
                )
                if limit is not None and peak > limit:
                    continue
                grown.append(
                    _Partial(
                        kept=partial.kept + stats.kept_bytes,
                        held=partial.held + stats.held_bytes,
                        cost=partial.cost + stats.recompute_flops,
                        peak=peak,
                        choices=(*partial.choices, option),
                    )
                )
        frontier = _undominated(grown)
    finals = []
    for partial in frontier:
        peak = max(partial.peak, profile.head_peak(partial.kept, partial.held))
        if limit is None or peak <= limit:
            finals.append(Solution(partial.choices, partial.cost, peak))
    return min(finals, key=objective, default=None)


def _order(choices: Sequence[LayerOption]) -> tuple[int, ...]:
    """Ties between equal plans go to the one with lighter options in earlier layers."""
    return tuple(OPTIONS.index(option) for option in choices)


def cheapest_within(
    profile: StepProfile, budget_bytes: int, scope: str = SCOPE_STEP
) -> Solution | None:
    """The plan with the least recompute FLOPs whose predicted peak over `scope` is within the
    budget."""
    return _search(
        profile,
        budget_bytes,
        lambda s: (s.recompute_flops, s.peak_bytes, _order(s.choices)),
        scope,
    )


def leanest(profile: StepProfile, scope: str = SCOPE_STEP) -> Solution:
    """The plan with the lowest predicted peak over `scope` (the cheapest among equals)."""
    solution = _search(
        profile, None, lambda s: (s.peak_bytes, s.recompute_flops, _order(s.choices)), scope
    )
    assert solution is not None  # without a limit every plan is a candidate
    return solution
