"""memexp's `small` and `medium` are the seed's models, checked against the seed itself.

The reference below is written from the seed's description (the design sketch's "Reference
workloads (from the seed)"), not from memexp's modules: token + learned position embeddings with
exactly seq_len rows; per layer a pre-LayerNorm attention sub-block (bias-free qkv, explicit
softmax(QKᵀ/√d)·V, bias-free output projection, residual) and a pre-LayerNorm FFN sub-block
(bias-free hidden→4·hidden, GELU, bias-free 4·hidden→hidden, residual); a final LayerNorm; an
untied, bias-free vocabulary head; Adam at lr 1e-4; cross-entropy on random tokens.

Its weights are loaded into memexp's model under an explicit name map, and the two must then
agree exactly (`torch.equal`, no tolerance): both run the same float operations in the same
order on the same shapes, so any difference is a difference of model, not of rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor, nn

from memexp import analytic
from memexp.config import ExperimentSpec, OptimizerConfig
from memexp.configure import validate
from memexp.plan import CheckpointPlan
from memexp.training import Workload, backward, build_workload, forward_loss, optimizer_step

ComposeFn = Callable[..., DictConfig]

# The seed's presets (DESIGN.md): vocabulary, hidden, layers, heads, seq_len; FFN = 4 × hidden.
SEED_SHAPES = {
    "small": {"vocab": 10000, "hidden": 512, "layers": 6, "heads": 8, "seq_len": 256},
    "medium": {"vocab": 20000, "hidden": 1024, "layers": 12, "heads": 16, "seq_len": 512},
}
SEED_LR = 1e-4

# The seed's parameter counts, by hand (V vocabulary, h hidden, L layers, s positions; a layer
# is two LayerNorms 4h, qkv 3h², output h², FFN 4h² + 4h² = 12h² + 4h):
#   small:  V·h 5,120,000 + s·h 131,072 + 6 × 3,147,776 + final LayerNorm 1,024 + head 5,120,000
#         = 29,258,752 (the seed's published figure)
#   medium: V·h 20,480,000 + s·h 524,288 + 12 × 12,587,008 + 2,048 + head 20,480,000
#         = 192,530,432
SEED_PARAMETERS = {"small": 29_258_752, "medium": 192_530_432}


class SeedLayer(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.ln2 = nn.LayerNorm(hidden)
        self.ff1 = nn.Linear(hidden, 4 * hidden, bias=False)
        self.ff2 = nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        head_dim = hidden // self.heads
        q, k, v = (
            t.view(batch, seq, self.heads, head_dim).transpose(1, 2)
            for t in self.qkv(self.ln1(x)).split(hidden, dim=-1)
        )
        scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
        context = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, seq, hidden)
        x = x + self.out(context)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class SeedTransformer(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, seq_len: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, hidden)
        self.pos_emb = nn.Embedding(seq_len, hidden)  # the seed's max_seq_len=seq_len
        self.blocks = nn.ModuleList(SeedLayer(hidden, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1])
        x = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def reference_name(memexp_name: str) -> str:
    """The reference's name for one of memexp's parameters; KeyError for one the seed lacks."""
    outside = {
        "token_embedding.weight": "tok_emb.weight",
        "position_embedding.weight": "pos_emb.weight",
        "norm.weight": "ln_f.weight",
        "norm.bias": "ln_f.bias",
        "head.weight": "head.weight",
    }
    in_layer = {
        "attention.norm.weight": "ln1.weight",
        "attention.norm.bias": "ln1.bias",
        "attention.qkv.weight": "qkv.weight",
        "attention.out.weight": "out.weight",
        "ffn.norm.weight": "ln2.weight",
        "ffn.norm.bias": "ln2.bias",
        "ffn.up.weight": "ff1.weight",
        "ffn.down.weight": "ff2.weight",
    }
    if memexp_name in outside:
        return outside[memexp_name]
    _, index, rest = memexp_name.split(".", 2)  # layers.<i>.<rest>
    return f"blocks.{index}.{in_layer[rest]}"


def seed_spec(compose_cfg: ComposeFn, preset: str, *overrides: str) -> ExperimentSpec:
    return validate(compose_cfg(f"model={preset}", "logger=none", *overrides), cuda_available=False)


def reference_for(spec: ExperimentSpec) -> SeedTransformer:
    model = spec.model
    assert model.ffn_hidden == 4 * model.hidden
    return SeedTransformer(model.vocab_size, model.hidden, model.layers, model.heads, spec.seq_len)


@pytest.mark.parametrize(
    "preset",
    # Each composes afresh (half a second): the quick loop checks one preset.
    [p if p == "small" else pytest.param(p, marks=pytest.mark.slow) for p in sorted(SEED_SHAPES)],
)
def test_preset_has_the_seeds_shape_and_parameters(preset: str, compose_cfg: ComposeFn) -> None:
    """On the meta device: shapes only, the preset's own workload."""
    spec = seed_spec(compose_cfg, preset)
    shape = SEED_SHAPES[preset]
    model = spec.model
    assert (model.vocab_size, model.hidden, model.layers, model.heads, spec.seq_len) == (
        shape["vocab"],
        shape["hidden"],
        shape["layers"],
        shape["heads"],
        shape["seq_len"],
    )
    with torch.device("meta"):
        reference = reference_for(spec)
    work = build_workload(spec, CheckpointPlan.nothing(model.layers), "meta")
    reference_shapes = {name: p.shape for name, p in reference.named_parameters()}
    memexp_shapes = {reference_name(name): p.shape for name, p in work.model.named_parameters()}
    assert memexp_shapes == reference_shapes
    assert sum(p.numel() for p in reference.parameters()) == SEED_PARAMETERS[preset]
    assert sum(p.numel() for p in work.model.parameters()) == SEED_PARAMETERS[preset]
    assert analytic.parameter_count(model) == SEED_PARAMETERS[preset]


def test_the_default_optimizer_is_the_seeds(compose_cfg: ComposeFn) -> None:
    spec = seed_spec(compose_cfg, "small")
    assert spec.optimizer == OptimizerConfig() == OptimizerConfig(name="adam", lr=SEED_LR)


# The layout under test unchanged (width, depth, heads, FFN, no biases, a position table of
# seq.len rows); fewer tokens, and for medium a smaller vocabulary, keep two models' steps
# within seconds and a few hundred MiB on a CPU.
REDUCED_WORKLOADS = {
    "small": ("seq.len=64", "batch.size=2"),
    "medium": ("seq.len=32", "batch.size=1", "model.vocab_size=2000"),
}


def loaded_pair(spec: ExperimentSpec) -> tuple[Workload, SeedTransformer]:
    """memexp's workload for `spec`, its model holding the weights of a fresh reference."""
    work = build_workload(spec, CheckpointPlan.nothing(spec.model.layers), "cpu")
    torch.manual_seed(1)  # the reference's own initialisation, not memexp's
    reference = reference_for(spec)
    reference_state = reference.state_dict()
    memexp_names = [name for name, _ in work.model.named_parameters()]
    assert sorted(map(reference_name, memexp_names)) == sorted(reference_state)
    work.model.load_state_dict(
        {name: reference_state[reference_name(name)] for name in memexp_names}
    )
    return work, reference


def backward_both(work: Workload, reference: SeedTransformer) -> tuple[Tensor, Tensor]:
    """memexp's loss and the seed's cross-entropy on the same random tokens, both backpropagated."""
    loss = forward_loss(work)
    logits = reference(work.tokens)
    reference_loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), work.targets.view(-1))
    backward(loss)
    reference_loss.backward()
    return loss, reference_loss


def assert_parameters_equal(work: Workload, reference: SeedTransformer, of_gradients: bool) -> None:
    reference_parameters = dict(reference.named_parameters())
    for name, parameter in work.model.named_parameters():
        expected = reference_parameters[reference_name(name)]
        if of_gradients:
            assert torch.equal(parameter.grad, expected.grad), name
        else:
            assert torch.equal(parameter, expected), name


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(REDUCED_WORKLOADS))
def test_logits_loss_and_gradients_equal_the_seeds(preset: str, compose_cfg: ComposeFn) -> None:
    work, reference = loaded_pair(seed_spec(compose_cfg, preset, *REDUCED_WORKLOADS[preset]))
    with torch.no_grad():
        assert torch.equal(work.model(work.tokens), reference(work.tokens))
    loss, reference_loss = backward_both(work, reference)
    assert torch.equal(loss, reference_loss)
    assert_parameters_equal(work, reference, of_gradients=True)


@pytest.mark.slow
def test_one_adam_step_equals_the_seeds(compose_cfg: ComposeFn) -> None:
    """memexp's default optimizer makes the seed's update (Adam, lr 1e-4), weight for weight."""
    work, reference = loaded_pair(seed_spec(compose_cfg, "small", *REDUCED_WORKLOADS["small"]))
    backward_both(work, reference)
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=SEED_LR)
    optimizer_step(work)
    reference_optimizer.step()
    assert_parameters_equal(work, reference, of_gradients=False)
