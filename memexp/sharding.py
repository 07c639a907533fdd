"""One rank's share of a workload: the model and optimizer as `parallel.name` spreads them.

Each mode is PyTorch's own implementation where one exists, so that the bytes a tracker sees on
a rank are the bytes that implementation holds:

* `fsdp`: FSDP2's `fully_shard` on every layer and on the whole model (the root unit holds the
  embeddings, the final LayerNorm and the head), resharding after forward as asked;
* `zero2`: the same with `reshard_after_forward=False`: parameters are gathered once a step and
  kept to the backward, gradients are reduce-scattered, optimizer state is sharded;
* `zero1`: `ZeroRedundancyOptimizer` (whole parameters assigned to ranks, each rank keeping the
  optimizer state of its own) over an unsharded model;
* `ddp` and `none`: the model and optimizer are every rank's whole. DDP's gradient buckets are
  not built here: they are persistent buffers, composed in closed form (memexp.sharded_states).

The process group (the fake one on the fake device, gloo or NCCL when ranks run) and the mesh
are the caller's: this module only decides what each rank holds.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from memexp.config import (
    FULLY_SHARDED_MODES,
    OPTIMIZER_SHARDED_MODE,
    ParallelConfig,
)
from memexp.sharded_states import BUCKETED_MODES
from memexp.training import OPTIMIZER_CLASSES, Workload, build_optimizer

# `parallel.param_dtype` / `reduce_dtype` → torch dtypes (None: the parameters' own).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def mixed_precision(parallel: ParallelConfig) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(
        param_dtype=DTYPES.get(parallel.param_dtype or ""),
        reduce_dtype=DTYPES.get(parallel.reduce_dtype or ""),
    )


def shard_workload(work: Workload, mesh: DeviceMesh | None) -> None:
    """Spread `work`'s model and optimizer over the ranks of `mesh` (its process group) in place,
    as `work.spec.parallel` says; the optimizer is built afresh over what the rank holds."""
    parallel = work.spec.parallel
    if parallel.name in FULLY_SHARDED_MODES:
        assert mesh is not None, "fully_shard needs the ranks' device mesh"
        options = {
            "mesh": mesh,
            "reshard_after_forward": parallel.reshards_after_forward(),
            "mp_policy": mixed_precision(parallel),
        }
        for layer in work.model.layers:
            fully_shard(layer, **options)
        fully_shard(work.model, **options)
        work.optimizer = build_optimizer(work.spec, work.model)
    elif parallel.name == OPTIMIZER_SHARDED_MODE:
        work.optimizer = ZeroRedundancyOptimizer(
            work.model.parameters(),
            optimizer_class=OPTIMIZER_CLASSES[work.spec.optimizer.name],
            lr=work.spec.optimizer.lr,
        )


def synchronize_gradients(work: Workload) -> None:
    """Where ranks really run: wrap the model of ddp and zero1 in DistributedDataParallel, which
    all-reduces every gradient in backward as their training does. Not on the fake device: DDP's
    reducer cannot run on fake tensors, so its buckets are composed in closed form there."""
    if work.spec.parallel.name not in BUCKETED_MODES:
        return
    device = work.tokens.device
    work.model = DistributedDataParallel(  # type: ignore[assignment]
        work.model, device_ids=[device] if device.type == "cuda" else None
    )
