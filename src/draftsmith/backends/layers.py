"""Llama decoder layers over a preallocated KV cache: the lean forward's body, shared by a target and an EAGLE
head's single layer."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from draftsmith.backends.formats import WeightFormat, _cast
from draftsmith.backends.fused import fused_ops
from draftsmith.backends.fused import wanted as fused_wanted
from draftsmith.backends.timing import fastest, measured_once

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CACHE_BLOCK = 256  # the lean cache grows in blocks of this many positions
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
        x, h = ops.add_rms_norm(self.residual(x), out if w["bo"] is None else out + w["bo"], w["mlp_norm"], self.eps)
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

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """The part of a layer's input that its attention output is added to: all of it in a Llama layer."""
        return x

    def mix(self, i: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The rest of layer i after attention ([1, heads, n, d]): output projection, residual, MLP."""
        w, n, x = self.layers[i], x.shape[1], self.residual(x)
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
        there; from a few queries on, the fused kernel wins (docs/design/backends.md has the timings).
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



@torch.no_grad()
def rope_tables(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, head_dim] from the model's own rotary module, so every scaling variant is
    honoured."""
    probe = torch.zeros(1, dtype=model.dtype, device=model.device)
    positions = torch.arange(model.config.max_position_embeddings, device=model.device)[None]
    cos, sin = model.model.rotary_emb(probe, positions)
    return cos[0], sin[0]


@torch.no_grad()
def attention_dtype(dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int, device: torch.device) -> torch.dtype:
    """The dtype a lean forward below float32 keeps its cache in and attends in: its own, or float32 where that
    is faster on this CPU (measured once): a CPU without bf16 arithmetic emulates the small attention products
    several times slower than it runs them in float32."""
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
