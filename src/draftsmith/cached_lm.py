"""A causal LM with its KV cache, as the engine needs it: feed tokens (at given positions, under an optional
tree mask), get float32 logits, keep or drop cache entries by moving a length.

Two backends behind one interface:
- `LeanLlama`: Llama-family models (Llama, SmolLM, Mistral, Qwen2) run by a short forward of our own over a
  preallocated cache, from the transformers model's weights. Rolling back is setting `length`; no per-step
  allocation beyond activations; q/k/v and gate/up are fused into one matmul each; each weight is stored in
  whichever layout multiplies faster on this machine (on a 2-core AVX-512 CPU: [in, out] for fp32, 1.5x faster
  than torch's [out, in]; [out, in] for bf16).
- `HFCachedLM`: any other transformers causal LM, through its own forward and a cropped DynamicCache.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

LEAN_MODEL_TYPES = {"llama", "mistral", "qwen2"}
CACHE_BLOCK = 256  # the lean cache grows in blocks of this many positions


class HFCachedLM:
    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.length = 0

    def reset(self, capacity: int = 0) -> None:
        self.cache, self.length = DynamicCache(config=self.model.config), 0

    @torch.inference_mode()
    def forward(
        self, ids: list[int], positions: list[int] | None = None, tree_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Float32 logits [n, vocab] (or [1, vocab] with last_only) for tokens fed after the cache."""
        device = self.model.device
        kwargs = {"logits_to_keep": 1} if last_only else {}
        if tree_mask is not None:  # additive [1, 1, n, length + n]: a tree's nodes see only their ancestors
            allowed = torch.ones(len(ids), self.length + len(ids), dtype=torch.bool)
            allowed[:, self.length :] = tree_mask
            mask = torch.zeros(allowed.shape, dtype=self.model.dtype).masked_fill(~allowed, torch.finfo(self.model.dtype).min)
            kwargs["attention_mask"] = mask[None, None].to(device)
        if positions is not None:
            kwargs["position_ids"] = torch.tensor([positions], device=device)
        out = self.model(input_ids=torch.tensor([ids], device=device), past_key_values=self.cache, use_cache=True,
                         **kwargs)
        self.length += len(ids)
        return out.logits[0].float()

    @torch.inference_mode()
    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep entries start + offsets (in that order) at start, start + 1, ...; drop everything after them."""
        if offsets != list(range(len(offsets))):
            index = torch.tensor(offsets, device=self.model.device) + start
            for layer in self.cache.layers:
                for tensor in (layer.keys, layer.values):
                    tensor[:, :, start : start + len(offsets)] = tensor.index_select(2, index)
        self.truncate(start + len(offsets))

    def truncate(self, length: int) -> None:
        self.cache.crop(-(self.length - length))
        self.length = length


class LeanLlama:
    def __init__(self, model: PreTrainedModel):
        cfg = model.config
        self.model, self.device, self.dtype = model, model.device, model.dtype
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        inner = model.model
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.transposed = _transposed_is_faster(model.lm_head.weight)
        layout = (lambda w: w.t().contiguous()) if self.transposed else (lambda w: w)
        self.lm_head = layout(model.lm_head.weight)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            projections = (attn.q_proj, attn.k_proj, attn.v_proj)
            self.layers.append(
                dict(
                    attn_norm=layer.input_layernorm.weight,
                    wqkv=layout(torch.cat([p.weight for p in projections])),
                    bqkv=torch.cat([p.bias for p in projections]) if attn.q_proj.bias is not None else None,
                    wo=layout(attn.o_proj.weight),
                    mlp_norm=layer.post_attention_layernorm.weight,
                    w_gate_up=layout(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    w_down=layout(mlp.down_proj.weight),
                )
            )
        # RoPE tables from the model's own rotary module, so every scaling variant is honoured
        max_positions = cfg.max_position_embeddings
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            cos, sin = inner.rotary_emb(probe, torch.arange(max_positions, device=self.device)[None])
        self.cos, self.sin = cos[0], sin[0]
        self.k_cache = self.v_cache = torch.empty(0)
        self.length = 0

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

    def reset(self, capacity: int = 0) -> None:
        self.length = 0
        self._reserve(capacity)

    def _reserve(self, capacity: int) -> None:
        if self.k_cache.dim() == 4 and capacity <= self.k_cache.shape[2]:
            return
        size = -(-max(capacity, 1) // CACHE_BLOCK) * CACHE_BLOCK
        shape = (len(self.layers), self.n_kv, size, self.head_dim)
        k_new = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v_new = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.length:
            k_new[:, :, : self.length] = self.k_cache[:, :, : self.length]
            v_new[:, :, : self.length] = self.v_cache[:, :, : self.length]
        self.k_cache, self.v_cache = k_new, v_new

    @torch.inference_mode()
    def forward(
        self, ids: list[int], positions: list[int] | None = None, tree_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Float32 logits [n, vocab] (or [1, vocab] with last_only) for tokens fed after the cache."""
        n, start = len(ids), self.length
        end = start + n
        self._reserve(end)
        pos = torch.arange(start, end, device=self.device) if positions is None else torch.tensor(positions, device=self.device)
        cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]
        mask = None
        if tree_mask is not None:
            mask = torch.ones(n, end, dtype=torch.bool, device=self.device)
            mask[:, start:] = tree_mask
        elif n > 1:  # a chain: causal, offset by the cached prefix
            mask = torch.ones(n, end, dtype=torch.bool, device=self.device).tril(start)
        x = F.embedding(torch.tensor([ids], device=self.device), self.embed)
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        for i, w in enumerate(self.layers):
            h = _rms_norm(x, w["attn_norm"], self.eps)
            qkv = self._mm(h, w["wqkv"])
            if w["bqkv"] is not None:
                qkv = qkv + w["bqkv"]
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = _rope(q.view(1, n, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
            k = _rope(k.view(1, n, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
            self.k_cache[i, :, start:end] = k[0]
            self.v_cache[i, :, start:end] = v.view(n, self.n_kv, self.head_dim).transpose(0, 1)
            keys, values = self.k_cache[i : i + 1, :, :end], self.v_cache[i : i + 1, :, :end]
            attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
            x = x + self._mm(attn.transpose(1, 2).reshape(1, n, q_size), w["wo"])
            h = _rms_norm(x, w["mlp_norm"], self.eps)
            gate, up = self._mm(h, w["w_gate_up"]).chunk(2, dim=-1)
            x = x + self._mm(F.silu(gate) * up, w["w_down"])
        self.length = end
        if last_only:
            x = x[:, -1:]
        return self._mm(_rms_norm(x, self.final_norm, self.eps), self.lm_head)[0].float()

    def _mm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x @ weight if self.transposed else F.linear(x, weight)

    @torch.inference_mode()
    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep entries start + offsets (in that order) at start, start + 1, ...; drop everything after them."""
        if offsets != list(range(len(offsets))):
            index = torch.tensor(offsets, device=self.device) + start
            for cache in (self.k_cache, self.v_cache):
                cache[:, :, start : start + len(offsets)] = cache.index_select(2, index)
        self.truncate(start + len(offsets))

    def truncate(self, length: int) -> None:
        self.length = length  # entries past the length are dead: the next forward overwrites them


@torch.inference_mode()
def _transposed_is_faster(weight: torch.Tensor, repeats: int = 5) -> bool:
    """Time one-token products with `weight` as stored ([out, in]) and transposed ([in, out]); CPU only, where
    BLAS kernels differ by layout and dtype (on CUDA the stored layout is kept)."""
    if weight.device.type != "cpu":
        return False
    x, transposed = torch.randn(1, weight.shape[1], dtype=weight.dtype), weight.t().contiguous()
    best = {}
    for name, run in (("stored", lambda: F.linear(x, weight)), ("transposed", lambda: x @ transposed)):
        run()
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        best[name] = time.perf_counter() - start
    return best["transposed"] < best["stored"]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the same operations as transformers' LlamaRMSNorm, so fp32 results match it bit for bit
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def cached_lm(model: PreTrainedModel, lean: bool = True) -> LeanLlama | HFCachedLM:
    """The fastest backend that runs this model exactly."""
    return LeanLlama(model) if lean and LeanLlama.supports(model) else HFCachedLM(model)
