"""Real architectures (Llama, Mistral, GPT-2), built by `transformers` from a preset's values.

The model is the library's own (`LlamaForCausalLM`, `MistralForCausalLM`, `GPT2LMHeadModel`,
built from a config, never from a hub), taken apart into its embeddings, decoder layers, final
norm and head, and put behind the seed model's interface (memexp.model.PlannedLayers): `.layers`,
`.apply_plan(plan)`, `forward(tokens) -> logits`. So every strategy, device, the tracker and the
FLOP counter see a real architecture exactly as they see the seed's layer.

Plan units map onto a decoder layer as on the seed's:

* `attention`: the self-attention sub-block with its input norm and residual
  (`input_layernorm` + `self_attn`; GPT-2's `ln_1` + `attn`);
* `ffn`: the MLP sub-block with its norm and residual (`post_attention_layernorm` + `mlp`;
  `ln_2` + `mlp`);
* `attention_core`: the attention function `self_attn` calls through transformers'
  `AttentionInterface` (eager: QKᵀ, mask, softmax, ·V; sdpa: the fused kernel), from q, k and v
  after the rotary embedding. memexp registers its own implementation names, `memexp_eager`
  and `memexp_sdpa`, which build the same masks as `eager` and `sdpa` and run the library's own
  function, under a checkpoint where the plan says so;
* `layer`: the whole decoder layer.

Each unit is recomputed whole or element-wise under its own op-level policy (a plan's
`selective`), as memexp.model.layer_units says; segments (with their policy or saved-operator
list), a layer's own storage (`stored`), the plan-wide storage and a compiled forward are
PlannedLayers' and the training step's, the same for every architecture.

As in the seed there is no dropout (GPT-2's published 0.1 is set to 0: a dropout mask changes
which tensors are kept and makes no step repeatable) and no KV cache. The parameters are fp32
whatever the precision (autocast computes in bf16), as in the seed's model, and the dtype is set
at construction: fake parameters cannot be converted afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from memexp.config import ModelConfig, require_transformers
from memexp.model import LayerUnits, PlannedLayers, Recompute, Stored, run_unit
from memexp.plan import LAYER, Part

# memexp's attention implementation for each `model.attention`, and the library's it wraps.
IMPLEMENTATIONS = {"naive": ("memexp_eager", "eager"), "sdpa": ("memexp_sdpa", "sdpa")}
# The keyword that carries the attention core to run through the library's attention module.
CORE_KEYWORD = "memexp_core"


def planned_attention(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The function `self_attn` calls for its core: the one its layer handed it (CORE_KEYWORD)."""
    core = kwargs.pop(CORE_KEYWORD)
    return core(module, *args, **kwargs)


@functools.cache
def register_implementations() -> None:
    """Register memexp's attention implementations (once per process): the same masks as the
    library's eager and sdpa, and `planned_attention` as the attention function."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    for ours, theirs in IMPLEMENTATIONS.values():
        AttentionInterface.register(ours, planned_attention)
        AttentionMaskInterface.register(ours, AttentionMaskInterface._global_mapping[theirs])


def run_as(core: Callable[..., Any], how: Recompute | Stored) -> Callable[..., Any]:
    """`core` run as `how` says: recomputed (whole: only q, k, v and the mask are kept; under an
    op-level policy: its operators' outputs too), or stored its own way."""

    def run(module: nn.Module, *tensors: torch.Tensor | None, **kwargs: Any) -> Any:
        return how.run(functools.partial(core, module, **kwargs), *tensors)

    return run


@dataclass(frozen=True)
class SubBlocks:
    """The attribute names of a decoder layer's two sub-blocks in the library's module."""

    attention_norm: str
    attention: str
    ffn_norm: str
    ffn: str


class DecoderLayer(nn.Module):
    """One of the library's decoder layers, run sub-block by sub-block as a plan says.

    Its four modules are registered in the order the forward runs them (so the optimizer visits
    the parameters in that order); `attention_inputs` are the keywords the model passes every layer's attention (the mask,
    rotary embeddings, positions); `core` is the attention function of the model's kind.
    """

    def __init__(self, block: nn.Module, names: SubBlocks, core: Callable[..., Any]) -> None:
        super().__init__()
        self.attention_norm = getattr(block, names.attention_norm)
        self.attention = getattr(block, names.attention)
        self.ffn_norm = getattr(block, names.ffn_norm)
        self.mlp = getattr(block, names.ffn)
        self.core = core

    def attention_block(
        self,
        x: torch.Tensor,
        attention_inputs: dict[str, Any],
        core: Recompute | Stored | None = None,
    ) -> torch.Tensor:
        function = self.core if core is None else run_as(self.core, core)
        out, _ = self.attention(
            self.attention_norm(x), **attention_inputs, **{CORE_KEYWORD: function}
        )
        return x + out

    def ffn_block(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ffn_norm(x))

    def unit_runs(
        self, x: torch.Tensor, attention_inputs: dict[str, Any]
    ) -> dict[str, Callable[[], torch.Tensor]]:
        """One forward of each recomputable unit on `x`; the core on the q, k, v and mask this
        layer's attention hands it (taken from one forward of the sub-block)."""
        handed: dict[str, Any] = {}

        def take(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            handed.update(module=module, args=args, kwargs=kwargs)
            return self.core(module, *args, **kwargs)

        self.attention(self.attention_norm(x), **attention_inputs, **{CORE_KEYWORD: take})
        return {
            Part.ATTENTION_CORE.value: lambda: self.core(
                handed["module"], *handed["args"], **handed["kwargs"]
            )[0],
            Part.ATTENTION.value: lambda: self.attention_block(x, attention_inputs),
            Part.FFN.value: lambda: self.ffn_block(x),
            LAYER: lambda: self(x, None, attention_inputs),
        }

    def forward(
        self,
        x: torch.Tensor,
        units: LayerUnits | None = None,
        attention_inputs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """One layer, each unit in `units` recomputed as it says (nothing given: all kept)."""
        units = units or {}
        inputs = attention_inputs or {}
        if LAYER in units:
            return units[LAYER].run(self._blocks, x, {}, inputs)
        return self._blocks(x, units, inputs)

    def _blocks(
        self, x: torch.Tensor, units: LayerUnits, attention_inputs: dict[str, Any]
    ) -> torch.Tensor:
        core = units.get(Part.ATTENTION_CORE.value)
        attention = functools.partial(self.attention_block, core=core)
        x = run_unit(units.get(Part.ATTENTION.value), attention, x, attention_inputs)
        return run_unit(units.get(Part.FFN.value), self.ffn_block, x)


class PretrainedDecoder(PlannedLayers):
    """A library decoder-only model behind the seed model's interface.

    Subclasses take the pieces out of the library's model (`_take_pieces`: embeddings, final
    norm and head; it returns the decoder layers) and say how tokens are embedded and what every
    layer's attention is given.
    """

    NAMES: SubBlocks

    def __init__(self, cfg: ModelConfig, library_model: nn.Module, eager: Callable) -> None:
        super().__init__(cfg.layers)
        self.cfg = cfg
        self.library_config = library_model.config
        library_kind = LIBRARY_IMPLEMENTATION[library_model.config._attn_implementation]
        if library_kind == "eager":
            core = eager
        else:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            core = sdpa_attention_forward
        blocks, norm, head = self._take_pieces(library_model)
        # Registered in the order of the forward (embeddings, layers, norm, head), which is the
        # order the optimizer visits them in, as in the seed's model.
        self.layers = nn.ModuleList(DecoderLayer(block, self.NAMES, core) for block in blocks)
        self.norm = norm
        self.head = head

    def _take_pieces(self, library_model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
        """Keep the embeddings; return the decoder layers, the final norm and the head."""
        raise NotImplementedError

    def _attention_inputs(self, x: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def layer_inputs(self, x: torch.Tensor) -> tuple[Any, ...]:
        """Every layer's attention is given the same mask and positions, made once."""
        return (self._attention_inputs(x),)


# memexp's implementation name → the library's whose masks and function it uses.
LIBRARY_IMPLEMENTATION = dict(IMPLEMENTATIONS.values())


def _positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1], device=x.device).unsqueeze(0)


def _mask_arguments(library_config: Any, x: torch.Tensor) -> dict[str, Any]:
    """The library's mask functions for one unpadded sequence a row. No positions are passed:
    from positions the library looks for packed sequences, which it cannot read on fake
    tensors, so it would build a mask there that real tensors never get (ours never pack)."""
    return {
        "config": library_config,
        "inputs_embeds": x,
        "attention_mask": None,
        "cache": None,
        "position_ids": None,
    }


class RotaryDecoder(PretrainedDecoder):
    """Llama and Mistral: token embedding, rotary positions, RMSNorm, grouped-query attention,
    gated SiLU MLP (SwiGLU), untied head; Mistral's mask sees a sliding window."""

    NAMES = SubBlocks("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")

    def _take_pieces(self, library_model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
        inner = library_model.model
        self.embed_tokens = inner.embed_tokens
        self.rotary_emb = inner.rotary_emb
        return inner.layers, inner.norm, library_model.lm_head

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(tokens)

    def _attention_inputs(self, x: torch.Tensor) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = _positions(x)
        sliding = getattr(self.library_config, "sliding_window", None) is not None
        make_mask = create_sliding_window_causal_mask if sliding else create_causal_mask
        mask = make_mask(**_mask_arguments(self.library_config, x))
        return {
            "attention_mask": mask,
            "position_embeddings": self.rotary_emb(x, position_ids=position_ids),
            "position_ids": position_ids,
        }


class Gpt2Decoder(PretrainedDecoder):
    """GPT-2: token and learned position embeddings, LayerNorm, fused qkv (Conv1D, with
    biases), tanh-GELU MLP, the head tied to the token embedding."""

    NAMES = SubBlocks("ln_1", "attn", "ln_2", "mlp")

    def _take_pieces(self, library_model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
        inner = library_model.transformer
        self.wte = inner.wte
        self.wpe = inner.wpe
        return inner.h, inner.ln_f, library_model.lm_head

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.wte(tokens) + self.wpe(positions)

    def _attention_inputs(self, x: torch.Tensor) -> dict[str, Any]:
        from transformers.masking_utils import create_causal_mask

        mask = create_causal_mask(**_mask_arguments(self.library_config, x))
        return {"attention_mask": mask}


# --- from a preset to the library's config ------------------------------------------------

# Random tokens train these models: no token id is special (and GPT-2's published ids would lie
# outside a small member's vocabulary).
NO_SPECIAL_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _rotary_config(cfg: ModelConfig, implementation: str) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads or cfg.heads,
        "hidden_act": cfg.act,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "use_cache": False,
        "attn_implementation": implementation,
        **NO_SPECIAL_TOKENS,
    }


def llama_config(cfg: ModelConfig, implementation: str) -> dict[str, Any]:
    return {**_rotary_config(cfg, implementation), "attention_bias": cfg.bias, "mlp_bias": cfg.bias}


def mistral_config(cfg: ModelConfig, implementation: str) -> dict[str, Any]:
    return {**_rotary_config(cfg, implementation), "sliding_window": cfg.sliding_window}


def gpt2_config(cfg: ModelConfig, implementation: str) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.hidden,
        "n_layer": cfg.layers,
        "n_head": cfg.heads,
        "n_inner": cfg.ffn_hidden,
        "activation_function": cfg.act,
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "use_cache": False,
        "attn_implementation": implementation,
        **NO_SPECIAL_TOKENS,
    }


@dataclass(frozen=True)
class Architecture:
    """How one real architecture is built: the library's module, config and model classes, the
    preset's values in the config's terms, and the decoder that presents the result."""

    module: str
    config_class: str
    model_class: str
    config: Callable[[ModelConfig, str], dict[str, Any]]
    decoder: type[PretrainedDecoder]

    def build(self, cfg: ModelConfig, initialise: bool = True) -> PretrainedDecoder:
        """The model of `cfg`, in fp32, on the current default device.

        `initialise=False` skips the library's weight initialisation (on fake tensors there are
        no values to draw, and drawing them is most of the construction's time).
        """
        require_transformers(cfg.architecture)
        register_implementations()
        from transformers.initialization import no_init_weights

        library = importlib.import_module(self.module)
        implementation = IMPLEMENTATIONS[cfg.attention][0]
        config = getattr(library, self.config_class)(**self.config(cfg, implementation))
        with no_init_weights() if not initialise else contextlib.nullcontext():
            model = getattr(library, self.model_class)(config)
        model.tie_weights()  # the library ties inside the initialisation skipped above
        return self.decoder(cfg, model, library.eager_attention_forward)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(
        "transformers.models.llama.modeling_llama",
        "LlamaConfig",
        "LlamaForCausalLM",
        llama_config,
        RotaryDecoder,
    ),
    "mistral": Architecture(
        "transformers.models.mistral.modeling_mistral",
        "MistralConfig",
        "MistralForCausalLM",
        mistral_config,
        RotaryDecoder,
    ),
    "gpt2": Architecture(
        "transformers.models.gpt2.modeling_gpt2",
        "GPT2Config",
        "GPT2LMHeadModel",
        gpt2_config,
        Gpt2Decoder,
    ),
}
