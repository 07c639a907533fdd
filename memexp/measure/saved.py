"""Bytes autograd keeps for backward: the activation memory a checkpoint plan actually holds.

A saved-tensors hook sees every tensor saved during the forward, including the inputs a
non-reentrant checkpoint keeps to recompute from. Storages are counted once (q, k and v are
views of one projection output) and parameters are left out: they are not activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef

SAVED_SOURCE = "saved_tensors_hooks"


def parameter_storages(model: nn.Module) -> set[StorageWeakRef]:
    """The storages of the parameters `model` holds now. Read at every save, not once: a model
    sharded by `fully_shard` registers a layer's gathered, unsharded parameters only while the
    layer computes, and those are parameters too (its sharded DTensors hold no storage here)."""
    return {
        StorageWeakRef(p.untyped_storage())
        for p in model.parameters()
        if not isinstance(p, DTensor)
    }


@contextlib.contextmanager
def counting_saved_bytes(model: nn.Module) -> Iterator[Callable[[], int]]:
    """Count the distinct non-parameter storages autograd saves inside the block.

    Yields a function returning the total so far. Nested saved-tensor hooks (offloading) take
    precedence over this one, so offloading plans are counted with their tensors kept in place.
    """
    seen: dict[StorageWeakRef, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ref = StorageWeakRef(storage)
        if ref not in parameter_storages(model):
            seen[ref] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield lambda: sum(seen.values())


# Why a plan with an op-level policy records no saved-bytes figure.
OP_POLICY_NOTE = (
    "not recorded: an op-level policy keeps its outputs in the selective-checkpoint cache, "
    "which saved-tensor hooks do not see; activations_bytes (tensor tracker) includes them"
)
