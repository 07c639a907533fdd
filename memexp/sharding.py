"""The model and optimizer one rank trains under a `parallel` mode: PyTorch's own wrappers.

    ddp     DistributedDataParallel: every rank holds everything, gradients all-reduced in buckets
    zero1   DDP + ZeroRedundancyOptimizer: each rank keeps and updates 1/N of the optimizer state
    zero2   fully_shard on every layer and the root, parameters kept gathered from forward to
            backward (reshard_after_forward=False): gradients and optimizer state sharded
    fsdp    fully_shard, parameters resharded after each forward (ZeRO-3) unless told otherwise

The wrappers need a process group: gloo between local processes, NCCL between GPUs, or PyTorch's
fake backend when nothing runs. Building the same wrappers in all three is what lets a measured
rank and a predicted one be compared tensor by tensor.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from memexp.config import FULLY_SHARDED_MODES, RESHARDING_MODE, ParallelConfig
from memexp.model import Transformer

DDP_MODES = ("ddp", "zero1")  # the modes that keep every parameter and gradient on every rank
OPTIMIZER_SHARDING_MODE = "zero1"  # ZeroRedundancyOptimizer over DDP
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def shard_model(model: Transformer, parallel: ParallelConfig, device: torch.device) -> nn.Module:
    """`model` wrapped for `parallel.name` on a one-dimensional mesh of every rank in the group."""
    if parallel.name in DDP_MODES:
        return DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if parallel.name not in FULLY_SHARDED_MODES:
        raise ValueError(f"no wrapper for parallel={parallel.name}")
    # Imported here: FSDP's and ZeRO's modules take seconds to import, and one device needs neither.
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    mesh = init_device_mesh(device.type, (parallel.world_size,))
    reshard = parallel.reshard_after_forward and parallel.name == RESHARDING_MODE
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[parallel.param_dtype] if parallel.param_dtype else None,
        reduce_dtype=DTYPES[parallel.reduce_dtype] if parallel.reduce_dtype else None,
    )
    offload = CPUOffloadPolicy() if parallel.cpu_offload else OffloadPolicy()
    for layer in model.layers:
        fully_shard(
            layer,
            mesh=mesh,
            reshard_after_forward=reshard,
            mp_policy=policy,
            offload_policy=offload,
        )
    # The root (embeddings, final norm, head): FSDP2 keeps it gathered from forward to backward
    # whatever it is told, since the head's backward would gather it again at once.
    fully_shard(
        model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy, offload_policy=offload
    )
    return model


def shard_optimizer(
    optimizer_class: type[torch.optim.Optimizer], model: nn.Module, lr: float, mode: str
) -> torch.optim.Optimizer:
    """The optimizer over the wrapped model's parameters (sharded ones under fully_shard);
    under zero1, ZeroRedundancyOptimizer keeping 1/N of its state per rank."""
    if mode == OPTIMIZER_SHARDING_MODE:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, lr=lr)
    return optimizer_class(model.parameters(), lr=lr)


def local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: ZeroRedundancyOptimizer keeps its partition's
    state in the optimizer it wraps (`optim`) and none of its own. Its module is looked up, not
    imported: where it was never imported, no optimizer can be one."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    if zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer):
        return optimizer.optim
    return optimizer
