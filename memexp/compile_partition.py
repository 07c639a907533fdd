"""The backend a compiled forward runs under, and what its partitioner chose to recompute.

`aot_eager_decomp_partition` is PyTorch's backend of that name put together from the same parts:
AOTAutograd with inductor's decompositions and the min-cut rematerialisation partitioner, each
graph run operator by operator (`boxed_nop`). Built here, it also keeps every backward graph it
is handed, because that graph says what the partitioner chose: each node of it that AOTAutograd
traced in the forward (`partitioner_tag` "is_forward") is forward work run again in backward.

Because these graphs run operator by operator, a TorchDispatchMode that lets compiled code run
under it (`ignore_compile_internals`) sees every operator of the compiled step, so the tensor
tracker can measure the compiled step itself. Inductor's kernels allocate their buffers outside
the dispatcher, so under `inductor` no mode sees them, and nothing is recorded here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import import_module
from typing import Any

import torch
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch._functorch.partitioners import min_cut_rematerialization_partition

from memexp.plan import CompiledForward

FORWARD_TAG = "is_forward"  # AOTAutograd's `partitioner_tag` of a node traced in the forward


def inductor_decompositions() -> dict[Any, Callable[..., Any]]:
    """The decompositions inductor lowers with (imported late: inductor is slow to import)."""
    return import_module("torch._inductor.compile_fx").select_decomp_table()


class PartitionRecorder:
    """A torch.compile backend: `aot_eager_decomp_partition`, keeping each backward graph.

    Backward graphs are compiled lazily, at the first backward, so they are here from the end of
    the first step on.
    """

    def __init__(self) -> None:
        self.backward_graphs: list[fx.GraphModule] = []
        self._backend = aot_autograd(
            fw_compiler=boxed_nop,
            bw_compiler=self._keep_backward,
            partition_fn=min_cut_rematerialization_partition,
            decompositions=inductor_decompositions,
        )

    def _keep_backward(self, graph: fx.GraphModule, example_inputs: list[Any]) -> Any:
        self.backward_graphs.append(graph)
        return boxed_nop(graph, example_inputs)

    def __call__(self, graph: fx.GraphModule, example_inputs: list[Any]) -> Any:
        return self._backend(graph, example_inputs)

    def recomputed_nodes(self) -> Iterator[fx.Node]:
        """Every operator node of the backward graphs that runs forward work again."""
        for graph in self.backward_graphs:
            for node in graph.graph.nodes:
                if (
                    node.op == "call_function"
                    and isinstance(node.target, torch._ops.OpOverload)
                    and node.meta.get("partitioner_tag") == FORWARD_TAG
                ):
                    yield node


def compile_backend(compiled: CompiledForward) -> PartitionRecorder | str:
    """What `torch.compile` is given for `compiled`: a recorder where the graphs run operator by
    operator, else the backend's name."""
    if compiled.operator_by_operator:
        return PartitionRecorder()
    return compiled.backend
