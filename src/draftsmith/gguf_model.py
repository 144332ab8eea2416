"""A Llama-family GGUF's weights as a light module tree with transformers' names, which the lean forward runs.

Importing transformers' modelling stack (PreTrainedModel and what it pulls: torch's compiler, distributed tensors)
costs a CLI call more than loading and running the embedded model does. The lean forward reads only modules'
weights, the config and the rotary tables, so a GGUF target loads into this tree; the transformers model, for
what needs one (HF generate, training, LoRA), is built from the same tensors on first request
(`transformers_model`), no copy made.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def attach_blocks(module: torch.nn.Module, qtype: int, read: Callable[[], torch.Tensor]) -> None:
    """Give a linear (or embedding) the GGML blocks its weight was dequantized from: `read()` gives them as
    uint8 [rows, bytes], rows in the module's own order (for the `gguf` weight format of the lean forward)."""
    module.gguf_qtype, module.gguf_blocks = qtype, read


class NormWeight(nn.Module):
    """An RMS norm as the lean forward reads it: its weight (the epsilon is the config's)."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.variance_epsilon = eps


class RotaryTables(nn.Module):
    """transformers' Llama rotary embedding, its arithmetic as theirs (`rope_tables` calls it once for every
    position): the default inverse frequencies, or those of the config's scaling type."""

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        rope = config.rope_parameters
        if rope["rope_type"] == "default":
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            self.attention_scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope["rope_type"]](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    with torch.device("meta"):
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


class GgufLlama(nn.Module):
    """The weights of a Llama / Mistral / Qwen2 GGUF under transformers' parameter names (`model.layers.N.
    self_attn.q_proj.weight`, ...), with what engines read of a model: config, generation config, dtype, device,
    input and output embeddings. Linears loaded from GGML blocks keep them (`attach_blocks`)."""

    def __init__(self, config: PretrainedConfig, state: dict[str, torch.Tensor], source: str, config_folder: Path):
        super().__init__()
        from transformers import GenerationConfig

        needed = ["model.embed_tokens.weight", "model.norm.weight"]
        needed += [] if config.tie_word_embeddings else ["lm_head.weight"]
        prefixes = [f"model.layers.{i}" for i in range(config.num_hidden_layers)]
        needed += [f"{p}.{name}.weight" for p in prefixes for name in (*LINEARS, *NORMS)]
        missing = [name for name in needed if name not in state]
        if missing:
            raise KeyError(f"{source} lacks tensors for {missing[:3]}")
        self.config, self.source, self.config_folder = config, source, config_folder
        self.generation_config: GenerationConfig = GenerationConfig.from_model_config(config)
        self.gguf_blocks_default = False  # set by the loader: multiply the file's own blocks (no --dtype given)
        inner = nn.Module()
        inner.embed_tokens = nn.Embedding.from_pretrained(state["model.embed_tokens.weight"], freeze=True)
        inner.layers = nn.ModuleList()
        for prefix in prefixes:
            layer, attn, mlp = nn.Module(), nn.Module(), nn.Module()
            layer.self_attn, layer.mlp = attn, mlp
            for name in LINEARS:
                owner, attr = (attn if name.startswith("self_attn") else mlp), name.split(".")[1]
                setattr(owner, attr, _linear(state[f"{prefix}.{name}.weight"], state.get(f"{prefix}.{name}.bias")))
            for name in NORMS:
                setattr(layer, name, NormWeight(state[f"{prefix}.{name}.weight"], config.rms_norm_eps))
            inner.layers.append(layer)
        inner.norm = NormWeight(state["model.norm.weight"], config.rms_norm_eps)
        inner.rotary_emb = RotaryTables(config)
        self.model = inner
        if config.tie_word_embeddings:
            self.lm_head = _linear(inner.embed_tokens.weight, None)
            self.lm_head.weight = inner.embed_tokens.weight  # one parameter, as transformers ties them
        else:
            self.lm_head = _linear(state["lm_head.weight"], None)
        self._transformers: list[PreTrainedModel] = []  # a list: nn.Module would register a model as a child
        self._read_deferred: Callable[[], dict[str, torch.Tensor]] | None = None
        self.eval()

    def defer_weights(self, read: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Weights left on the meta device at load, and how to read them (`materialize`)."""
        self._read_deferred = read

    @torch.no_grad()
    def materialize(self) -> None:
        """Read the float weights deferred at load into their modules (what a float weight format, the
        transformers model or training needs; the block formats multiply the file's blocks instead)."""
        if self._read_deferred is None:
            return
        for name, weight in self._read_deferred().items():
            self.get_submodule(name.removesuffix(".weight")).weight = nn.Parameter(weight, requires_grad=False)
        self._read_deferred = None

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def transformers_model(self) -> PreTrainedModel:
        """The transformers model over these very tensors (built once): same weights, GGML blocks, generation
        config and block-format default."""
        if not self._transformers:
            from transformers import AutoConfig, AutoModelForCausalLM

            self.materialize()
            config = AutoConfig.from_pretrained(self.config_folder)  # the model class's own config
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            model.load_state_dict(self.state_dict(keep_vars=True), strict=False, assign=True)  # the same parameters
            for name, module in self.named_modules():
                if isinstance(module, nn.Linear):  # the same modules: weights a lean format re-points stay one copy
                    parent, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(parent), attr, module)
                elif hasattr(module, "gguf_blocks"):
                    attach_blocks(model.get_submodule(name), module.gguf_qtype, module.gguf_blocks)
            model.tie_weights()
            unset = [name for name, p in model.named_parameters() if p.is_meta]
            if unset:
                raise KeyError(f"{self.source} lacks tensors for {unset[:3]}")
            for name, module in list(model.named_modules()):  # buffers computed at construction (rotary frequencies)
                if any(b.is_meta for b in module.buffers(recurse=False)):
                    parent, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(parent), attr, type(module)(config=config).to(self.device))
            model.generation_config = self.generation_config
            model.gguf_blocks_default = self.gguf_blocks_default
            self._transformers.append(model.eval())
        return self._transformers[0]
