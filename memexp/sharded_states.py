"""Closed form of what one rank holds under data-parallel sharding, from the shapes alone.

Rank 0 is the one described: it is the heaviest rank under every mode here (FSDP2 gives it the
first and fullest chunk of every tensor; ZeRO-1's greedy partition gives it the largest tensor
first). Symbols: world size N, a tensor of r rows (its first dimension) and c = elements / r.

* fsdp / zero2 (FSDP2 `fully_shard`): every parameter is chunked along its rows, ⌈r/N⌉ rows a
  rank, so rank 0 keeps ⌈r/N⌉·c elements: total / N up to that rounding (the padding, which
  FSDP2 also adds to the last ranks' shards). Its gradients and the optimizer's moments have
  the same shape; Adam adds a 0-d fp32 step per tensor. To compute, a unit (one layer, or the
  root: embeddings, final LayerNorm and head) all-gathers N·⌈r/N⌉·c elements of every tensor
  into one buffer (the padded whole) and copies its unsharded parameters (r·c each) out of it;
  in backward its unsharded gradients are copied into one reduce-scatter buffer of the same
  padded size. Both buffers are in the mixed-precision dtypes (`param_dtype`, `reduce_dtype`,
  which defaults to the parameter dtype), the shards fp32.
* zero1 (`ZeroRedundancyOptimizer`): whole tensors go to ranks, largest first, each to the rank
  holding the fewest elements so far; a rank keeps optimizer state for its own tensors only.
* ddp and zero1: DDP keeps a flat copy of every gradient in its buckets (its default
  `gradient_as_bucket_view=False`), allocated when the model is wrapped and alive the whole
  step: parameter bytes more on every rank, at every moment.
"""

from __future__ import annotations

import math
from typing import Any

from memexp import analytic
from memexp.analytic import FLOAT_BYTES, elements
from memexp.config import FULLY_SHARDED_MODES, PARALLEL_NONE, ExperimentSpec, ParallelConfig

# The modes whose ranks hold DDP's gradient buckets (zero1 runs under DDP).
BUCKETED_MODES = ("ddp", "zero1")
ZERO1 = "zero1"
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
STEP_BYTES = FLOAT_BYTES  # Adam's 0-d step count per tensor


def rank_rows(rows: int, world_size: int) -> int:
    """Rows of rank 0's chunk: ⌈rows / N⌉ (torch.chunk's split, as FSDP2 shards)."""
    return math.ceil(rows / world_size)


def rank_elements(shape: tuple[int, ...], world_size: int) -> int:
    """Elements of rank 0's shard of a tensor of `shape`."""
    return rank_rows(shape[0], world_size) * (elements(shape) // shape[0])


def padded_elements(shape: tuple[int, ...], world_size: int) -> int:
    """Elements of a tensor's slot in a unit's all-gather or reduce-scatter buffer: N chunks."""
    return world_size * rank_elements(shape, world_size)


def zero1_rank_shapes(
    shapes: list[tuple[int, ...]], world_size: int, rank: int = 0
) -> list[tuple[int, ...]]:
    """The tensors ZeroRedundancyOptimizer assigns to `rank`: largest first (stable among equal
    sizes), each to the lowest rank holding the fewest elements so far."""
    totals = [0] * world_size
    owned: list[tuple[int, ...]] = []
    for shape in sorted(shapes, key=elements, reverse=True):
        chosen = totals.index(min(totals))
        totals[chosen] += elements(shape)
        if chosen == rank:
            owned.append(shape)
    return owned


def _state_bytes(spec: ExperimentSpec, element_count: int, tensor_count: int) -> int:
    """Adam/AdamW: two fp32 moments per element and a step per tensor; SGD (momentum 0): none."""
    if spec.optimizer.name == "sgd":
        return 0
    return 2 * element_count * FLOAT_BYTES + tensor_count * STEP_BYTES


def _dtype_bytes(dtype: str | None, default: str = "fp32") -> int:
    return DTYPE_BYTES[dtype or default]


def unit_shapes(spec: ExperimentSpec) -> dict[str, list[tuple[int, ...]]]:
    """The FSDP units memexp.sharding makes: each layer's tensors, and the root's (the rest)."""
    return {
        "layer": analytic.layer_parameter_shapes(spec.model),
        "root": analytic.outer_parameter_shapes(spec.model),
    }


def gradient_bucket_bytes(spec: ExperimentSpec) -> int:
    """DDP's buckets: a flat fp32 copy of every gradient, on every rank of ddp and zero1."""
    if spec.parallel.name not in BUCKETED_MODES:
        return 0
    return analytic.parameter_count(spec.model) * FLOAT_BYTES


def figures(spec: ExperimentSpec) -> dict[str, Any]:
    """Rank 0's sharded states and communication buffers, beside every record of a parallel job
    (`analytic_rank_*`); nothing for parallel=none."""
    parallel: ParallelConfig = spec.parallel
    if parallel.name == PARALLEL_NONE:
        return {}
    n = parallel.world_size
    shapes = analytic.parameter_shapes(spec.model)
    total = sum(map(elements, shapes))
    out: dict[str, Any] = {
        "analytic_rank_total_params_bytes": total * FLOAT_BYTES,
        "analytic_rank_gradient_bucket_bytes": gradient_bucket_bytes(spec),
    }
    if parallel.name in FULLY_SHARDED_MODES:
        own = sum(rank_elements(shape, n) for shape in shapes)
        param_bytes = _dtype_bytes(parallel.param_dtype)
        reduce_bytes = _dtype_bytes(parallel.reduce_dtype, parallel.param_dtype or "fp32")
        out.update(
            analytic_rank_params_bytes=own * FLOAT_BYTES,
            analytic_rank_grads_bytes=own * FLOAT_BYTES,
            analytic_rank_optimizer_state_bytes=_state_bytes(spec, own, len(shapes)),
            # Padding of all ranks together: N · rank's bytes = total bytes + padding.
            analytic_padding_bytes=(own * n - total) * FLOAT_BYTES,
        )
        for unit, unit_tensors in unit_shapes(spec).items():
            padded = sum(padded_elements(shape, n) for shape in unit_tensors)
            out[f"analytic_unsharded_{unit}_params_bytes"] = (
                sum(map(elements, unit_tensors)) * param_bytes
            )
            out[f"analytic_all_gather_{unit}_bytes"] = padded * param_bytes
            out[f"analytic_reduce_scatter_{unit}_bytes"] = padded * reduce_bytes
        return out
    owned = zero1_rank_shapes(shapes, n) if parallel.name == ZERO1 else shapes
    out.update(
        analytic_rank_params_bytes=total * FLOAT_BYTES,
        analytic_rank_grads_bytes=total * FLOAT_BYTES,
        analytic_rank_optimizer_state_bytes=_state_bytes(
            spec, sum(map(elements, owned)), len(owned)
        ),
    )
    return out
