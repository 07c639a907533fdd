"""Closed-form activation memory: the bytes autograd keeps for backward, derived by hand.

`saved_activation_bytes` predicts exactly what `memexp.measure.saved.counting_saved_bytes`
measures around `forward_loss`, for any CheckpointPlan without an op-level policy, from the
shapes alone. Having both lets each check the other: the measurement proves the derivation, the
derivation explains every byte of the measurement, and the formula prices shapes that no machine
here could run.

Conventions, as in the measurement: a tensor counts by its storage, once, however many views of
it autograd saves (q, k and v are views of one projection output); parameters are not
activations. Symbols: batch b, sequence s, hidden h, heads a, FFN width f, vocabulary V.
Activations are fp32 (4 bytes); token ids, positions and targets are int64 (8 bytes).

What one pre-LayerNorm layer saves, op by op (naive attention, matmul folds 3-D inputs to 2-D):

attention sub-block
    LayerNorm              its input x (b·s·h) and the per-row mean and rstd (b·s each)
    qkv projection         its input, the normalised x (b·s·h)
    QKᵀ (batched matmul)   q and kᵀ: strided views of the projection output, so matmul's
                           reshape copies each to contiguous memory (b·s·h each)
    ÷√d                    nothing (a scalar divisor)
    softmax                its output, the attention probabilities (a·b·s²)
    probs·V                the probabilities (already counted) and a contiguous copy of v (b·s·h)
    output projection      its input, the heads merged back by a copying reshape (b·s·h)
    residual add           nothing
FFN sub-block
    LayerNorm              input (b·s·h), mean and rstd (b·s each)
    up projection          its input, the normalised x (b·s·h)
    GELU                   its input (b·s·f)
    down projection        its input, the GELU output (b·s·f)

Fused attention (`attention: sdpa`, the CPU flash kernel; CUDA's flash and memory-efficient
kernels save the same) keeps q, k and v as they are, i.e. the one projection output (3·b·s·h),
its output (b·s·h) and a per-row logsumexp (a·b·s, fp32) instead of the a·b·s² probabilities.
Its output is laid out (b, s, a, d), so merging the heads is a view: the output projection's
input is the kernel's output, counted once.

Under a checkpoint only the checkpoint's tensor inputs are kept (non-reentrant checkpointing
saves them through the same autograd hooks); everything inside is recomputed in backward.
A whole layer or sub-block under a checkpoint therefore keeps its input x (b·s·h). A recomputed
attention core keeps its inputs q, k and v: three views of the one projection output (3·b·s·h),
in place of the q, kᵀ and v copies and the probabilities.

Besides activations (docs/memory_model.md derives them all): parameters, their gradients and
the optimizer's state are fp32 whatever the precision (autocast keeps fp32 weights); Adam keeps
two moments per parameter and a 0-d fp32 step count per parameter tensor. The optimizer step
itself needs scratch: per tensor, sqrt(v) and its quotient (twice the largest tensor) when the
step loops over tensors, as on a CPU; sqrt(v) of every tensor at once (one more copy of the
parameters) with the multi-tensor `foreach` implementation PyTorch uses by default on CUDA.
"""

from __future__ import annotations

import math
from typing import Any

from memexp.config import ConfigError, ExperimentSpec, ModelConfig
from memexp.plan import CheckpointPlan, Part

FLOAT_BYTES = 4  # fp32 activations
INDEX_BYTES = 8  # int64 token ids, positions and targets


def layer_norm_bytes(b: int, s: int, h: int) -> int:
    """LayerNorm keeps its input and, per row, the mean and reciprocal standard deviation."""
    return (b * s * h + 2 * b * s) * FLOAT_BYTES


def checkpoint_input_bytes(b: int, s: int, h: int) -> int:
    """A checkpointed layer, segment or sub-block keeps only its input: one residual stream."""
    return b * s * h * FLOAT_BYTES


def attention_block_bytes(
    b: int, s: int, h: int, a: int, core_recomputed: bool, attention: str = "naive"
) -> int:
    """The attention sub-block, its core (QKᵀ, softmax, ·V, or the fused kernel) kept or recomputed."""
    qkv_input = b * s * h * FLOAT_BYTES
    if core_recomputed:
        core = 3 * b * s * h * FLOAT_BYTES  # the checkpoint's inputs q, k, v share one storage
    elif attention == "sdpa":
        projection_output = 3 * b * s * h * FLOAT_BYTES  # q, k, v: views of one storage
        logsumexp = a * b * s * FLOAT_BYTES
        core = projection_output + logsumexp
    else:
        q_k_v_copies = 3 * b * s * h * FLOAT_BYTES
        probabilities = a * b * s * s * FLOAT_BYTES
        core = q_k_v_copies + probabilities
    merged_heads = b * s * h * FLOAT_BYTES  # input of the output projection (sdpa: its output)
    return layer_norm_bytes(b, s, h) + qkv_input + core + merged_heads


def ffn_block_bytes(b: int, s: int, h: int, f: int) -> int:
    """The FFN sub-block: LayerNorm, the up projection's input, GELU's input and output."""
    up_input = b * s * h * FLOAT_BYTES
    gelu_input = b * s * f * FLOAT_BYTES
    down_input = b * s * f * FLOAT_BYTES
    return layer_norm_bytes(b, s, h) + up_input + gelu_input + down_input


def outside_layers_bytes(b: int, s: int, h: int, v: int) -> int:
    """Embeddings, final LayerNorm, vocabulary head and loss: kept by every plan.

    The embedding lookups keep their indices (token ids, positions); the head keeps its input;
    cross-entropy keeps the log-softmax output and, for nll_loss, the targets and the 0-d sum of
    class weights.
    """
    token_ids = b * s * INDEX_BYTES
    positions = s * INDEX_BYTES
    head_input = b * s * h * FLOAT_BYTES
    log_probabilities = b * s * v * FLOAT_BYTES
    targets = b * s * INDEX_BYTES
    total_weight = FLOAT_BYTES
    return (
        token_ids
        + positions
        + layer_norm_bytes(b, s, h)
        + head_input
        + log_probabilities
        + targets
        + total_weight
    )


def saved_activation_bytes(spec: ExperimentSpec, plan: CheckpointPlan) -> int:
    """Bytes autograd keeps for backward after the forward and loss of `spec` under `plan`.

    Offloading moves these bytes to host memory without changing them, so an offloading plan
    has the same figure. Covers fp32 with either attention core; op-level policies decide
    per operator at run time and have no closed form here.
    """
    model = spec.model
    if spec.precision != "fp32":
        raise ConfigError("precision", spec.precision, "fp32 (the closed form's dtype)")
    if plan.op_policy is not None:
        raise ConfigError("plan.op_policy", plan.op_policy, "None (no closed form per operator)")

    b, s, h = spec.batch_size, spec.seq_len, model.hidden
    total = outside_layers_bytes(b, s, h, model.vocab_size)
    total += len(plan.segments) * checkpoint_input_bytes(b, s, h)
    in_segments = {layer for start, end in plan.segments for layer in range(start, end)}
    for layer in range(model.layers):
        if layer in in_segments:
            continue
        parts = plan.parts_of(layer)
        if Part.ATTENTION in parts:
            total += checkpoint_input_bytes(b, s, h)
        else:
            total += attention_block_bytes(
                b,
                s,
                h,
                model.heads,
                core_recomputed=Part.ATTENTION_CORE in parts,
                attention=model.attention,
            )
        if Part.FFN in parts:
            total += checkpoint_input_bytes(b, s, h)
        else:
            total += ffn_block_bytes(b, s, h, model.ffn_hidden)
    return total


# --- parameters, gradients, optimizer state ------------------------------------------------


def layer_parameter_shapes(model: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of one layer's parameter tensors, in the order it registers them: a LayerNorm
    (weight, bias), the qkv and output projections, a LayerNorm, the FFN's up and down
    projections (each projection a weight, out × in, and a bias only when `model.bias`)."""
    h, f = model.hidden, model.ffn_hidden

    def projection(outputs: int, inputs: int) -> list[tuple[int, ...]]:
        return [(outputs, inputs), (outputs,)] if model.bias else [(outputs, inputs)]

    attention = [(h,), (h,), *projection(3 * h, h), *projection(h, h)]
    return [*attention, (h,), (h,), *projection(f, h), *projection(h, f)]


def outer_parameter_shapes(model: ModelConfig) -> list[tuple[int, ...]]:
    """Shapes of the parameters outside the layers: the embeddings (tokens; positions, one row
    per `max_seq_len`, the resolved table), the final LayerNorm, the untied bias-free head."""
    h, v = model.hidden, model.vocab_size
    positions = model.max_seq_len
    assert positions is not None, "validate() resolves max_seq_len"
    return [(v, h), (positions, h), (h,), (h,), (v, h)]


def parameter_shapes(model: ModelConfig) -> list[tuple[int, ...]]:
    """Every parameter tensor's shape, in the order the model registers them."""
    outer = outer_parameter_shapes(model)
    return [*outer[:2], *layer_parameter_shapes(model) * model.layers, *outer[2:]]


def elements(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def parameter_sizes(model: ModelConfig) -> list[int]:
    """Elements of every parameter tensor, in the order the model registers them."""
    return [elements(shape) for shape in parameter_shapes(model)]


def parameter_count(model: ModelConfig) -> int:
    return sum(parameter_sizes(model))


def parameter_tensor_count(model: ModelConfig) -> int:
    """8 tensors a layer (2 LayerNorms of 2, 4 projection weights), 12 with biases; 5 outside
    (2 embeddings, the final LayerNorm's 2, the head's weight)."""
    return len(parameter_sizes(model))


def optimizer_state_bytes(spec: ExperimentSpec) -> int:
    """Adam/AdamW: exp_avg and exp_avg_sq per parameter, a 0-d fp32 step per tensor; SGD: none."""
    if spec.optimizer.name == "sgd":  # momentum 0 keeps no buffer
        return 0
    model = spec.model
    return 2 * parameter_count(model) * FLOAT_BYTES + parameter_tensor_count(model) * FLOAT_BYTES


def optimizer_scratch_bytes(spec: ExperimentSpec, multi_tensor: bool) -> int:
    """The optimizer step's own temporaries at their largest.

    Multi-tensor Adam takes sqrt(v) of every tensor at once: one more copy of the parameters.
    The per-tensor loop makes sqrt(v) and its quotient by the bias correction (2 tensors of the
    parameter's size) while the previous parameter's quotient is still held.
    """
    if spec.optimizer.name == "sgd":
        return 0
    sizes = parameter_sizes(spec.model)
    if multi_tensor:
        return sum(sizes) * FLOAT_BYTES
    # The loop's `denom` of the previous tensor is still referenced while the next is made.
    held = [0, *sizes[:-1]]
    return (
        max(previous + 2 * size for previous, size in zip(held, sizes, strict=True)) * FLOAT_BYTES
    )


def batch_bytes(spec: ExperimentSpec) -> int:
    """Token ids and targets, int64, alive for the whole step."""
    return 2 * spec.batch_size * spec.seq_len * INDEX_BYTES


def optimizer_step_peak_bytes(spec: ExperimentSpec, multi_tensor: bool) -> int:
    """Memory at the optimizer step's peak: every weight, gradient and state tensor, the batch,
    and the step's scratch; the forward's activations are gone by then."""
    weights = parameter_count(spec.model) * FLOAT_BYTES
    return (
        2 * weights  # parameters and their gradients
        + optimizer_state_bytes(spec)
        + batch_bytes(spec)
        + optimizer_scratch_bytes(spec, multi_tensor)
    )


def figures(spec: ExperimentSpec, plan: CheckpointPlan, multi_tensor: bool) -> dict[str, Any]:
    """The closed-form figures a record carries beside measured or predicted ones (`extra`).

    `analytic_saved_activation_bytes` is None where there is no closed form; the reason is then
    in `analytic_saved_activation_note`.
    """
    weights = parameter_count(spec.model) * FLOAT_BYTES
    out: dict[str, Any] = {
        "analytic_source": "closed_form",
        "analytic_params_bytes": weights,
        "analytic_grads_bytes": weights,
        "analytic_optimizer_state_bytes": optimizer_state_bytes(spec),
        "analytic_optimizer_step_peak_bytes": optimizer_step_peak_bytes(spec, multi_tensor),
    }
    try:
        out["analytic_saved_activation_bytes"] = saved_activation_bytes(spec, plan)
    except ConfigError as error:
        out["analytic_saved_activation_bytes"] = None
        out["analytic_saved_activation_note"] = str(error)
    return out


STEP_FLOOR_RULE = (
    "the larger of the optimizer step's peak and the weights, optimizer state, batch and "
    "activations kept for backward"
)


def step_floor_bytes(spec: ExperimentSpec, plan: CheckpointPlan, multi_tensor: bool) -> int:
    """A lower bound on the step's peak, from shapes alone (`STEP_FLOOR_RULE`).

    Both terms are alive at once in every real step: at the optimizer step's peak, and at the end
    of the forward (weights, the previous step's optimizer state, the batch and what autograd
    keeps). Where the activations have no closed form (bf16, op-level policies) they count zero,
    so the bound stays a bound.
    """
    try:
        activations = saved_activation_bytes(spec, plan)
    except ConfigError:
        activations = 0
    forward_end = (
        parameter_count(spec.model) * FLOAT_BYTES
        + optimizer_state_bytes(spec)
        + batch_bytes(spec)
        + activations
    )
    return max(optimizer_step_peak_bytes(spec, multi_tensor), forward_end)
