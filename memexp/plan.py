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

# The op-level policies a plan may name (`CheckpointPlan.op_policy`); memexp.model maps each to
# the operators it keeps. Named here, without torch, so validating a config never imports it.
OP_POLICY_NAMES: tuple[str, ...] = ("save_matmuls",)


@dataclass(frozen=True)
class CompiledForward:
    """The model's forward under `torch.compile`: AOTAutograd's min-cut partitioner chooses what
    the backward recomputes, keeping at most `activation_memory_budget` (a fraction, 0 to 1) of
    the activation memory its default partition saves (`torch._functorch.config`)."""

    backend: str
    activation_memory_budget: float

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
    `op_policy` turns each segment into an op-level selective checkpoint; `saved_ops` gives a
    segment its own explicit list instead (per segment start: the operator outputs it keeps,
    each named `<aten op>#<occurrence in the layer's forward>`, e.g. `mm#0`; every other
    operator is recomputed), as a planner that decides per operator (sac_milp) needs.
    `offload` keeps the saved activations in host memory; `compiled` runs the forward under
    torch.compile, whose partitioner then decides what is recomputed.
    """

    num_layers: int
    segments: tuple[tuple[int, int], ...] = ()
    parts: tuple[tuple[int, Part], ...] = ()
    op_policy: str | None = None
    saved_ops: tuple[tuple[int, tuple[str, ...]], ...] = ()
    offload: bool = False
    compiled: CompiledForward | None = None

    def __post_init__(self) -> None:
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
        for layer in range(self.num_layers):
            chosen = self.parts_of(layer)
            if Part.ATTENTION in chosen and Part.ATTENTION_CORE in chosen:
                raise ValueError(f"layer {layer}: attention already contains attention_core")
        if self.op_policy is not None and not self.segments:
            raise ValueError("an op-level policy applies to segments, and the plan has none")
        starts = {start for start, _ in self.segments}
        for start, _ in self.saved_ops:
            if start not in starts:
                raise ValueError(
                    f"saved operators given for layer {start}, where no segment starts"
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

    @property
    def selective(self) -> bool:
        """Whether some segment keeps operator outputs by an op-level policy or list."""
        return self.op_policy is not None or bool(self.saved_ops)

    def parts_of(self, layer: int) -> frozenset[Part]:
        return frozenset(part for index, part in self.parts if index == layer)

    def segment_starting_at(self, layer: int) -> tuple[int, int] | None:
        for segment in self.segments:
            if segment[0] == layer:
                return segment
        return None

    @property
    def recomputes_anything(self) -> bool:
        return bool(self.segments or self.parts or self.compiled)

    def describe(self) -> str:
        """One line a person can read: what is recomputed, and where."""
        if not (self.segments or self.parts):
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
            text = "; ".join(pieces)
        if self.op_policy:
            text += f"; op policy {self.op_policy}"
        if self.saved_ops:
            kept = sum(len(names) for _, names in self.saved_ops)
            text += f"; {kept} operator output(s) kept by explicit lists in {len(self.saved_ops)} segment(s)"
        if self.compiled is not None:
            text += (
                f"; torch.compile ({self.compiled.backend}) with activation_memory_budget "
                f"{self.compiled.activation_memory_budget:.3f}"
            )
        if self.offload:
            text += "; saved activations offloaded to host memory"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "segments": [list(s) for s in self.segments],
            "parts": [[layer, part.value] for layer, part in self.parts],
            "op_policy": self.op_policy,
            "saved_ops": [[start, list(names)] for start, names in self.saved_ops],
            "offload": self.offload,
            "compiled": None if self.compiled is None else asdict(self.compiled),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointPlan:
        return cls(
            num_layers=int(data["num_layers"]),
            segments=tuple((int(s), int(e)) for s, e in data.get("segments", [])),
            parts=tuple((int(layer), Part(part)) for layer, part in data.get("parts", [])),
            op_policy=data.get("op_policy"),
            saved_ops=tuple(
                (int(start), tuple(names)) for start, names in data.get("saved_ops", [])
            ),
            offload=bool(data.get("offload", False)),
            compiled=CompiledForward(**data["compiled"]) if data.get("compiled") else None,
        )


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
