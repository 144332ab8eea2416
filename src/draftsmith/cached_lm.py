"""A causal LM with its KV cache, as the engine needs it: feed tokens (at given positions, under an optional
tree mask), get float32 logits, keep or drop cache entries by moving a length.

Two backends behind one interface:
- `LeanLlama`: Llama-family models (Llama, SmolLM, Mistral, Qwen2) run by a short forward of our own over a
  preallocated cache, from the transformers model's weights. Rolling back is setting `length`; no per-step
  allocation beyond activations; q/k/v and gate/up are fused into one matmul each; each weight is stored in
  whichever format multiplies fastest on this machine (`WeightFormat`).
- `HFCachedLM`: any other transformers causal LM, through its own forward and a cropped DynamicCache.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from draftsmith.cuda_graphs import CapturedSteps, check_graphs
from draftsmith.errors import ConfigError
from draftsmith.fused import fused_ops
from draftsmith.fused import wanted as fused_wanted
from draftsmith.machine import cpu_key
from draftsmith.paths import cached_entry

LEAN_MODEL_TYPES = {"llama", "mistral", "qwen2"}
CACHE_BLOCK = 256  # the lean cache grows in blocks of this many positions
PREFILL_CHUNK = 512  # longer prompts are fed in chunks of this many tokens


class HFCachedLM:
    """Sliding-window layers (Gemma 3, ...) keep only their window, so a rollback past it needs the states they
    dropped: the cache records them until each step's crop, which then trims the window back."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.feature_layers: tuple[int, ...] = ()  # see LeanLayers.feature_layers
        self.reset()

    def reset(self, capacity: int = 0) -> None:
        self.cache, self.length = DynamicCache(config=self.model.config), 0
        self.cache.activate_past_recording()

    @torch.inference_mode()
    def forward(
        self, ids: list[int], positions: list[int] | None = None, tree_mask: torch.Tensor | None = None,
        last_only: bool = False, features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [n, vocab] (or [1, vocab] with last_only) for tokens fed after the cache; with
        `features`, also the last layer's hidden states [n, hidden] (every row, before the final norm)."""
        if features:
            with last_hidden_states(self.model, self.feature_layers) as captured:
                logits = self.forward(ids, positions, tree_mask, last_only)
            return logits, torch.cat(captured, dim=-1)[0]
        device = self.model.device
        kwargs = {"logits_to_keep": 1} if last_only else {}
        if tree_mask is not None:
            kwargs["attention_mask"] = self._tree_attention_mask(tree_mask.cpu(), positions)
        if positions is not None:
            kwargs["position_ids"] = torch.tensor([positions], device=device)
        out = self.model(input_ids=torch.tensor([ids], device=device), past_key_values=self.cache, use_cache=True,
                         **kwargs)
        self.length += len(ids)
        return out.logits[0].float()

    def _tree_attention_mask(self, tree_mask: torch.Tensor, positions: list[int]) -> torch.Tensor | dict:
        """Additive [1, 1, n, keys] masks: a tree's nodes see the cache, their ancestors and themselves.
        Sliding-window layers hold only the last window - 1 cached keys, and a node sees only keys less than a
        window behind it; models mixing both kinds of layer take one mask per layer type."""
        n, config = len(positions), self.model.config
        layer_types = set(getattr(config, "layer_types", None) or  # as transformers' cache infers them
                          ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"])
        if not layer_types <= {"full_attention", "sliding_attention"}:
            raise ConfigError(f"tree drafts are not supported on {sorted(layer_types)} layers: use a chain drafter")
        allowed = torch.ones(n, self.length + n, dtype=torch.bool)
        allowed[:, self.length :] = tree_mask
        masks = {"full_attention": allowed}
        if "sliding_attention" in layer_types:
            window = config.sliding_window
            held = min(self.length, window - 1)
            key_positions = torch.cat([torch.arange(self.length - held, self.length), torch.tensor(positions)])
            in_window = torch.tensor(positions)[:, None] - key_positions[None] < window
            masks["sliding_attention"] = allowed[:, self.length - held :] & in_window
        masks = {kind: self._additive(mask) for kind, mask in masks.items() if kind in layer_types}
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[None, None].to(self.model.device)

    @torch.inference_mode()
    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep entries start + offsets (in that order) at start, start + 1, ...; drop everything after them."""
        if offsets != list(range(len(offsets))):
            kept = torch.tensor(offsets, device=self.model.device) + start
            for layer in self.cache.layers:
                if not getattr(layer, "is_initialized", True):  # a layer sharing another's states
                    continue
                shift = layer.keys.shape[-2] - self.length  # a windowed layer holds only the last positions
                index = kept + shift
                for tensor in (layer.keys, layer.values):
                    tensor[:, :, start + shift : start + shift + len(offsets)] = tensor.index_select(2, index)
        self.truncate(start + len(offsets))

    def truncate(self, length: int) -> None:
        if self.length:  # (transformers cannot crop a windowed layer that was never filled)
            self.cache.crop(-(self.length - length))  # always, even by 0: it also trims windowed layers back
        self.length = length


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
                   *cls.rope_tables(model))

    @staticmethod
    @torch.no_grad()
    def rope_tables(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [positions, head_dim] from the model's own rotary module, so every scaling variant is
        honoured."""
        probe = torch.zeros(1, dtype=model.dtype, device=model.device)
        positions = torch.arange(model.config.max_position_embeddings, device=model.device)[None]
        cos, sin = model.model.rotary_emb(probe, positions)
        return cos[0], sin[0]


@torch.no_grad()
def lean_layer(layer: torch.nn.Module, fmt: WeightFormat, share: bool = True) -> dict:
    """A Llama decoder layer's weights as the lean forward multiplies them (q/k/v and gate/up fused). `share`:
    re-point the layer's own linears at the fused weights (see `WeightFormat.share`); a timing probe does not."""
    attn, mlp, layout = layer.self_attn, layer.mlp, fmt.prepare_linears
    qkv, gate_up = (attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)
    entry = dict(
        attn_norm=fmt.norm_weight(layer.input_layernorm.weight),
        wqkv=layout(qkv),
        bqkv=torch.cat([p.bias for p in qkv]) if attn.q_proj.bias is not None else None,
        wo=layout([attn.o_proj]),
        bo=attn.o_proj.bias,  # Llama's attention_bias covers o_proj too; Qwen2's does not
        mlp_norm=fmt.norm_weight(layer.post_attention_layernorm.weight),
        w_gate_up=layout(gate_up),
        w_down=layout([mlp.down_proj]),
    )
    if share:
        fmt.share(entry["wqkv"], qkv)
        fmt.share(entry["wo"], [attn.o_proj])
        fmt.share(entry["w_gate_up"], gate_up)
        fmt.share(entry["w_down"], [mlp.down_proj])
    return entry


def joined_rows(weights: list[torch.Tensor]) -> torch.Tensor:
    """The weights' rows stacked: the tensor they already are row blocks of, in order (as gguf_load stores a
    layer's q/k/v and gate/up), else a concatenated copy."""
    first = weights[0]
    adjacent = all(w.is_contiguous() and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   for w in weights) and all(
        b.storage_offset() == a.storage_offset() + a.numel() for a, b in zip(weights, weights[1:]))
    if adjacent:
        rows = sum(w.shape[0] for w in weights)
        return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))
    return torch.cat(weights)


_LEAN_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {format name: LeanWeights}


def lean_weights(model: PreTrainedModel, weights: str = "auto", fused: bool | None = None) -> LeanWeights:
    """The shared lean weights of `model` in the format `weights` names (see `choose_format`)."""
    fmt = choose_format(model, weights, fused)
    per_model = _LEAN_WEIGHTS.setdefault(model, {})
    if fmt.name not in per_model:
        per_model[fmt.name] = LeanWeights.build(model, fmt)
    return per_model[fmt.name]


@contextlib.contextmanager
def last_hidden_states(model: PreTrainedModel, layers: tuple[int, ...] = ()):
    """Capture the input of the model's final norm during a forward: the last layer's hidden states before the
    norm, the features the lean forward returns (transformers' hidden_states[-1] is after the norm). With
    `layers` (ascending ids), the residual stream entering each of those decoder layers instead, in that order
    (transformers' hidden_states[i]; EAGLE-3's features)."""
    captured: list[torch.Tensor] = []
    if layers:
        stack = model.base_model.layers
        hook = lambda module, args, kwargs: captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        handles = [stack[i].register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
    else:
        norm = getattr(model.base_model, "norm", None)
        if norm is None:
            raise ConfigError(f"{model.config.model_type}: no final norm found to take hidden features from")
        handles = [norm.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


TREE_ATTENTION_ROWS = 64  # masked forwards up to this size (verifications) attend through the fused kernel


class LeanLayers:
    """Llama decoder layers (lean weight entries) over a preallocated KV cache of their own: the part of the lean
    forward that a target and an EAGLE head's single layer share. Rolling back is moving `length`."""

    def __init__(self, layers: list[dict], fmt: WeightFormat, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
                 n_kv: int, head_dim: int, eps: float, dtype: torch.dtype, device: torch.device,
                 fused: bool | None = None):
        self.layers, self.weights, self.cos, self.sin = layers, fmt, cos, sin
        self.n_heads, self.n_kv, self.head_dim, self.eps = n_heads, n_kv, head_dim, eps
        self.dtype, self.device = dtype, device
        self._mm = fmt.product
        # float32 runs transformers' own operations (bit-exact logits); lower precisions fuse small operations
        self.exact = dtype == torch.float32
        # what norms hand the products and attention hands the output projection
        self.product_dtype = torch.float32 if fmt.float_products else dtype
        # the residual stream's dtype: float32 where the products give float32 (as llama.cpp keeps activations
        # with bf16 weights), which saves ~4 casts a layer and rounds less
        self.stream_dtype = self.product_dtype
        # keys and values are cast once, when written; queries at every step (the layerless probe that
        # attention_dtype times attends in the dtype it is given)
        self.cache_dtype = dtype if not layers else attention_dtype(dtype, n_heads, n_kv, head_dim, device)
        if not self.exact:  # the rotation's sign folded into sin once: rotate_half(x) * sin = swap_halves(x) * this
            half = self.head_dim // 2
            self.sin = torch.cat((-self.sin[..., :half], self.sin[..., half:]), dim=-1)
        # one call for each chain of small operations, where everything a layer computes is float32 (fused.py)
        float_layers = not self.exact and self.stream_dtype == self.cache_dtype == torch.float32
        self.fused = fused_ops() if layers and float_layers and fused_wanted(device, fused) else None
        if self.fused is not None:  # the kernels take float32 rotary tables (more precise than the model's dtype)
            self.cos, self.sin = self.cos.float(), self.sin.float()
        self.k_cache = self.v_cache = torch.empty(0)
        self.length = 0
        # the features a forward returns: empty, the last layer's output; else (EAGLE-3) the residual stream
        # entering these layers, concatenated (set by the drafter that reads them)
        self.feature_layers: tuple[int, ...] = ()
        self.taken: list[torch.Tensor] = []

    def reset(self, capacity: int = 0) -> None:
        self.length = 0
        self._reserve(capacity)

    def _reserve(self, capacity: int) -> None:
        if self.k_cache.dim() == 4 and capacity <= self.k_cache.shape[2]:
            return
        # grow geometrically on demand: no up-front reservation for a budget most requests never reach
        current = self.k_cache.shape[2] if self.k_cache.dim() == 4 else 0
        size = -(-max(capacity, 2 * current, 1) // CACHE_BLOCK) * CACHE_BLOCK
        shape = (len(self.layers), self.n_kv, size, self.head_dim)
        with torch.inference_mode(False):  # whoever calls, the cache stays writable outside inference mode
            k_new = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
            v_new = torch.zeros(shape, dtype=self.cache_dtype, device=self.device)
        if self.length:
            k_new[:, :, : self.length] = self.k_cache[:, :, : self.length]
            v_new[:, :, : self.length] = self.v_cache[:, :, : self.length]
        self.k_cache, self.v_cache = k_new, v_new

    @staticmethod
    def attention_mask(n: int, start: int, tree_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """[n, start + n] bool for n tokens fed after `start` cached ones (None: none needed)."""
        end = start + n
        if tree_mask is not None:
            mask = torch.ones(n, end, dtype=torch.bool, device=device)
            mask[:, start:] = tree_mask
            return mask
        if n > 1 and start > 0:  # a chain after the cache: causal, offset by the cached prefix
            return torch.ones(n, end, dtype=torch.bool, device=device).tril(start)
        return None  # n > 1 from an empty cache (a prefill) is plain causal attention: the kernels' causal path

    def append(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run x [1, n, hidden] after the cached entries under `mask` ([n, length + n] bool) and keep its keys
        and values: the entry point for callers that bring their own inputs (an EAGLE head's fused pairs)."""
        start = self.length
        self._reserve(start + x.shape[1])
        out = self.decoder_layers(x, pos, mask, start, causal=False)
        self.length = start + x.shape[1]
        return out

    def decoder_layers(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, start: int | torch.Tensor,
                       causal: bool, layers: range | None = None) -> torch.Tensor:
        """x [1, n, hidden] through every layer (or the `layers` range), writing the new keys and values at
        start..start+n."""
        rope = self.rope(pos)
        for i in layers if layers is not None else range(len(self.layers)):
            if i in self.feature_layers:
                self.taken.append(x[0])
            x = self.layer(i, x, rope, mask, start, causal)
        return x

    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of these positions, as `layer` takes them (sin is sign-folded unless exact)."""
        return self.cos[pos][None, None], self.sin[pos][None, None]

    def layer(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
              start: int | torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x [1, n, hidden] through decoder layer i, its keys and values written at start..start+n: the unit a
        layer-skipping forward runs or skips."""
        if self.fused is not None and isinstance(start, int):
            return self._fused_layer(i, x, rope, mask, start, causal)
        q, k, v = self.qkv(i, x, rope)
        keys, values = self.write_kv(i, k, v, start)
        attn = self._attention(_cast(q, self.cache_dtype), keys, values, mask, causal)
        return self.mix(i, x, _cast(attn, self.product_dtype))

    def _fused_layer(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     mask: torch.Tensor | None, start: int, causal: bool) -> torch.Tensor:
        """`layer` through the fused kernels (float32 throughout): the same operations, ~10 calls instead of ~25."""
        ops, w, n = self.fused, self.layers[i], x.shape[1]
        x = _cast(x, torch.float32)
        q = ops.rope_write_kv(self._qkv_rows(i, x), rope[0], rope[1], self.k_cache[i], self.v_cache[i], start,
                              self.n_heads, self.n_kv)
        end = start + n
        if n == 1 and mask is None:
            attn = ops.decode_attention(q, self.k_cache[i], self.v_cache[i], end)
        elif mask is not None and n <= TREE_ATTENTION_ROWS:  # a verification: rounds as one-token steps do
            attn = ops.tree_attention(q, self.k_cache[i], self.v_cache[i], mask, start)
        else:  # a prefill
            keys, values = self.k_cache[i : i + 1, :, :end], self.v_cache[i : i + 1, :, :end]
            attn = self._attention(q, keys, values, mask, causal)
        out = self._mm(attn.transpose(1, 2).reshape(1, n, self.n_heads * self.head_dim), w["wo"])
        x, h = ops.add_rms_norm(x, out if w["bo"] is None else out + w["bo"], w["mlp_norm"], self.eps)
        return x + self._mm(ops.silu_mul(self._mm(h, w["w_gate_up"])), w["w_down"])

    def write_kv(self, i: int, k: torch.Tensor, v: torch.Tensor, start: int | torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer i's new keys and values at start..start+n; return its cache up to there. `start` may be a
        tensor of slots (a captured step, where no Python number may change between replays): the entries go
        there and the whole cache is returned, for the step's mask to cover."""
        if isinstance(start, torch.Tensor):
            self.k_cache[i].index_copy_(1, start, k[0].to(self.cache_dtype))
            self.v_cache[i].index_copy_(1, start, v[0].to(self.cache_dtype))
            return self.k_cache[i : i + 1], self.v_cache[i : i + 1]
        end = start + k.shape[2]
        self.k_cache[i, :, start:end] = k[0]
        self.v_cache[i, :, start:end] = v[0]
        return self.k_cache[i : i + 1, :, :end], self.v_cache[i : i + 1, :, :end]

    def qkv(self, i: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's rotated queries [1, heads, n, d], rotated keys and values [1, kv heads, n, d] for x."""
        n, (cos, sin) = x.shape[1], rope
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        qkv = self._qkv_rows(i, x)
        if self.exact:  # transformers' own operations, so float32 logits match it bit for bit
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = _rope(q.view(1, n, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = _rope(k.view(1, n, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
        else:  # queries and keys rotated together: 3 operations a layer instead of 10
            qk, v = qkv.split([q_size + kv_size, kv_size], dim=-1)
            qk = _swapped_rope(qk.view(1, n, self.n_heads + self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
            q, k = qk[:, : self.n_heads], qk[:, self.n_heads :]
        return q, k, v.view(1, n, self.n_kv, self.head_dim).transpose(1, 2)

    def _qkv_rows(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's fused q/k/v projection of x [1, n, hidden], before the rotation: [1, n, (heads + 2 kv) * d]."""
        w = self.layers[i]
        qkv = self._mm(self.norm(x, w["attn_norm"]), w["wqkv"])
        return qkv if w["bqkv"] is None else qkv + w["bqkv"]

    def mix(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of layer i after attention ([1, heads, n, d]): output projection, residual, MLP."""
        w, n = self.layers[i], x.shape[1]
        out = self._mm(attn.transpose(1, 2).reshape(1, n, self.n_heads * self.head_dim), w["wo"])
        x = x + _cast(out if w["bo"] is None else out + w["bo"], x.dtype)
        gate, up = self._mm(self.norm(x, w["mlp_norm"]), w["w_gate_up"]).chunk(2, dim=-1)
        return x + _cast(self._mm(F.silu(gate) * up, w["w_down"]), x.dtype)

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMS norm of x for a product: transformers' operations in float32, fused below it, and in float32
        whatever the dtype where the products take float32 (the weight is then kept in float32 too)."""
        if self.exact:
            return _rms_norm(x, weight, self.eps)
        if self.fused is not None:
            return self.fused.rms_norm(_cast(x, torch.float32), weight, self.eps)
        return _fused_rms_norm(_cast(x, self.product_dtype), weight, self.eps)

    def _attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
        causal: bool = False,
    ) -> torch.Tensor:
        """[1, heads, n, head_dim] attention of the new queries over the cache.

        float32 uses torch's fused kernel, the one transformers uses, so logits match it bit for bit. In lower
        precision (never bit-exact against transformers anyway) a one-token step on CPU runs a plain softmax
        attention over grouped queries instead: the fused kernel's setup costs more than the product itself
        there (0.6 ms of a 15 ms bfloat16 step for SmolLM2-135M); from a few queries on, the fused kernel wins.
        On CUDA a mask together with enable_gqa sends SDPA to its slow math kernel, so masked (draft) forwards
        attend with grouped queries instead (`grouped_masked_attention`) and keep the memory-efficient kernel.
        """
        n, group = q.shape[2], self.n_heads // self.n_kv
        if mask is not None and q.device.type == "cuda" and group > 1:
            return grouped_masked_attention(q, keys, values, mask)
        if n > 1 or mask is not None or q.dtype == torch.float32 or q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)
        # queries of the heads sharing a key/value head become rows of one product: [1, n_kv, group * n, d]
        grouped = q.reshape(1, self.n_kv, group * n, self.head_dim) * self.head_dim**-0.5
        scores = (grouped @ keys.transpose(-1, -2)).float()  # one query, no mask: it sees the whole cache
        weights = scores.softmax(-1).to(values.dtype)
        return (weights @ values).view(1, self.n_heads, n, self.head_dim)

    @torch.no_grad()
    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep entries start + offsets (in that order) at start, start + 1, ...; drop everything after them."""
        if offsets != list(range(len(offsets))):
            index = torch.tensor(offsets, device=self.device) + start
            for cache in (self.k_cache, self.v_cache):
                cache[:, :, start : start + len(offsets)] = cache.index_select(2, index)
        self.truncate(start + len(offsets))

    def truncate(self, length: int) -> None:
        self.length = length  # entries past the length are dead: the next forward overwrites them


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
            return (logits, torch.cat(hidden)) if features else logits
        # steps (a draft model's too) replay where a bucket holds them; a step that must return middle layers'
        # features (EAGLE-3) runs eagerly: the captured step returns the last layer's
        if self.graphs is not None and not self.feature_layers:
            with torch.inference_mode():
                replayed = self.graphs.forward(ids, positions, tree_mask, features)
            if replayed is not None:
                if last_only:
                    return (replayed[0][-1:], replayed[1]) if features else replayed[-1:]
                return replayed
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
        return (logits, hidden) if features else logits

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
        return (logits, x[0]) if features else logits

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


@dataclass(frozen=True)
class WeightFormat:
    """How linear weights are stored for `x @ W.T` products: as transformers stores them ([out, in]),
    transposed ([in, out]), packed into oneDNN's blocked layout (the format torch.compile's CPU freezing
    uses), or packed as float16 for FBGEMM's products with float32 activations (`fp16`: offered only where
    packing rounds no weight of float16's normal range and overflows none, as for any bfloat16 model whose
    weights stay below 65504: 8 significant bits fit float16's 11; see `fp16_holds`). On CPU the fastest
    differs by machine and dtype: on a 2-core AVX-512 EPYC, where MKL's sgemm does not take its AVX-512 path,
    oneDNN's packed products ran 2.5x (float32) and 1.6x (bfloat16) faster than F.linear for one token, 3x
    and 1.5x for 2-16 tokens; on an AVX2-only one, which has no bfloat16 arithmetic, aten's emulated bf16
    products cost 4x more for 8 tokens than for one while `fp16`'s cost 1.5x. `bf16-fused` keeps bfloat16
    weights as stored and multiplies them with the fused kernels' AVX512-BF16 dot products (float32 in and
    out, the rows rounded to bfloat16 inside; sums that do not depend on how many rows are fed): on a 2-core
    AVX-512 EPYC a whole step ran 7.7 ms against `fp16`'s 9.6 and oneDNN's 11.9 (8 tokens: 10.7 / 13.0 / 15.1)."""

    name: str

    @property
    def lossy(self) -> bool:
        """Weight-only quantized: a different model, never chosen unless asked for by name."""
        return self.name in QUANTIZED

    @property
    def float_products(self) -> bool:
        """Products take and give float32 whatever the model's dtype (`fp16`): the lean forward then feeds them
        float32 norms and attention, and casts only what joins the residual stream."""
        return self.name in FLOAT_PRODUCT_FORMATS

    def norm_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """An RMS norm's weight as `LeanLayers.norm` applies it: in float32 where the products take float32."""
        return weight.float() if self.float_products else weight

    def prepare_linears(self, linears: list[torch.nn.Module] | tuple) -> object:
        """The weights of these modules (rows stacked, in order) as this format multiplies them: the `gguf`
        format takes the GGML blocks they were loaded from, the others their weights."""
        if self.name == GGUF_BLOCKS:
            return gguf_blocks(linears)
        return self.prepare(joined_rows([linear.weight for linear in linears]))

    def prepare(self, weight: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.name == "transposed":
            return weight.t().contiguous()
        if self.name == "onednn":
            return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        if self.name == "int8":
            return _int8_weight(weight)
        if self.name == "int4":
            return _int4_weight(weight)
        if self.name == "fp16":
            return _fp16_weight(weight)
        if self.name == "fp16-fused":
            return weight.to(torch.float16).contiguous()
        if self.name == BF16_DOT:
            return weight.contiguous()
        return weight

    @property
    def product(self) -> Callable[[torch.Tensor, object], torch.Tensor]:
        """`x @ W.T` for weights this format prepared: one function per format, looked up once by the layers
        that call it 121 times a step."""
        if self.name == GGUF_BLOCKS:
            kernel = _fused_product(self.name)
            return lambda x, weight: kernel(_cast(x, torch.float32), *weight)
        if self.name in FUSED_PRODUCTS:  # the kernel looked up here, once, not at each of a step's products
            kernel = _fused_product(self.name)
            return lambda x, weight: kernel(_cast(x, torch.float32), weight)
        return _PRODUCTS.get(self.name, F.linear)

    def multiply(self, x: torch.Tensor, weight) -> torch.Tensor:
        return self.product(x, weight)

    def share(self, prepared: torch.Tensor, linears: list[torch.nn.Linear] | tuple) -> None:
        """Re-point the linears' weights at views of `prepared` (their fused rows, in order), so the two copies
        become one. oneDNN's packed layout and quantized weights cannot be viewed: there the model keeps its
        own weights."""
        if self.name in ("onednn", *FP16_FORMATS, GGUF_BLOCKS) or self.lossy:
            return
        rows = prepared if self.name in ("stored", BF16_DOT) else prepared.t()
        offset = 0
        for linear in linears:
            out = linear.weight.shape[0]
            linear.weight = torch.nn.Parameter(rows[offset : offset + out], requires_grad=False)
            offset += out


QUANTIZED = ("int8", "int4")


def _int8_product(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return torch.ops.aten._weight_int8pack_mm(rows, *weight).view(*x.shape[:-1], -1)


def _int4_product(x: torch.Tensor, weight: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    packed, scales_and_zeros = weight
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed, INT4_GROUP, scales_and_zeros)
    return out.view(*x.shape[:-1], -1)


def _fp16_product(x: torch.Tensor, weight) -> torch.Tensor:
    # float32 activations and sums: more precise than a bfloat16 product
    return torch.ops.quantized.linear_dynamic_fp16(x if x.dtype == torch.float32 else x.float(), weight)


_PRODUCTS: dict[str, Callable] = {
    "transposed": torch.matmul,
    "onednn": lambda x, weight: torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], ""),
    "int8": _int8_product,
    "int4": _int4_product,
    "fp16": _fp16_product,
}
# weights packed as float16 (exact for bfloat16 values of its range), float32 activations and sums: FBGEMM's
# product, or the fused kernels' (csrc/fused_cpu.cpp: each weight row read once for up to 8 rows; opt-in)
FP16_FORMATS = ("fp16", "fp16-fused")
# bfloat16 weights as stored, multiplied by the fused kernels' AVX512-BF16 dot products: float32 activations
# rounded to bfloat16 inside the product (as bfloat16 products round them), float32 sums, float32 out
BF16_DOT = "bf16-fused"
# a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks as stored (float16 scales and minimums, 4.5-8.5 bits a weight),
# multiplied by the fused kernels' block products: float32 activations and sums, batch-invariant
GGUF_BLOCKS = "gguf"
FUSED_PRODUCTS = {"fp16-fused": "half_product", BF16_DOT: "bf16_product", GGUF_BLOCKS: "block_product"}
FLOAT_PRODUCT_FORMATS = (*FP16_FORMATS, BF16_DOT, GGUF_BLOCKS)  # formats whose products take and give float32


def has_gguf_blocks(model: PreTrainedModel) -> bool:
    """Whether every weight the lean forward multiplies came from GGML blocks the `gguf` format multiplies."""
    inner = model.model
    head = inner.embed_tokens if model.lm_head.weight is inner.embed_tokens.weight else model.lm_head
    linears = [head] + [m for layer in inner.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    return all(hasattr(m, "gguf_blocks") for m in linears)


def gguf_blocks(linears: list[torch.nn.Module] | tuple) -> tuple[torch.Tensor, int]:
    """The GGML blocks of these modules' weights, rows stacked in order, and their GGML type."""
    missing = [m for m in linears if not hasattr(m, "gguf_blocks")]
    if missing:
        raise ConfigError(f"{GGUF_BLOCKS} weights multiply a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks; this model's "
                          "weights did not come from such a file: use another --weights format")
    kinds = {m.gguf_qtype for m in linears}
    if len(kinds) > 1:
        raise ConfigError(f"{GGUF_BLOCKS} weights: one product's weights are stored in several GGML types "
                          f"({sorted(kinds)}): use another --weights format")
    blocks = [m.gguf_blocks() for m in linears]
    return (blocks[0] if len(blocks) == 1 else torch.cat(blocks)), kinds.pop()


def _fused_product(name: str):
    ops = fused_ops()
    if ops is None:
        raise ConfigError(f"{name} weights need the fused CPU kernels, which could not be built here (see the "
                          "warning above): use --weights fp16")
    if name == GGUF_BLOCKS and ops.vector_isa() == "generic":
        raise ConfigError(f"{name} weights need a CPU with AVX2 and FMA (or AVX-512): use --dtype bfloat16")
    if name == BF16_DOT and not ops.bf16_dot_supported():
        raise ConfigError(f"{name} weights need a CPU with AVX512-BF16 dot products, which this one lacks: use "
                          "--weights fp16")
    return getattr(ops, FUSED_PRODUCTS[name])


def bf16_dot_available(device: torch.device, fused: bool | None = None) -> bool:
    """Whether `bf16-fused` products can run here: on CPU, the fused kernels wanted and built, for a CPU with
    AVX512-BF16 dot products."""
    if not fused_wanted(device, fused):
        return False
    ops = fused_ops()
    return ops is not None and ops.bf16_dot_supported()


INT4_GROUP = 32  # weights per scale and zero point, as in llama.cpp's Q4_1 blocks


def _int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row, for aten's _weight_int8pack_mm."""
    w = weight.float()
    scales = (w.abs().amax(1) / 127).clamp(min=1e-12)
    quantized = (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
    return quantized, scales.to(weight.dtype)


def _fp16_weight(weight: torch.Tensor):
    # rounds values float16 cannot hold: who chooses the format decides what may round (a target's weights
    # only below float16's normal range, see fp16_holds; a drafter's freely: its proposals are verified)
    return torch.ops.quantized.linear_prepack_fp16(weight.float(), None)


FP16_NORMAL, FP16_MAX = 2.0**-14, 65504.0  # float16's normal range: 11 significant bits throughout


def fp16_holds(weights) -> bool:
    """Packing these weights as float16 keeps every one of float16's normal range exactly (bfloat16's 8
    significant bits fit its 11) and overflows none; smaller ones move by at most 2**-25, half float16's
    subnormal step, far below the rounding of the products they enter. float32 weights seldom qualify."""
    for w in weights:
        if w.dtype == torch.float16:
            continue
        if w.dtype == torch.bfloat16:  # every bf16 value of the normal range fits: only overflow can fail
            if not w.abs().amax() <= FP16_MAX:  # (NaN fails too)
                return False
            continue
        packed = w.to(torch.float16).to(w.dtype)
        normal = w.abs() >= FP16_NORMAL
        if not torch.isfinite(packed).all() or not torch.equal(packed[normal], w[normal]):
            return False
    return True


_FP16_HOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> fp16_holds of its linear weights


def model_fp16_holds(model: PreTrainedModel) -> bool:
    if model not in _FP16_HOLDS:
        _FP16_HOLDS[model] = fp16_holds(m.weight for m in model.modules() if isinstance(m, torch.nn.Linear))
    return _FP16_HOLDS[model]


def _int4_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of INT4_GROUP along the input (minimum and step per group, like Q4_1), packed
    for aten's _weight_int4pack_mm_for_cpu, which reads w = (q - 8) * scale + zero."""
    rows, columns = weight.shape
    if columns % INT4_GROUP or rows % 16:
        raise ConfigError(f"int4 weights need input sizes divisible by {INT4_GROUP} and output sizes by 16 "
                          f"(aten's packing), got {rows} x {columns}: use int8 or another format")
    groups = weight.float().reshape(rows, columns // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-12)
    quantized = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, columns)
    zero = low + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(weight.dtype)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(quantized, 1), scales_and_zeros


def candidate_formats(weight: torch.Tensor, fp16: bool | None = None, fused: bool | None = False
                      ) -> list[WeightFormat]:
    """The formats worth timing for this weight. They agree with F.linear up to float rounding (the order of a
    dot product's additions differs by kernel, as it does between batch sizes within one kernel). `fp16`:
    whether packing the model's weights as float16 keeps them (`fp16_holds`; None: this weight's, for a model's
    part of which this is the largest product)."""
    if weight.device.type != "cpu":
        return [WeightFormat("stored")]
    names = ["stored", "transposed"]
    # oneDNN's packed bf16 weights need AVX-512 (or AVX-NE-CONVERT): an AVX2-only CPU raises on them
    bf16_ok = weight.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if torch.backends.mkldnn.is_available() and bf16_ok:
        names.append("onednn")
    if fp16 is None:
        fp16 = fp16_holds([weight])
    if fp16 and "fbgemm" in torch.backends.quantized.supported_engines:
        names.append("fp16")
    # fused: whether the lean forward may use the fused kernels (False for a lone product's timing, which
    # cannot see what they save; see fastest_step_format)
    if weight.dtype == torch.bfloat16 and fused is not False and bf16_dot_available(weight.device, fused):
        names.append(BF16_DOT)
    return [WeightFormat(name) for name in names]


TIMED_ROWS = (1, 8)  # a one-token step and a verification: a format is timed on both, summed


@torch.no_grad()
def fastest_format(weight: torch.Tensor, fp16: bool | None = None, rounds: int = 7, repeats: int = 3,
                   fused: bool | None = False) -> WeightFormat:
    """Time products of 1 and 8 rows with `weight` in each candidate format and keep the fastest (see
    `fastest`): a format whose cost grows steeply with rows (aten's emulated bf16 on AVX2) loses there what
    speculative decoding's verification would lose. `fused`: whether the fused kernels' products compete."""
    formats = candidate_formats(weight, fp16, fused)
    if len(formats) == 1:
        return formats[0]
    inputs = [torch.randn(1, rows, weight.shape[1], dtype=weight.dtype) for rows in TIMED_ROWS]
    prepared = {}
    for fmt in formats:
        try:
            prepared[fmt] = fmt.prepare(weight)
            fmt.multiply(inputs[0], prepared[fmt])  # warm-up
        except RuntimeError:  # a torch build without this kernel
            prepared.pop(fmt, None)

    def products(fmt: WeightFormat) -> None:
        for x in inputs:
            fmt.multiply(x, prepared[fmt])

    return fastest({fmt: functools.partial(products, fmt) for fmt in preferred_first(list(prepared))}, rounds, repeats)


CLEAR_MARGIN = 0.05  # a format must be this much faster than the preferred one to displace it
# the order that decides when no candidate wins clearly: the fused kernels' formats (built for a whole step)
# first, then FBGEMM's and oneDNN's packed products, then aten's
FORMAT_PREFERENCE = (BF16_DOT, "fp16-fused", "fp16", "onednn", "transposed", "stored")


def fastest(runs: dict, rounds: int = 7, repeats: int = 3, timing: dict | None = None):
    """The key of the fastest of `runs` (warmed-up callables, in order of preference). They take turns over
    several rounds and each keeps its best round, so a burst of load on a shared machine during one's turn
    cannot decide the choice; and the fastest is kept only if it beats every candidate preferred to it by
    CLEAR_MARGIN, else the most preferred candidate within that margin is: two formats level within the noise
    do not flip between two machines or two measurements. `timing` (a dict) receives the best times (ms) and
    the margin by which the choice beat the runner-up (negative: it was kept by preference, not speed)."""
    best = {key: float("inf") for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            best[key] = min(best[key], time.perf_counter() - start)
    quickest = min(best.values())
    choice = next(key for key in runs if best[key] <= quickest * (1 + CLEAR_MARGIN))
    others = [t for key, t in best.items() if key != choice]
    if timing is not None:
        timing["ms"] = {str(getattr(key, "name", key)): round(t * 1e3 / repeats, 4) for key, t in best.items()}
        timing["margin"] = round(min(others) / best[choice] - 1, 4) if others else None
    return choice


def preferred_first(formats: list[WeightFormat]) -> list[WeightFormat]:
    rank = {name: i for i, name in enumerate(FORMAT_PREFERENCE)}
    return sorted(formats, key=lambda f: rank.get(f.name, len(rank)))


WEIGHT_CHOICES = ("auto", "fastest", "stored", "transposed", "onednn", *FP16_FORMATS, BF16_DOT, GGUF_BLOCKS,
                  *QUANTIZED)


def choose_format(model: PreTrainedModel, weights: str = "auto", fused: bool | None = None) -> WeightFormat:
    """`auto`: float32 keeps transformers' own layout and kernel (F.linear), so its logits are transformers'
    bit for bit, as `--dtype float32` promises; other dtypes take the fastest format. `fastest`: the format
    whose lean decoding step (`fastest_step_format`, with the fused kernels as `fused` asks) was timed fastest
    on this machine for this dtype and shape, measured ONCE and cached on disk (timing at every load could pick
    differently between two loads, and so round differently). Or a format by name: `int8` and `int4` quantize
    the weights (lossy: another model, whose greedy output is compared, never promised equal; never chosen
    unless named)."""
    if weights not in WEIGHT_CHOICES:
        raise ConfigError(f"unknown weight format '{weights}': use one of {', '.join(WEIGHT_CHOICES)}")
    if weights == "auto" and getattr(model, "gguf_blocks_default", False) and has_gguf_blocks(model):
        weights = GGUF_BLOCKS  # a GGUF target loaded without a --dtype: the file's own blocks
    if weights == "auto":
        weights = "stored" if model.dtype == torch.float32 else "fastest"
    if weights in (*QUANTIZED, *FP16_FORMATS, BF16_DOT, GGUF_BLOCKS) and model.device.type != "cpu":
        raise ConfigError(f"{weights} weights use CPU kernels (aten's, FBGEMM's); on {model.device.type} use "
                          "another format")
    if weights in FP16_FORMATS and not model_fp16_holds(model):
        raise ConfigError(f"{weights} weights would round this {model.dtype} model's weights (some have more significant "
                          "bits than float16 holds, or exceed its range): use another format")
    if weights == BF16_DOT and model.dtype != torch.bfloat16:
        raise ConfigError(f"{weights} weights multiply bfloat16 weights: load the model with --dtype bfloat16")
    if weights != "fastest":
        return WeightFormat(weights)
    # fp16 is a CPU format: elsewhere its check would only cost time at load
    fp16 = model.device.type == "cpu" and model_fp16_holds(model)
    formats = candidate_formats(model.lm_head.weight, fp16, fused)
    if len(formats) == 1:
        return formats[0]
    # the fused kernels change what a format's step costs (they run only beside float32 products): part of the key
    fused_on = fused_wanted(model.device, fused) and fused_ops() is not None
    cfg = model.config
    shape = (f"{cfg.num_hidden_layers}x{cfg.hidden_size}x{cfg.intermediate_size}-heads{cfg.num_attention_heads}/"
             f"{cfg.num_key_value_heads}-vocab{model.lm_head.weight.shape[0]}")
    key = (f"step-{model.dtype}-{shape}-{'+'.join(f.name for f in formats)}-rows{'+'.join(map(str, TIMED_ROWS))}"
           f"-fused{int(fused_on)}-clear{CLEAR_MARGIN}")  # (choices made before margins were measured again)
    def measure() -> dict:
        timing = {}
        return {"choice": fastest_step_format(model, formats, fused, timing=timing).name, **timing}

    return WeightFormat(cached_choice(measured_once(key, measure)))


def cached_choice(entry: str | dict) -> str:
    """A cached format choice: its name (entries written before margins were recorded are the bare name)."""
    return entry if isinstance(entry, str) else entry["choice"]


STEP_PROBE_BYTES = 512 * 2**20  # a format's step is timed on the model's first layers up to this many bytes


@torch.no_grad()
def fastest_step_format(model: PreTrainedModel, formats: list[WeightFormat], fused: bool | None = None,
                        context: int = 256, rounds: int = 5, timing: dict | None = None) -> WeightFormat:
    """The format whose lean decoding steps (1 and 8 tokens after `context` cached ones: a step and a
    verification) run fastest here: every layer's products, norms, attention and cache writes as the lean
    forward does them, and the output head. Timing the products alone misjudged it: on a 2-core AVX-512 EPYC
    oneDNN's bf16 products were level with FBGEMM's fp16 ones, while the whole step ran 9.4 ms in `fp16`
    (float32 activations, where the fused kernels apply) against 12.3 ms in `onednn`. A large model is timed on
    its first layers (STEP_PROBE_BYTES, more than any CPU cache holds), run over as often as it has layers."""
    cfg, inner = model.config, model.model
    per_layer = sum(p.numel() * p.element_size() for p in inner.layers[0].parameters())
    probe = max(1, min(len(inner.layers), STEP_PROBE_BYTES // max(per_layer, 1)))
    passes = -(-len(inner.layers) // probe)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rotary = LeanWeights.rope_tables(model)
    runs = {}
    for fmt in preferred_first(formats):
        try:
            layers = LeanLayers([lean_layer(layer, fmt, share=False) for layer in inner.layers[:probe]], fmt,
                                *rotary, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.rms_norm_eps,
                                model.dtype, model.device, fused=fused)
            layers.reset(context + max(TIMED_ROWS))
            layers.length = context  # zeros in the cache: attention reads `context` entries all the same
            runs[fmt] = functools.partial(_probe_steps, layers, fmt.prepare(model.lm_head.weight), passes, context)
            runs[fmt]()  # warm-up
        except RuntimeError:  # a torch build without this kernel
            runs.pop(fmt, None)
    return fastest(runs, rounds, repeats=1, timing=timing)


def _probe_steps(layers: LeanLayers, head, passes: int, context: int) -> None:
    """One step of each TIMED_ROWS size through the probe layers (`passes` times over) and the output head."""
    hidden, norm = layers.layers[0]["attn_norm"].shape[0], layers.layers[0]["attn_norm"]
    with torch.inference_mode():
        for rows in TIMED_ROWS:
            x = torch.randn(1, rows, hidden, device=layers.device).to(layers.stream_dtype)
            positions = torch.arange(context, context + rows, device=layers.device)
            mask = layers.attention_mask(rows, context, None, layers.device)
            for _ in range(passes):
                y = layers.decoder_layers(x, positions, mask, context, causal=False)
            layers.weights.multiply(layers.norm(y, norm), head)


def cached_fastest_format(weight: torch.Tensor, fp16: bool | None = None, fused: bool | None = False
                          ) -> WeightFormat:
    formats = candidate_formats(weight, fp16, fused)
    if len(formats) == 1:
        return formats[0]
    # the candidates and timed rows are part of the question: a new candidate is timed, not an old answer read
    names = "+".join(f.name for f in formats)
    key = f"{weight.dtype}-{tuple(weight.shape)}-{names}-rows{'+'.join(map(str, TIMED_ROWS))}"
    return WeightFormat(cached_choice(measured_once(key, lambda: fastest_format(weight, fp16, fused=fused).name)))


def measured_once(key: str, measure) -> str:
    """The answer `measure()` gave on this machine (CPU model and instruction sets), torch and thread count,
    measured the first time and kept on disk: timing again at every load could choose differently between two
    loads, and so round differently."""
    machine = f"{cpu_key()}-{torch.__version__}-{key}-threads{torch.get_num_threads()}"
    return cached_entry("weight_formats.json", machine, measure)


@torch.no_grad()
def attention_dtype(dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int, device: torch.device) -> torch.dtype:
    """The dtype a lean forward below float32 keeps its cache in and attends in: its own, or float32 where that
    is faster on this CPU (measured once). A CPU without bf16 arithmetic emulates the small attention products:
    a 2-core AVX2 EPYC took 224 us a layer in bfloat16 against 42 in float32."""
    if dtype == torch.float32 or device.type != "cpu":
        return dtype

    def measure() -> str:
        probe = LeanLayers([], WeightFormat("stored"), torch.empty(0), torch.empty(0), n_heads, n_kv, head_dim,
                           0.0, dtype, device)
        q = torch.randn(1, n_heads, 1, head_dim, dtype=dtype)
        runs = {}
        for candidate in (dtype, torch.float32):
            keys, values = (torch.randn(1, n_kv, 256, head_dim, dtype=candidate) for _ in range(2))
            name = str(candidate).removeprefix("torch.")
            runs[name] = functools.partial(_attend_as, probe, q, keys, values, dtype)
            runs[name]()  # warm-up
        return fastest(runs, rounds=5, repeats=20)

    return getattr(torch, measured_once(f"attention-{dtype}-{n_heads}x{n_kv}x{head_dim}", measure))


@functools.cache
def compiled_stack():
    """One compiled layer stack per process, shared by every LeanLlama: torch.compile keeps a graph per shape
    family and model, and inductor caches its kernels on disk across processes. Dynamic shapes, so that cache
    lengths and draft sizes do not each trigger a recompilation."""
    return torch.compile(LeanLlama._forward_stack, dynamic=True)


def grouped_masked_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
                             ) -> torch.Tensor:
    """Attention of q [1, heads, n, d] over keys/values [1, kv heads, length, d] under mask [n, length], with
    the queries of the heads that share a key/value head as rows of one attention and the mask repeated for
    each: as many heads as keys, so no kernel needs enable_gqa, and no copy of the cache is made."""
    heads, n, head_dim = q.shape[1:]
    n_kv = keys.shape[1]
    group = heads // n_kv
    grouped = q.reshape(1, n_kv, group * n, head_dim)  # head h = kv * group + g: row g * n + j
    out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask.repeat(group, 1))
    return out.reshape(1, heads, n, head_dim)


def _attend_as(probe: LeanLayers, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype):
    """Attention as `LeanLayers.layer` runs it with a cache of keys.dtype: queries cast in, the result out."""
    return probe._attention(q.to(keys.dtype), keys, values, None).to(dtype)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # a Python comparison is cheaper than a no-op `.to` call, and the lean step makes ~10 of them a layer
    return x if x.dtype == dtype else x.to(dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the same operations as transformers' LlamaRMSNorm, so fp32 results match it bit for bit
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # one fused kernel instead of seven operations; rounds differently from transformers: below float32 only
    return F.rms_norm(x, weight.shape, weight, eps)


def _swapped_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, signed_sin)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True)
class BackendConfig:
    """How the target's forward runs: one typed config from the command line to the forward, the same for
    generate, serve and bench."""

    lean: bool = True  # our own Llama-family forward over a static cache; False: transformers' forward
    compile: bool = False  # torch.compile the lean forward (once per process; its time is the runner's compile_s)
    weights: str = "auto"  # the lean forward's weight layout (choose_format)
    graphs: bool | None = None  # replay captured CUDA graphs for steps (None: on CUDA below fp32; cuda_graphs.py)
    fused: bool | None = None  # the lean forward's fused CPU kernels (None: on CPU below fp32; fused.py)


def cached_lm(model: PreTrainedModel, backend: BackendConfig = BackendConfig()) -> LeanLlama | HFCachedLM:
    """The fastest backend that runs this model exactly (compiled on request: Llama-family models only); a
    model llama.cpp loaded gets its llama.cpp context."""
    if hasattr(model, "new_cached_lm"):
        if backend.compile or backend.graphs or backend.weights != "auto":
            raise ConfigError("--compile, --cuda-graphs and --weights apply to the lean torch forward; the llama.cpp "
                              "backend runs the GGUF file's own weights (write another with `draftsmith export "
                              "--format gguf`)")
        return model.new_cached_lm()
    if backend.lean and LeanLlama.supports(model):
        return LeanLlama(model, compile=backend.compile, weights=backend.weights, graphs=backend.graphs,
                         fused=backend.fused)
    if backend.graphs:
        raise ConfigError(f"CUDA graphs capture the lean Llama-family forward; {model.config.model_type} runs "
                          "through transformers")
    if backend.compile:
        warnings.warn(f"--compile applies to the lean Llama-family forward; {model.config.model_type} runs eager",
                      stacklevel=2)
    return HFCachedLM(model)
