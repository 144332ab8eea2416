"""Llama-family models (Llama, SmolLM, Mistral, Qwen2) run by a short forward of our own over a preallocated
cache, from the transformers model's weights. Rolling back is setting `length`; no per-step allocation beyond
activations; q/k/v and gate/up are fused into one product each; each weight is kept in the format that
`format_choice` picks."""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from draftsmith.backends.cuda_graphs import CapturedSteps, check_graphs
from draftsmith.backends.format_choice import choose_format
from draftsmith.backends.formats import WeightFormat
from draftsmith.backends.layers import LeanLayers, lean_layer, rope_tables
from draftsmith.backends.protocol import Forward

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LEAN_MODEL_TYPES = {"llama", "mistral", "qwen2"}
PREFILL_CHUNK = 512  # longer prompts are fed in chunks of this many tokens


@dataclass
class LeanWeights:
    """A model's weights as the lean forward multiplies them: q/k/v and gate/up fused, in one `WeightFormat`.
    Built once per model and format and shared by every LeanLlama over that model (engines, benchmark methods),
    each of which adds only its KV cache. In the stored and transposed formats the model's own parameters are
    re-pointed at views of the fused tensors, so the weights exist once; oneDNN's packed layout is opaque, so
    there the packed copy is the one extra copy of the model's linear weights."""

    format: WeightFormat
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    layers: list[dict]
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, model: PreTrainedModel, fmt: WeightFormat) -> LeanWeights:
        inner = model.model
        tied = model.lm_head.weight is inner.embed_tokens.weight
        layers = [lean_layer(layer, fmt) for layer in inner.layers]
        lm_head = fmt.prepare_linears([inner.embed_tokens if tied else model.lm_head])
        if not tied:  # a tied head is the embedding, which F.embedding needs in its stored layout
            fmt.share(lm_head, [model.lm_head])
        return cls(fmt, inner.embed_tokens.weight, fmt.norm_weight(inner.norm.weight), lm_head, layers,
                   *rope_tables(model))



_LEAN_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {format name: LeanWeights}


def lean_weights(model: PreTrainedModel, weights: str = "auto", fused: bool | None = None) -> LeanWeights:
    """The shared lean weights of `model` in the format `weights` names (see `choose_format`)."""
    fmt = choose_format(model, weights, fused)
    per_model = _LEAN_WEIGHTS.setdefault(model, {})
    if fmt.name not in per_model:
        per_model[fmt.name] = LeanWeights.build(model, fmt)
    return per_model[fmt.name]



class LeanLlama(LeanLayers):
    def __init__(self, model: PreTrainedModel, compile: bool = False, weights: str = "auto",
                 graphs: bool | None = None, fused: bool | None = None):
        cfg = model.config
        shared = lean_weights(model, weights, fused=False if compile else fused)
        super().__init__(shared.layers, shared.format, shared.cos, shared.sin, cfg.num_attention_heads,
                         cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                         cfg.rms_norm_eps, model.dtype, model.device, fused=False if compile else fused)
        self.model = model
        self.embed, self.final_norm, self.lm_head = shared.embed, shared.final_norm, shared.lm_head
        self._stack = LeanLlama._forward_stack
        self.compile_s: float | None = None  # seconds spent compiling, when compiled
        self.graphs: CapturedSteps | None = None
        if compile:
            self._compile()
        # one-token and draft steps replayed from captured CUDA graphs (by default on CUDA; see cuda_graphs.py)
        if check_graphs(graphs, model.device, model.dtype, compile):
            self.graphs = CapturedSteps(self)

    def _compile(self) -> None:
        """Compile the layer stack for the three shapes a request uses (prefill, one-token step, draft
        verification), timing it; if the compiler fails, say why and stay eager."""
        start = time.perf_counter()
        self._stack = compiled_stack()
        try:
            self.reset(8)
            self.forward([0, 0, 0], last_only=True)  # prefill
            self.forward([0])  # a step without draft
            self.forward([0, 0, 0])  # a step that verifies a draft (sizes past 2 share this graph)
        except Exception as e:  # torch.compile raises many types: no C++ compiler, unsupported op, ...
            warnings.warn(f"torch.compile failed, running eager instead: {type(e).__name__}: {e}".splitlines()[0],
                          stacklevel=2)
            self._stack = LeanLlama._forward_stack
            return
        finally:
            self.reset(0)
        self.compile_s = time.perf_counter() - start

    @staticmethod
    def supports(model: PreTrainedModel) -> bool:
        cfg = model.config
        return (
            cfg.model_type in LEAN_MODEL_TYPES
            and getattr(cfg, "hidden_act", "silu") == "silu"
            and not getattr(cfg, "mlp_bias", False)
            and not getattr(cfg, "sliding_window", None)
            and getattr(cfg, "pretraining_tp", 1) == 1
        )

    @torch.no_grad()  # not inference_mode: a compiled forward must be able to write into the cache tensors
    def forward(
        self, ids: list[int], positions: list[int] | None = None, tree_mask: torch.Tensor | None = None,
        last_only: bool = False, features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [n, vocab] (or [1, vocab] with last_only) for tokens fed after the cache; with
        `features`, also the last layer's hidden states [n, hidden] (every row, before the final norm)."""
        n, start = len(ids), self.length
        if tree_mask is None and n > PREFILL_CHUNK:  # long prompts: bounded activations and masks
            logits, hidden = [], []
            for offset in range(0, n, PREFILL_CHUNK):
                chunk = ids[offset : offset + PREFILL_CHUNK]
                out = self.forward(chunk, last_only=last_only, features=True)
                logits.append(out[0])
                hidden.append(out[1])
            logits = logits[-1] if last_only else torch.cat(logits)  # last_only: only the final row is needed
            return Forward(logits, torch.cat(hidden)) if features else logits
        # steps (a draft model's too) replay where a bucket holds them, returning the features asked for (the
        # last layer's, or EAGLE-3's middle layers')
        if self.graphs is not None:
            with torch.inference_mode():
                replayed = self.graphs.forward(ids, positions, tree_mask, features)
            if replayed is not None:
                if last_only:
                    return Forward(replayed[0][-1:], replayed[1]) if features else replayed[-1:]
                return Forward(*replayed) if features else replayed
        end = start + n
        self._reserve(end)
        pos = torch.arange(start, end, device=self.device) if positions is None else torch.tensor(positions, device=self.device)
        mask = self.attention_mask(n, start, tree_mask, self.device)
        ids_tensor = torch.tensor([ids], device=self.device)
        causal = mask is None and n > 1  # decided here, outside a compiled stack: a plain bool, not a symbol
        # eager: inference mode skips autograd's bookkeeping on every operation (~7% of a bf16 step); a compiled
        # stack must be able to write into the cache tensors, which only no_grad allows
        with torch.inference_mode() if self._stack is LeanLlama._forward_stack else contextlib.nullcontext():
            logits, hidden = self._stack(self, ids_tensor, pos, mask, start, last_only, causal)
        self.length = end
        return Forward(logits, hidden) if features else logits

    @torch.no_grad()
    def forward_upto(self, ids: list[int], positions: list[int], tree_mask: torch.Tensor, upto: int) -> torch.Tensor:
        """The first `upto` layers over tokens fed after the cache (their keys and values written there, the
        length unmoved): hidden states [1, n, hidden], to be continued by `forward_rest` (for pruning a tree
        between the two)."""
        n, start = len(ids), self.length
        self._reserve(start + n)
        pos = torch.tensor(positions, device=self.device)
        mask = self.attention_mask(n, start, tree_mask, self.device)
        with torch.inference_mode():
            x = self.embed_tokens(torch.tensor([ids], device=self.device))
            return self.decoder_layers(x, pos, mask, start, mask is None and n > 1, layers=range(upto))

    @torch.no_grad()
    def forward_rest(self, x: torch.Tensor, positions: list[int], tree_mask: torch.Tensor | None, upto: int,
                     features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Continue `forward_upto`'s hidden states x (rows kept in place by `keep_layers`) through the other
        layers; returns what `forward` returns and moves the length past them."""
        n, start = x.shape[1], self.length
        pos = torch.tensor(positions, device=self.device)
        mask = self.attention_mask(n, start, tree_mask, self.device)
        with torch.inference_mode():
            x = self.decoder_layers(x, pos, mask, start, mask is None and n > 1, layers=range(upto, len(self.layers)))
            logits = self.output_logits(x)
        self.length = start + n
        return Forward(logits, x[0]) if features else logits

    @torch.no_grad()
    def keep_layers(self, upto: int, start: int, offsets: list[int]) -> None:
        """`keep` for the first `upto` layers' entries only (those `forward_upto` wrote); the length is unmoved."""
        index = torch.tensor(offsets, device=self.device) + start
        for cache in (self.k_cache, self.v_cache):
            cache[:upto, :, start : start + len(offsets)] = cache[:upto].index_select(2, index)

    def _forward_stack(
        self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, start: int, last_only: bool,
        causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer proper, writing the new keys and values at start..end of the cache. Returns float32
        logits and the last layer's hidden states (before the final norm) of every fed token."""
        self.taken = []
        x = self.decoder_layers(self.embed_tokens(ids), pos, mask, start, causal)
        hidden = torch.cat(self.taken, dim=-1) if self.feature_layers else x[0]
        return self.output_logits(x[:, -1:] if last_only else x), hidden

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """The residual stream's input for token ids (any shape): their embeddings in `stream_dtype`."""
        return F.embedding(ids, self.embed).to(self.stream_dtype)

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 logits [n, vocab] of hidden states x [1, n, hidden] (the final norm, then the output head)."""
        return self._mm(self.norm(x, self.final_norm), self.lm_head)[0].float()



@functools.cache
def compiled_stack():
    """One compiled layer stack per process, shared by every LeanLlama: torch.compile keeps a graph per shape
    family and model, and inductor caches its kernels on disk across processes. Dynamic shapes, so that cache
    lengths and draft sizes do not each trigger a recompilation."""
    return torch.compile(LeanLlama._forward_stack, dynamic=True)
