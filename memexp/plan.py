"""CheckpointPlan: what a strategy decides, as plain data the model can execute.

Keeping the decision as data (not as a code path per strategy) is what lets every strategy be
printed, logged, compared and executed by one model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any


class Part(str, Enum):
    """A sub-block of one layer that can be recomputed on its own."""

    ATTENTION_CORE = "attention_core"  # QKᵀ, softmax, ·V: the seq×seq tensors
    ATTENTION = "attention"  # the whole attention sub-block (norm, projections, core)
    FFN = "ffn"  # the whole FFN sub-block


# The largest unit a plan recomputes: one whole layer (a one-layer segment).
LAYER = "layer"
# Every unit of a layer a plan may recompute, smallest first.
UNITS: tuple[str, ...] = (Part.ATTENTION_CORE.value, Part.ATTENTION.value, Part.FFN.value, LAYER)
# The units whose saved tensors a plan may store their own way (`CheckpointPlan.stored_units`),
# each with the units that contain it: one recomputed leaves nothing of it to store.
STORABLE_UNITS: dict[str, tuple[str, ...]] = {
    Part.ATTENTION_CORE.value: (Part.ATTENTION_CORE.value, Part.ATTENTION.value, LAYER),
    Part.ATTENTION.value: (Part.ATTENTION.value, LAYER),
    Part.FFN.value: (Part.FFN.value, LAYER),
}

# The op-level policies a plan may name (`CheckpointPlan.op_policy`); memexp.model maps each to
# the operators it keeps. Named here, without torch, so validating a config never imports it.
OP_POLICY_NAMES: tuple[str, ...] = ("save_matmuls",)

# How the tensors autograd saves for backward are stored (`CheckpointPlan.storage`);
# memexp.storage implements each. Named here, without torch, so validating a config never
# imports it. `keep`: as made; `bf16`, `fp8`, `int8`: compressed in place (lossy); `host`:
# moved to host memory; `disk`: written to memory-mapped files.
STORAGE_KINDS: tuple[str, ...] = ("keep", "bf16", "fp8", "int8", "host", "disk")
# Formats that keep a saved tensor on its device, smaller and lossy.
COMPRESSED_KINDS: tuple[str, ...] = ("bf16", "fp8", "int8")
# Places that take a saved tensor off its device and bring it back unchanged.
OFFLOAD_KINDS: tuple[str, ...] = ("host", "disk")
# What `describe()` says of each kind but `keep`.
STORAGE_DESCRIPTIONS = {
    "bf16": "saved activations stored as bf16",
    "fp8": "saved activations stored as fp8 (e4m3, one scale per tensor)",
    "int8": "saved activations stored as int8 (one scale per last-dim channel)",
    "host": "saved activations offloaded to host memory",
    "disk": "saved activations offloaded to disk (memory-mapped files)",
}


# torch.compile backends whose graphs run operator by operator (memexp.compile_partition).
OPERATOR_BY_OPERATOR_BACKENDS = ("aot_eager_decomp_partition",)


@dataclass(frozen=True)
class CompiledForward:
    """The model's forward under `torch.compile`: AOTAutograd's min-cut partitioner chooses what
    the backward recomputes, keeping at most `activation_memory_budget` (a fraction, 0 to 1) of
    the activation memory its default partition saves (`torch._functorch.config`)."""

    backend: str
    activation_memory_budget: float

    @property
    def operator_by_operator(self) -> bool:
        """Whether the backend's graphs run operator by operator, so that a dispatch mode which
        lets compiled code run under it sees every operator of the compiled step."""
        return self.backend in OPERATOR_BY_OPERATOR_BACKENDS

    def __post_init__(self) -> None:
        if not 0 <= self.activation_memory_budget <= 1:
            raise ValueError(
                f"activation_memory_budget {self.activation_memory_budget} is outside [0, 1]"
            )


@dataclass(frozen=True)
class CheckpointPlan:
    """Which units are recomputed in backward instead of keeping their activations.

    `segments` are half-open layer ranges each run under one checkpoint (only the segment's
    input is kept); `parts` name the sub-blocks recomputed inside layers outside any segment.
    `op_policy` turns each segment into an op-level selective checkpoint; `storage` says how
    every tensor the plan saves for backward is stored (`STORAGE_KINDS`: kept, compressed, or
    offloaded to host memory or disk), whatever is recomputed. `selective` names units (layer,
    unit of `UNITS`, op policy) recomputed under their own op-level policy: the policy's
    operators (matrix products under `save_matmuls`) keep their outputs and only the rest of
    the unit is recomputed, so a plan may recompute one unit element-wise and another one
    whole, layer by layer. `stored` names layers (layer, kind of `STORAGE_KINDS`) whose saved
    tensors are stored their own way instead of the plan's `storage`; `stored_units` names
    units (layer, unit of `STORABLE_UNITS`, kind) stored their own way, in layers not stored
    whole, so that one unit of a layer (its attention core, or one block) may be compressed or
    offloaded and the rest not.
    `saved_ops` gives a segment its own explicit list instead of `op_policy` (per segment
    start: the operator outputs it keeps, each named `<aten op>#<occurrence in the layer's
    forward>`, e.g. `mm#0`; every other operator is recomputed), as a planner that decides per
    operator (sac_milp) needs. `compiled` runs the forward under torch.compile, whose
    partitioner then decides what is recomputed.
    """

    num_layers: int
    segments: tuple[tuple[int, int], ...] = ()
    parts: tuple[tuple[int, Part], ...] = ()
    op_policy: str | None = None
    storage: str = "keep"
    selective: tuple[tuple[int, str, str], ...] = ()
    stored: tuple[tuple[int, str], ...] = ()
    stored_units: tuple[tuple[int, str, str], ...] = ()
    saved_ops: tuple[tuple[int, tuple[str, ...]], ...] = ()
    compiled: CompiledForward | None = None

    def __post_init__(self) -> None:
        if self.storage not in STORAGE_KINDS:
            raise ValueError(f"unknown storage {self.storage!r}; known: {', '.join(STORAGE_KINDS)}")
        covered: set[int] = set()
        for start, end in self.segments:
            if not 0 <= start < end <= self.num_layers:
                raise ValueError(f"segment [{start}, {end}) outside 0..{self.num_layers}")
            span = set(range(start, end))
            if span & covered:
                raise ValueError(f"segment [{start}, {end}) overlaps another segment")
            covered |= span
        for layer, part in self.parts:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"part {part.value} names layer {layer} outside the model")
            if layer in covered:
                raise ValueError(f"layer {layer} is inside a segment and also has parts")
        for layer, unit, policy in self.selective:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"selective {unit} names layer {layer} outside the model")
            if unit not in UNITS:
                raise ValueError(f"selective unit {unit!r} is not one of {', '.join(UNITS)}")
            if policy not in OP_POLICY_NAMES:
                raise ValueError(f"op policy {policy!r} is not one of {', '.join(OP_POLICY_NAMES)}")
            if layer in covered:
                raise ValueError(f"layer {layer} is inside a segment and also has a selective unit")
        stored_layers = [layer for layer, _ in self.stored]
        for layer, kind in self.stored:
            if kind not in STORAGE_KINDS:
                raise ValueError(f"layer {layer}: unknown storage {kind!r}")
            if not 0 <= layer < self.num_layers or stored_layers.count(layer) > 1:
                raise ValueError(f"stored layer {layer} is outside the model or named twice")
            if layer in covered or LAYER in self.selective_of(layer):
                raise ValueError(
                    f"layer {layer} is recomputed whole and stored: a checkpoint keeps only its "
                    "input, outside saved-tensor hooks' reach"
                )
        self._check_stored_units(covered, set(stored_layers))
        for layer in range(self.num_layers):
            _check_units(layer, [p.value for p in self.parts_of(layer)], self.selective_of(layer))
        if self.op_policy is not None and not self.segments:
            raise ValueError("an op-level policy applies to segments, and the plan has none")
        starts = {start for start, _ in self.segments}
        for start, _ in self.saved_ops:
            if start not in starts:
                raise ValueError(
                    f"saved operators given for layer {start}, where no segment starts"
                )

    def _check_stored_units(self, segmented: set[int], stored_layers: set[int]) -> None:
        """A stored unit is one of `STORABLE_UNITS`, named once, in a layer not stored whole,
        and neither it nor a unit containing it recomputed (a checkpoint keeps only its input,
        outside the unit's storage's reach)."""
        named = [(layer, unit) for layer, unit, _ in self.stored_units]
        for layer, unit, kind in self.stored_units:
            if kind not in STORAGE_KINDS:
                raise ValueError(f"layer {layer} {unit}: unknown storage {kind!r}")
            if unit not in STORABLE_UNITS:
                raise ValueError(f"stored unit {unit!r} is not one of {', '.join(STORABLE_UNITS)}")
            if not 0 <= layer < self.num_layers or named.count((layer, unit)) > 1:
                raise ValueError(
                    f"stored {unit} of layer {layer} is outside the model or named twice"
                )
            if layer in stored_layers:
                raise ValueError(f"layer {layer} is stored whole and its {unit} on its own")
            recomputed = {p.value for p in self.parts_of(layer)} | set(self.selective_of(layer))
            if layer in segmented or recomputed & set(STORABLE_UNITS[unit]):
                raise ValueError(
                    f"layer {layer}: its {unit} is recomputed and stored: a checkpoint keeps only "
                    "its input, outside saved-tensor hooks' reach"
                )

    @classmethod
    def nothing(cls, num_layers: int) -> CheckpointPlan:
        return cls(num_layers=num_layers)

    def saved_ops_of(self, start: int) -> tuple[str, ...] | None:
        """The explicit operator outputs the segment starting at `start` keeps, if it has a list."""
        for layer, names in self.saved_ops:
            if layer == start:
                return names
        return None

    def parts_of(self, layer: int) -> frozenset[Part]:
        return frozenset(part for index, part in self.parts if index == layer)

    def selective_of(self, layer: int) -> dict[str, str]:
        """The units of `layer` recomputed under an op-level policy, each with its policy."""
        return {unit: policy for index, unit, policy in self.selective if index == layer}

    @property
    def storage_kinds(self) -> frozenset[str]:
        """Every way the plan stores saved tensors: its own `storage`, its layers' and units'."""
        return frozenset(
            {
                self.storage,
                *(kind for _, kind in self.stored),
                *(kind for _, _, kind in self.stored_units),
            }
        )

    def units_stored_in(self, layer: int) -> dict[str, str]:
        """The units of `layer` stored their own way, each with its kind."""
        return {unit: kind for index, unit, kind in self.stored_units if index == layer}

    def storage_of(self, layer: int) -> str | None:
        """How `layer`'s saved tensors are stored, where it differs from the plan's `storage`."""
        return dict(self.stored).get(layer)

    def segment_starting_at(self, layer: int) -> tuple[int, int] | None:
        for segment in self.segments:
            if segment[0] == layer:
                return segment
        return None

    @property
    def recomputes_anything(self) -> bool:
        return bool(self.segments or self.parts or self.selective or self.compiled)

    @property
    def uses_op_policy(self) -> bool:
        """Some unit keeps tensors in an op-level policy's cache (a policy or an explicit
        saved-operator list), out of saved-tensor hooks' sight."""
        return self.op_policy is not None or bool(self.selective) or bool(self.saved_ops)

    def describe(self) -> str:
        """One line a person can read: what is recomputed, and where."""
        if not (self.segments or self.parts or self.selective):
            text = "nothing recomputed" if self.compiled is None else "compiled forward"
        else:
            pieces = []
            if self.segments and all(e - s == 1 for s, e in self.segments):
                layers = _ranges([s for s, _ in self.segments])
                pieces.append(f"layers {layers} each recomputed as its own checkpoint")
            elif self.segments:
                spans = " ".join(f"[{s},{e})" for s, e in self.segments)
                pieces.append(f"{len(self.segments)} checkpointed segment(s) of layers {spans}")
            by_part: dict[Part, list[int]] = {}
            for layer, part in self.parts:
                by_part.setdefault(part, []).append(layer)
            for part, layers in by_part.items():
                pieces.append(f"{part.value} recomputed in layers {_ranges(sorted(layers))}")
            by_unit: dict[tuple[str, str], list[int]] = {}
            for layer, unit, policy in self.selective:
                by_unit.setdefault((unit, policy), []).append(layer)
            for (unit, policy), layers in by_unit.items():
                pieces.append(
                    f"{unit} recomputed element-wise ({policy}) in layers {_ranges(sorted(layers))}"
                )
            text = "; ".join(pieces)
        if self.op_policy:
            text += f"; op policy {self.op_policy}"
        if self.saved_ops:
            kept = sum(len(names) for _, names in self.saved_ops)
            text += (
                f"; {kept} operator output(s) kept by explicit lists in "
                f"{len(self.saved_ops)} segment(s)"
            )
        if self.compiled is not None:
            text += (
                f"; torch.compile ({self.compiled.backend}) with activation_memory_budget "
                f"{self.compiled.activation_memory_budget:.3f}"
            )
        if self.storage in STORAGE_DESCRIPTIONS:
            text += "; " + STORAGE_DESCRIPTIONS[self.storage]
        by_kind: dict[str, list[int]] = {}
        for layer, kind in self.stored:
            by_kind.setdefault(kind, []).append(layer)
        for kind, layers in by_kind.items():
            text += f"; in layers {_ranges(sorted(layers))} {kind} storage"
        by_unit: dict[tuple[str, str], list[int]] = {}
        for layer, unit, kind in self.stored_units:
            by_unit.setdefault((unit, kind), []).append(layer)
        for (unit, kind), layers in by_unit.items():
            text += f"; in layers {_ranges(sorted(layers))} {unit} in {kind} storage"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "segments": [list(s) for s in self.segments],
            "parts": [[layer, part.value] for layer, part in self.parts],
            "op_policy": self.op_policy,
            "storage": self.storage,
            "selective": [list(entry) for entry in self.selective],
            "stored": [list(entry) for entry in self.stored],
            "stored_units": [list(entry) for entry in self.stored_units],
            "saved_ops": [[start, list(names)] for start, names in self.saved_ops],
            "compiled": None if self.compiled is None else asdict(self.compiled),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointPlan:
        """Also reads records written before `storage` existed: `offload: true` is `host`."""
        return cls(
            num_layers=int(data["num_layers"]),
            segments=tuple((int(s), int(e)) for s, e in data.get("segments", [])),
            parts=tuple((int(layer), Part(part)) for layer, part in data.get("parts", [])),
            op_policy=data.get("op_policy"),
            storage=data.get("storage") or ("host" if data.get("offload") else "keep"),
            selective=tuple(
                (int(layer), str(unit), str(policy))
                for layer, unit, policy in data.get("selective", [])
            ),
            stored=tuple((int(layer), str(kind)) for layer, kind in data.get("stored", [])),
            stored_units=tuple(
                (int(layer), str(unit), str(kind))
                for layer, unit, kind in data.get("stored_units", [])
            ),
            saved_ops=tuple(
                (int(start), tuple(names)) for start, names in data.get("saved_ops", [])
            ),
            compiled=CompiledForward(**data["compiled"]) if data.get("compiled") else None,
        )


def _check_units(layer: int, whole: list[str], selective: dict[str, str]) -> None:
    """One layer's units may not overlap: each is recomputed one way, a layer holds its blocks
    and the attention block its core."""
    both = set(whole) & set(selective)
    if both:
        raise ValueError(f"layer {layer}: {', '.join(sorted(both))} recomputed two ways")
    chosen = set(whole) | set(selective)
    if LAYER in chosen and len(chosen) > 1:
        raise ValueError(f"layer {layer}: the whole layer already contains its other units")
    if Part.ATTENTION.value in chosen and Part.ATTENTION_CORE.value in chosen:
        raise ValueError(f"layer {layer}: attention already contains attention_core")


def _ranges(values: list[int]) -> str:
    """Compress [0,1,2,5] to '0-2,5' so plans of deep models stay one line."""
    out: list[str] = []
    start = prev = values[0]
    for value in [*values[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        out.append(f"{start}" if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ",".join(out)
