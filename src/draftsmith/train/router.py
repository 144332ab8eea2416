"""Train D-LLM routers on a frozen target (`draftsmith train router`).

Training forward: at each routed layer a token draws a hard execute / skip decision by Gumbel-softmax (straight
through: hard in the forward, the soft probabilities' gradient in the backward) and its output is
gate * layer(x) + (1 - gate) * x. A token that skips a layer computes no keys or values there, so attention
weights on it are zeroed for every other token and each row renormalised: training sees the same holes decoding
has. The first `reserve` positions (the attention sinks) always execute.

Loss = soft cross-entropy to the DENSE target's own next-token distribution (the routed model is trained to
agree with the model it drafts for) + lambda * mean over tokens of |executed share of the layers - ratio|.
D-LLM fine-tunes the target with LoRA beside the routers and uses lambda 5; with the target frozen, 5 left
SmolLM2's routers at 86% executed for a ratio of 0.5, so the default here is 50.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from draftsmith.data.corpus import load_corpus
from draftsmith.errors import ConfigError
from draftsmith.routers import RouterConfig, Routers, save_routers
from draftsmith.train.distill import TokenChunks, shuffled
from draftsmith.train.trainer import Batch, TrainConfig, Trainer


@dataclass
class RouterTrainConfig:
    ratio: float = 0.5  # target share of executed layers
    start_layer: int = 2
    lam: float = 50.0  # weight of the ratio term (D-LLM's 5 is too weak for a frozen target: docs/drafters/layerskip.md)
    tau: float = 1.0  # Gumbel-softmax temperature
    noise: float = 1.0  # scale of the Gumbel noise (1: D-LLM's sampling; 0: the argmax decoding uses, straight through)
    reserve: int = 2  # first positions of a sequence that always execute
    seq_len: int = 256
    sequences: int = 1024  # training sequences cut from the corpus
    heldout_sequences: int = 16
    corpus: str | None = None  # default: the Python standard library
    heldout_percent: float = 10.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lam < 0 or self.tau <= 0:
            raise ConfigError(f"lambda must be >= 0 and tau > 0, got lam={self.lam}, tau={self.tau}")
        if self.seq_len < 2 or self.sequences < 1:
            raise ConfigError("router training needs sequences of at least 2 tokens")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def routed_layer(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_gate: torch.Tensor,
                 allowed: torch.Tensor) -> torch.Tensor:
    """A Llama decoder layer (its own modules) over x [B, T, H], attention weights on keys multiplied by
    key_gate [B, T] and renormalised. Returns the layer's output (before gating)."""
    attn = layer.self_attn
    b, t, _ = x.shape
    d = attn.head_dim
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, t, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, -1, d).transpose(1, 2)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1) * key_gate[:, None, None, :]
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-6)
    out = attn.o_proj((weights @ v).transpose(1, 2).reshape(b, t, -1))
    x = x + out
    return x + layer.mlp(layer.post_attention_layernorm(x))


def straight_through_gate(logits: torch.Tensor, tau: float, noise: float) -> torch.Tensor:
    """Hard execute (1) / skip (0) decisions from logits [..., 2] plus scaled Gumbel noise, with the gradient of
    the soft probabilities (straight through)."""
    if noise:
        logits = logits + noise * -torch.empty_like(logits).exponential_().log()
    soft = (logits / tau).softmax(-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return (hard - soft.detach() + soft)[..., 1]


def routed_forward(target: PreTrainedModel, routers: Routers, ids: torch.Tensor, attention_mask: torch.Tensor,
                   cfg: RouterTrainConfig, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] of the routed target and its gates [B, T, layers] (1 = executed). `sample`: Gumbel
    decisions (training); else the routers' argmax (what decoding does)."""
    inner = target.model
    b, t = ids.shape
    x = inner.embed_tokens(ids)
    positions = torch.arange(t, device=ids.device)[None]
    cos, sin = inner.rotary_emb(x, positions)
    cos, sin = cos[:, None], sin[:, None]
    allowed = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()[None, None] & attention_mask[:, None, None, :].bool()
    forced = (torch.arange(t, device=ids.device) < cfg.reserve)[None].expand(b, t)
    gates = []
    for i, layer in enumerate(inner.layers):
        logits = routers.logits(i, x)
        if logits is None:
            gate = torch.ones(b, t, device=ids.device, dtype=x.dtype)
        elif sample:
            gate = straight_through_gate(logits.float(), cfg.tau, cfg.noise).to(x.dtype)
        else:
            gate = (logits[..., 1] > logits[..., 0]).to(x.dtype)
        gate = torch.where(forced, torch.ones_like(gate), gate)
        out = routed_layer(layer, x, cos, sin, gate, allowed)
        x = gate[..., None] * out + (1 - gate[..., None]) * x
        gates.append(gate)
    return target.lm_head(inner.norm(x)), torch.stack(gates, -1)


class RoutedTarget(nn.Module):
    """The frozen target and its trainable routers, as one module for the trainer (it saves what trains)."""

    def __init__(self, target: PreTrainedModel, routers: Routers):
        super().__init__()
        self.target, self.routers = target, routers
        target.requires_grad_(False)


def router_loss(model: RoutedTarget, batch: Batch, cfg: RouterTrainConfig) -> tuple[torch.Tensor, dict]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        dense = model.target(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    logits, gates = routed_forward(model.target, model.routers, ids, mask, cfg)
    real = mask[:, 1:].bool() & mask[:, :-1].bool()
    soft_ce = -(dense[:, :-1].exp() * logits[:, :-1].float().log_softmax(-1)).sum(-1)
    ce = soft_ce[real].mean()
    executed = gates.float().mean(-1)  # per token: share of all layers run
    ratio_gap = (executed - cfg.ratio).abs()[mask.bool()].mean()
    agree = (logits[:, :-1].argmax(-1) == dense[:, :-1].argmax(-1))[real].float().mean()
    return ce + cfg.lam * ratio_gap, {"ce": ce.detach(), "ratio_gap": ratio_gap.detach(),
                                      "executed": executed[mask.bool()].mean().detach(), "agree": agree}


class RouterEval:
    """Held-out: the executed share and the agreement of the routed target's argmax (routers deciding as at
    decode time) with the dense target's."""

    def __init__(self, data: TokenChunks, cfg: RouterTrainConfig):
        self.data, self.cfg = data, cfg

    @torch.no_grad()
    def __call__(self, model: RoutedTarget) -> dict[str, float]:
        device = next(model.routers.parameters()).device
        ids, mask = self.data.input_ids.to(device), self.data.attention_mask.to(device)
        dense = model.target(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        logits, gates = routed_forward(model.target, model.routers, ids, mask, self.cfg, sample=False)
        real = mask[:, 1:].bool()
        agree = (logits[:, :-1].argmax(-1) == dense[:, :-1])[real].float().mean()
        return {"executed": float(gates.float().mean(-1)[mask.bool()].mean()), "agreement": float(agree)}


def train_routers(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: RouterTrainConfig,
                  train: TrainConfig) -> tuple[Routers, dict]:
    """Train routers for `target` on corpus text and save them in train.out_dir (`--drafter layerskip:DIR`)."""
    started = time.perf_counter()
    config = RouterConfig(hidden_size=target.config.hidden_size, num_layers=target.config.num_hidden_layers,
                          start_layer=cfg.start_layer, target_ratio=cfg.ratio)
    trainer = Trainer(train)  # seeds first: the routers' initialisation is reproducible
    routers = Routers(config).to(target.dtype)
    docs = shuffled(load_corpus(cfg.corpus, split="train", heldout_percent=cfg.heldout_percent), train.seed)
    data = TokenChunks(docs, tokenizer, cfg.seq_len, max_chunks=cfg.sequences)
    heldout_docs = load_corpus(cfg.corpus, split="heldout", heldout_percent=cfg.heldout_percent)
    heldout = TokenChunks(heldout_docs, tokenizer, cfg.seq_len, max_chunks=cfg.heldout_sequences)
    result = trainer.fit(RoutedTarget(target, routers), data, lambda m, b: router_loss(m, b, cfg),
                         RouterEval(heldout, cfg))
    config.training = {"command": shlex.join(["draftsmith", *sys.argv[1:]]), **cfg.extra,
                       "corpus": cfg.corpus or "python stdlib", "steps": result.step, "heldout": result.eval,
                       "train_sequences": len(data), "seq_len": cfg.seq_len, "lam": cfg.lam,
                       "train_seconds": round(time.perf_counter() - started, 1)}
    if trainer.is_main_process:
        save_routers(routers, train.out_dir)
    return routers, config.training
