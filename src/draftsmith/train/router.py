"""Train D-LLM routers for a target (`draftsmith train router`), by one of two recipes.

Training forward (both): at each routed layer a token draws a hard execute / skip decision by Gumbel-softmax
(straight through: hard in the forward, the soft probabilities' gradient in the backward) and its output is
gate * layer(x) + (1 - gate) * x. A token that skips a layer computes no keys or values there, so attention
weights on it are zeroed for every other token and each row renormalised: training sees the same holes decoding
has. The first `reserve` positions (the attention sinks) always execute.

`distil` (ours): the target frozen; loss = soft cross-entropy to the DENSE target's own next-token distribution
(the routed model is trained to agree with the model it drafts for) + lambda * mean over tokens of |executed share
of the layers - ratio|. With the target frozen, D-LLM's lambda 5 left SmolLM2's routers at 86% executed for a
ratio of 0.5, so the default here is 50.

`upstream` (SpaDec's D-LLM training): a LoRA (peft; rank 8 on q, k, v, scale 1, dropout 0.05, A drawn from
N(0, 1/rank), B zero) on the target trains with the routers; loss = cross-entropy on the data's next tokens +
lambda (5) * the mean L1 of each token's executed share against the ratio, over the positions that have a next
token, the first `reserve` excluded. The LoRA is saved beside the routers (peft's adapter files).

Either recipe can train a robust router (`input_bits`, routers.py): its input quantized per token to 4 bits.
"""

from __future__ import annotations

import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from draftsmith.data.corpus import load_corpus
from draftsmith.errors import ConfigError
from draftsmith.routers import RECIPES, RouterConfig, Routers, save_routers
from draftsmith.train.distill import TokenChunks, shuffled
from draftsmith.train.trainer import Batch, TrainConfig, Trainer


LORA_MODULES = ("q_proj", "k_proj", "v_proj")  # where SpaDec's router training puts its LoRA
RECIPE_LAMBDA = {"distil": 50.0, "upstream": 5.0}  # D-LLM's 5 is too weak for a frozen target (docs/drafters/spadec.md)


@dataclass
class RouterTrainConfig:
    recipe: str = "distil"  # distil (frozen target, agreement with the dense model) or upstream (SpaDec's)
    ratio: float = 0.5  # target share of executed layers
    start_layer: int = 2
    lam: float | None = None  # weight of the ratio term; None: the recipe's (RECIPE_LAMBDA)
    input_bits: int = 0  # robust router: input quantized to this many bits (SpaDec's 4); 0 = off
    lora_rank: int = 8  # upstream recipe: LoRA rank on q, k, v
    lora_dropout: float = 0.05
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
        if self.recipe not in RECIPES:
            raise ConfigError(f"unknown router recipe {self.recipe!r}: use {' or '.join(RECIPES)}")
        if self.lam is None:
            self.lam = RECIPE_LAMBDA[self.recipe]
        if self.recipe == "upstream" and (self.lora_rank < 1 or not 0 <= self.lora_dropout < 1):
            raise ConfigError(f"LoRA needs rank >= 1 and dropout in [0, 1), got {self.lora_rank}, {self.lora_dropout}")
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


def routed_stack(target: PreTrainedModel, routers: Routers, ids: torch.Tensor, attention_mask: torch.Tensor,
                 cfg: RouterTrainConfig, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed target's last-layer hidden states [B, T, H] (before the final norm: the features a head reads)
    and its gates [B, T, layers] (1 = executed). `sample`: Gumbel decisions (training); else the routers' argmax
    (what decoding does)."""
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
        if i < routers.config.start_layer:
            gate = torch.ones(b, t, device=ids.device, dtype=x.dtype)
        elif sample:
            gate = straight_through_gate(routers.logits(i, x).float(), cfg.tau, cfg.noise).to(x.dtype)
        else:
            gate = routers.decide(i, x).to(x.dtype)
        gate = torch.where(forced, torch.ones_like(gate), gate)
        out = routed_layer(layer, x, cos, sin, gate, allowed)
        x = gate[..., None] * out + (1 - gate[..., None]) * x
        gates.append(gate)
    return x, torch.stack(gates, -1)


def routed_forward(target: PreTrainedModel, routers: Routers, ids: torch.Tensor, attention_mask: torch.Tensor,
                   cfg: RouterTrainConfig, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [B, T, V] of the routed target and its gates [B, T, layers] (see `routed_stack`)."""
    hidden, gates = routed_stack(target, routers, ids, attention_mask, cfg, sample)
    return target.lm_head(target.model.norm(hidden)), gates


class RoutedTarget(nn.Module):
    """The target and its trainable routers, as one module for the trainer (it saves what trains). Recipe
    upstream: a peft LoRA is injected into the target's q, k, v projections (trainable, the rest frozen);
    `dense()` turns it off, for the dense model's own outputs; `release()` takes it out again."""

    def __init__(self, target: PreTrainedModel, routers: Routers, cfg: RouterTrainConfig):
        super().__init__()
        target.requires_grad_(False)
        self.lora = None
        if cfg.recipe == "upstream":
            from peft import LoraConfig, get_peft_model

            # alpha = rank: scale 1, as upstream adds B(A(x)) unscaled; "gaussian": A ~ N(0, 1/rank), B = 0
            config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_rank, lora_dropout=cfg.lora_dropout,
                                target_modules=list(LORA_MODULES), init_lora_weights="gaussian", bias="none")
            self.lora = get_peft_model(target, config)  # injects in place: `target` now runs with the LoRA
        self.target, self.routers = target, routers

    def dense(self):
        return self.lora.disable_adapter() if self.lora is not None else nullcontext()

    def release(self) -> PreTrainedModel:
        """The target as it was given (the LoRA taken out, not merged)."""
        return self.lora.unload() if self.lora is not None else self.target


def share_gap(gates: torch.Tensor, mask: torch.Tensor, ratio: float, reserve: int) -> torch.Tensor:
    """SpaDec's active loss: |share of all layers a token executed - ratio|, averaged over the positions that have
    a real next token (upstream scores activations [:, :-1] under the mask [:, 1:]), the first `reserve` left out."""
    executed = gates[:, :-1].float().mean(-1)[:, reserve:]
    counted = mask[:, 1:].float()[:, reserve:]
    return ((executed - ratio).abs() * counted).sum() / counted.sum()


def upstream_objective(logits: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                       cfg: RouterTrainConfig) -> tuple[torch.Tensor, dict]:
    """Cross-entropy on the next tokens of the data (padding ignored) + lambda * `share_gap`."""
    labels = ids[:, 1:].masked_fill(~(mask[:, 1:].bool() & mask[:, :-1].bool()), -100)
    ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    gap = share_gap(gates, mask, cfg.ratio, cfg.reserve)
    return ce + cfg.lam * gap, {"ce": ce.detach(), "ratio_gap": gap.detach()}


def router_loss(model: RoutedTarget, batch: Batch, cfg: RouterTrainConfig) -> tuple[torch.Tensor, dict]:
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logits, gates = routed_forward(model.target, model.routers, ids, mask, cfg)
    executed = gates.float().mean(-1)[mask.bool()].mean().detach()  # per token: share of all layers run
    if cfg.recipe == "upstream":
        loss, metrics = upstream_objective(logits, gates, ids, mask, cfg)
        return loss, {**metrics, "executed": executed}
    with torch.no_grad():
        dense = model.target(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
    real = mask[:, 1:].bool() & mask[:, :-1].bool()
    soft_ce = -(dense[:, :-1].exp() * logits[:, :-1].float().log_softmax(-1)).sum(-1)
    ce = soft_ce[real].mean()
    ratio_gap = (gates.float().mean(-1) - cfg.ratio).abs()[mask.bool()].mean()
    agree = (logits[:, :-1].argmax(-1) == dense[:, :-1].argmax(-1))[real].float().mean()
    return ce + cfg.lam * ratio_gap, {"ce": ce.detach(), "ratio_gap": ratio_gap.detach(), "executed": executed,
                                      "agree": agree}


def heldout_scores(routed: PreTrainedModel, routers: Routers, dense_argmax: torch.Tensor, ids: torch.Tensor,
                   mask: torch.Tensor, cfg: RouterTrainConfig) -> dict[str, float]:
    """The executed share of the routed model over held-out ids (routers deciding as at decode time) and the
    share of positions where its argmax equals the dense target's (`dense_argmax` [B, T])."""
    logits, gates = routed_forward(routed, routers, ids, mask, cfg, sample=False)
    real = mask[:, 1:].bool()
    agree = (logits[:, :-1].argmax(-1) == dense_argmax[:, :-1])[real].float().mean()
    return {"executed": float(gates.float().mean(-1)[mask.bool()].mean()), "agreement": float(agree)}


class RouterEval:
    """Held-out: the executed share and the agreement of the routed target's argmax (routers deciding as at
    decode time, with the LoRA where the recipe trains one) with the dense target's (without it)."""

    def __init__(self, data: TokenChunks, cfg: RouterTrainConfig):
        self.data, self.cfg = data, cfg

    @torch.no_grad()
    def __call__(self, model: RoutedTarget) -> dict[str, float]:
        device = next(model.routers.parameters()).device
        ids, mask = self.data.input_ids.to(device), self.data.attention_mask.to(device)
        with model.dense():
            dense = model.target(input_ids=ids, attention_mask=mask).logits.argmax(-1)
        return heldout_scores(model.target, model.routers, dense, ids, mask, self.cfg)


@torch.no_grad()
def calibrate_share(target: PreTrainedModel, routers: Routers, heldout: TokenChunks, share: float,
                    iterations: int = 24) -> dict[str, float]:
    """Set `routers.config.margin` so that the routed model executes `share` of all layers over the held-out
    text (bisection: a higher margin skips more), for comparing routers of different trainings at one share.
    Returns the margin and the held-out scores at it."""
    floor = routers.config.start_layer / routers.num_layers
    if not floor < share <= 1:
        raise ConfigError(f"a share must be in ({floor:.2f}, 1]: the first {routers.config.start_layer} of "
                          f"{routers.num_layers} layers always run")
    cfg = RouterTrainConfig()  # as training's held-out evaluation counts (its reserved first positions run)
    device = next(routers.parameters()).device
    ids, mask = heldout.input_ids.to(device), heldout.attention_mask.to(device)
    dense = target(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    routed = routers.routed_model(target)

    def scores(margin: float) -> dict[str, float]:
        routers.config.margin = margin
        return heldout_scores(routed, routers, dense, ids, mask, cfg)

    low, high = -32.0, 32.0  # logit differences beyond these execute (skip) every token
    for _ in range(iterations):
        middle = (low + high) / 2
        low, high = (middle, high) if scores(middle)["executed"] > share else (low, middle)
    best = min((low, high), key=lambda m: abs(scores(m)["executed"] - share))
    return {"share": share, "margin": best, **scores(best)}


def train_routers(target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: RouterTrainConfig,
                  train: TrainConfig) -> tuple[Routers, dict]:
    """Train routers for `target` on corpus text and save them in train.out_dir (`--drafter layerskip:DIR`,
    `--lossy-sparse-verify --routers DIR`); recipe upstream saves its LoRA there too. `target` is left as given."""
    started = time.perf_counter()
    config = RouterConfig(hidden_size=target.config.hidden_size, num_layers=target.config.num_hidden_layers,
                          start_layer=cfg.start_layer, target_ratio=cfg.ratio, input_bits=cfg.input_bits,
                          recipe=cfg.recipe)
    trainer = Trainer(train, task=cfg)  # seeds first: the routers' (and the LoRA's) initialisation is reproducible
    routers = Routers(config).to(target.dtype)
    docs = shuffled(load_corpus(cfg.corpus, split="train", heldout_percent=cfg.heldout_percent), train.seed)
    data = TokenChunks(docs, tokenizer, cfg.seq_len, max_chunks=cfg.sequences)
    heldout_docs = load_corpus(cfg.corpus, split="heldout", heldout_percent=cfg.heldout_percent)
    heldout = TokenChunks(heldout_docs, tokenizer, cfg.seq_len, max_chunks=cfg.heldout_sequences)
    model = RoutedTarget(target, routers, cfg)
    try:
        result = trainer.fit(model, data, lambda m, b: router_loss(m, b, cfg), RouterEval(heldout, cfg))
        config.training = {"command": shlex.join(["draftsmith", *sys.argv[1:]]), **cfg.extra,
                           "corpus": cfg.corpus or "python stdlib", "steps": result.step, "heldout": result.eval,
                           "train_sequences": len(data), "seq_len": cfg.seq_len, "lam": cfg.lam,
                           "train_seconds": round(time.perf_counter() - started, 1)}
        if cfg.recipe == "upstream":
            config.training["lora"] = {"rank": cfg.lora_rank, "modules": list(LORA_MODULES), "dropout": cfg.lora_dropout}
        if trainer.is_main_process:
            save_routers(routers, train.out_dir)
            if model.lora is not None:  # adapter_config.json + adapter_model.safetensors
                model.lora.save_pretrained(str(train.out_dir))
                routers.adapter = train.out_dir
    finally:
        model.release()
    return routers, config.training
