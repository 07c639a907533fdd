"""Bytes autograd keeps for backward: the activation memory a checkpoint plan actually holds.

A saved-tensors hook sees every tensor saved during the forward, including the inputs a
non-reentrant checkpoint keeps to recompute from. Storages are counted once (q, k and v are
views of one projection output) and parameters are left out: they are not activations.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef

from memexp.storage import SavedTensorStorage

SAVED_SOURCE = "saved_tensors_hooks"


def parameter_storages(modules: tuple[nn.Module, ...]) -> set[int]:
    """The storages (by their address, `_cdata`) of the parameters `modules` hold now. Read at
    every save, not once: a model sharded by `fully_shard` registers a layer's gathered,
    unsharded parameters only while the layer computes, and those are parameters too (its
    sharded DTensors hold no storage here).

    The modules are listed once by the caller and their own parameters read directly: walking
    the module tree at every save (`model.parameters()`) cost a 32-layer model seconds a step.
    """
    return {
        p.untyped_storage()._cdata
        for module in modules
        for p in module._parameters.values()
        if p is not None and not isinstance(p, DTensor)
    }


@contextlib.contextmanager
def counting_saved_bytes(
    model: nn.Module, storage: SavedTensorStorage | None = None, for_backward: bool = True
) -> Iterator[Callable[[], int]]:
    """Count the distinct non-parameter storages autograd saves inside the block.

    Yields a function returning the total so far. Saved-tensor hooks do not compose (the
    innermost pair alone runs), so a compressing `storage` packs inside these hooks and what it
    holds is counted: compressed data and scales, as stored. Offloading is left out (the caller
    runs the forward without its hooks): offloaded tensors are counted where they are made.

    `for_backward=False` keeps nothing for a backward, for a forward run only to count: a hook
    that returns a saved tensor makes a reference cycle through autograd's graph that only a
    backward breaks, so the graph would outlive its loss and the next step would start with
    its tensors alive.
    """
    seen: dict[StorageWeakRef, int] = {}
    modules = tuple(model.modules())  # fixed during a step; their parameters are not

    def pack(tensor: torch.Tensor) -> Any:
        packed = storage.pack(tensor) if storage is not None else tensor
        held = SavedTensorStorage.held(packed) if storage is not None else (tensor,)
        for kept in held:
            kept_storage = kept.untyped_storage()
            if kept_storage._cdata not in parameter_storages(modules):
                seen[StorageWeakRef(kept_storage)] = kept_storage.nbytes()
        return packed if for_backward else None

    def unpack(packed: Any) -> torch.Tensor:
        return storage.unpack(packed) if storage is not None else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield lambda: sum(seen.values())


# Why a plan with an op-level policy records no saved-bytes figure.
OP_POLICY_NOTE = (
    "not recorded: an op-level policy keeps its outputs in the selective-checkpoint cache, "
    "which saved-tensor hooks do not see; activations_bytes (tensor tracker) includes them"
)

# Why a plan whose layers store saved tensors their own way records no saved-bytes figure.
STORED_LAYERS_NOTE = (
    "not recorded: layers or units with their own storage pack what they save in their own hooks, "
    "which the counting hooks do not see; activations_bytes (tensor tracker) includes them"
)
