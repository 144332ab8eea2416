"""Feature heads: small networks that draft from the target's own last-layer features (EAGLE-style, Medusa, CTC).

Both read the target's features (its last layer's hidden states, before the final norm) and decode through the
target's FROZEN final norm and output head, optionally restricted to a reduced draft vocabulary (the most
frequent target tokens of the training data): on a 135M target the 49k-row output head is a large share of a
draft step. The frozen parts are never stored with a head; `TargetParts` takes them from the target at load.

- EAGLE-style: fc(concat(feature_t, embed(token_t+1))) -> one Llama decoder layer -> predicted feature_t+1.
  Run autoregressively (over a draft tree) with its own small KV cache.
- Medusa: K residual blocks on feature_t; block j predicts token t+j+2 in one shot.
- CTC (the CTC drafter, arXiv 2412.00061): the EAGLE-style head, plus F "frames" per step. Frame f runs the
  same decoder layer on fc(concat(frame f-1's output, a learned frame embedding)), frame 0 reading the newest
  pair's predicted feature: a chain in feature space that feeds back no token (so none has to be chosen, nor a
  blank fed), each frame attending to the committed pairs and the frames before it. Frames decode through the
  frozen norm and output rows plus one blank logit, and are trained with a CTC loss against the target's next
  L tokens, so a step's frames spell several future tokens with blanks and repeats, collapsed CTC-style.
  With `ctc_feed`, frame f also reads the embedding of frame f-1's best entry (a token, or a learned blank
  embedding), the same at training and decode time: the frames see the tokens their best alignment has spelled.
  With `ctc_frames_from = "upstream"`, the frames are those of the CTC drafter's own code instead: a step's
  frames are the head's own consecutive outputs (teacher-forced pair outputs at t..t+F-1 in training; at decode
  time the anchor's output, then the head's chain fed its best entries), and the blank is a vocabulary token
  (`ctc_blank_token`, upstream's id 0), whose output row gives the blank logit and which is never drafted.
- EAGLE-3 (arXiv 2503.01840), in the layout vLLM, SGLang and llama.cpp load: the target's residual stream
  entering three of its layers (low, middle, high), concatenated and fused by one projection (3H -> H); one
  decoder layer whose attention reads [normed embedding of token_t+1 ; normed fused feature] (2H) with the
  feature as its residual; its own final norm and output head over the reduced draft vocabulary. Later draft
  steps read the layer's own output (H) in place of the fused feature. Trained with cross-entropy only.

A head folder holds `head.json` (HeadConfig) and `head.safetensors`; nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from draftsmith.errors import ConfigError, IncompatibleDrafterError, ModelLoadError

CONFIG_FILE, WEIGHTS_FILE = "head.json", "head.safetensors"
HeadKind = Literal["eagle", "medusa", "ctc", "eagle3"]
HEAD_KINDS = ("eagle", "medusa", "ctc", "eagle3")
CTC_FRAME_SOURCES = ("chain", "upstream")  # ours, and the CTC drafter's own code (HeadConfig.ctc_frames_from)


@dataclass
class HeadConfig:
    kind: HeadKind
    hidden_size: int  # the target's
    vocab_size: int  # the target's output rows
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 64
    intermediate_size: int = 1536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 8192
    draft_vocab: int = 0  # rows of the reduced draft vocabulary; 0 = the target's whole vocabulary
    medusa_heads: int = 4
    # Medusa's static tree: paths of per-head top-k ranks, chosen from held-out accuracy by the training command
    medusa_paths: list[list[int]] = field(default_factory=list)
    ctc_frames: int = 6  # CTC: frames per step (upstream: 6 frames for 3 labels)
    ctc_labels: int = 3  # CTC: future tokens the frames are trained to spell out
    ctc_feed: bool = False  # CTC: each frame reads the embedding of the previous frame's best entry
    feature_layers: list[int] = field(default_factory=list)  # EAGLE-3: the target layers whose inputs it reads
    target_layers: int = 0  # EAGLE-3: the target's layer count (0: not recorded)
    ctc_frames_from: str = "chain"  # CTC: "chain" (ours: a side chain of frames) or "upstream" (the head's outputs)
    ctc_blank_token: int = 0  # CTC, upstream frames: the target token that stands for the blank
    target: str = ""  # what it was trained for (informational; compatibility is checked on shapes)
    training: dict = field(default_factory=dict)  # command, data, wall time: how it was made

    @classmethod
    def for_target(cls, kind: HeadKind, model: PreTrainedModel, **overrides) -> HeadConfig:
        cfg = model.config
        heads = cfg.num_attention_heads
        return cls(
            kind=kind, hidden_size=cfg.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0],
            num_attention_heads=heads, num_key_value_heads=getattr(cfg, "num_key_value_heads", heads),
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            intermediate_size=cfg.intermediate_size, rms_norm_eps=getattr(cfg, "rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(cfg), max_position_embeddings=cfg.max_position_embeddings, **overrides,
        )

    def layer_config(self) -> LlamaConfig:
        config = LlamaConfig(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size, num_hidden_layers=1,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
            vocab_size=self.vocab_size, rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        config._attn_implementation = "sdpa"
        return config


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    if isinstance(params.get("full_attention"), dict):  # per-layer-type parameters (Gemma 3)
        return float(params["full_attention"].get("rope_theta", 10000.0))
    return float(getattr(config, "rope_theta", 10000.0))


class EagleHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden)
        layer_config = config.layer_config()
        self.layer = LlamaDecoderLayer(layer_config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(layer_config)
        self.register_buffer("draft_to_target", torch.arange(config.draft_vocab or config.vocab_size))

    def forward(
        self, features: torch.Tensor, token_embeds: torch.Tensor, positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None, cache=None,
    ) -> torch.Tensor:
        """Predicted next features [B, T, H] for pairs (feature_t, embedding of token_t+1) at `positions` (the
        positions of tokens t+1). Without a mask the T pairs attend causally (training)."""
        return self.decode(self.fc(torch.cat([features, token_embeds], dim=-1)), positions, attention_mask, cache)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor | None = None,
               cache=None) -> torch.Tensor:
        """The decoder layer over fused inputs x [B, T, H] at `positions`."""
        rope = self.rotary(x, positions)
        return self.layer(x, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                          use_cache=cache is not None, position_embeddings=rope)


def default_feature_layers(layers: int) -> list[int]:
    """EAGLE-3's low, middle and high layers of an L-layer target: 2, L/2, L-3 (what vLLM and llama.cpp assume
    when a checkpoint names none)."""
    return [2, layers // 2, layers - 3]


class Eagle3Head(nn.Module):
    """EAGLE-3's draft layer, named as the engines name its parts (see export.py)."""

    def __init__(self, config: HeadConfig):
        super().__init__()
        if len(config.feature_layers) != 3 or sorted(set(config.feature_layers)) != list(config.feature_layers):
            raise ConfigError(f"an EAGLE-3 head reads 3 distinct target layers in ascending order, got "
                              f"{config.feature_layers}")
        self.config = config
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        layer_config = config.layer_config()
        self.layer = LlamaDecoderLayer(layer_config, layer_idx=0)
        attention = self.layer.self_attn
        for name in ("q_proj", "k_proj", "v_proj"):  # queries, keys and values read [embedding ; feature]
            setattr(attention, name, nn.Linear(2 * hidden, getattr(attention, name).out_features, bias=False))
        self.hidden_norm = LlamaRMSNorm(hidden, eps=eps)
        self.rotary = LlamaRotaryEmbedding(layer_config)
        self.norm = LlamaRMSNorm(hidden, eps=eps)
        rows = config.draft_vocab or config.vocab_size
        self.lm_head = nn.Linear(hidden, rows, bias=False)
        self.register_buffer("draft_to_target", torch.arange(rows))

    def forward(
        self, features: torch.Tensor, token_embeds: torch.Tensor, positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None, cache=None,
    ) -> torch.Tensor:
        """The layer's outputs [B, T, H] for pairs (feature_t, embedding of token_t+1) at `positions`: a feature
        is the target's three layers [.., 3H], fused here, or the head's own earlier output [.., H]."""
        hidden = self.fc(features) if features.shape[-1] != self.config.hidden_size else features
        rope = self.rotary(hidden, positions)
        pair = torch.cat([self.layer.input_layernorm(token_embeds), self.hidden_norm(hidden)], dim=-1)
        attended, _ = self.layer.self_attn(hidden_states=pair, position_embeddings=rope, attention_mask=attention_mask,
                                           past_key_values=cache)
        hidden = hidden + attended
        return hidden + self.layer.mlp(self.layer.post_attention_layernorm(hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of the layer's outputs (its own norm and output head)."""
        return self.lm_head(self.norm(hidden))

    @torch.no_grad()
    def init_from_target(self, target: PreTrainedModel) -> None:
        """Start the norm and output head as the target's (its rows of the draft vocabulary)."""
        self.norm.weight.copy_(target.base_model.norm.weight.float())
        rows = target.get_output_embeddings().weight
        self.lm_head.weight.copy_(rows[self.draft_to_target.to(rows.device)].float())


class CtcHead(EagleHead):
    """The EAGLE-style head plus F frames per step and a blank logit (the CTC drafter)."""

    def __init__(self, config: HeadConfig):
        super().__init__(config)
        if config.ctc_frames < 1 or config.ctc_labels < 1:
            raise ConfigError(f"a CTC head needs frames >= 1 and labels >= 1, got {config.ctc_frames} and "
                              f"{config.ctc_labels}")
        if config.ctc_frames_from not in CTC_FRAME_SOURCES:
            raise ConfigError(f"CTC frames come from one of {', '.join(CTC_FRAME_SOURCES)}, got "
                              f"'{config.ctc_frames_from}'")
        hidden = config.hidden_size
        self.upstream = config.ctc_frames_from == "upstream"
        if self.upstream:  # frames are the head's own outputs and the blank a token: no parameters of their own
            return
        # frame f's stand-in for the next token's embedding, which a frame does not have
        self.frame_embeddings = nn.Parameter(torch.randn(config.ctc_frames, hidden) * 0.02)
        # the blank's logit: one more output row over the normed frame state (the real rows stay the target's)
        self.blank_weight = nn.Parameter(torch.zeros(hidden))
        self.blank_bias = nn.Parameter(torch.zeros(()))
        if config.ctc_feed:  # what a frame reads when the frame before it was best as a blank
            self.blank_embedding = nn.Parameter(torch.zeros(hidden))

    def blank_row(self) -> int:
        """Upstream frames: the draft-vocabulary row of the blank token."""
        rows = (self.draft_to_target == self.config.ctc_blank_token).nonzero()
        if not len(rows):
            raise ConfigError(f"the CTC blank token {self.config.ctc_blank_token} is not in the head's draft vocabulary")
        return int(rows[0])

    def frame_logits(self, normed: torch.Tensor, parts: TargetParts) -> torch.Tensor:
        """[..., draft vocabulary + 1] logits of normed frame states, the blank last. Upstream frames: the blank
        token's own row moves to the blank's place (its token slot can never win)."""
        logits = F.linear(normed, parts.head_rows)
        if not self.upstream:
            return torch.cat([logits, self.blank_logit(normed)], dim=-1)
        row = self.blank_row()
        blank = logits[..., row : row + 1]
        # a finite floor, not -inf: CTC's backward turns a -inf log-probability into NaN gradients
        floor = torch.tensor([row], device=logits.device)
        return torch.cat([logits.index_fill(-1, floor, -1e4), blank], -1)

    def frame_input(self, previous: torch.Tensor, frame: int, fed: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H]: frame `frame`'s fused input, from the previous frame's output (frame 0: the pair's) and,
        for a feeding head, `fed`, the embedding of the previous frame's best entry (frame 0: none)."""
        slot = self.frame_embeddings[frame].to(previous.dtype).expand_as(previous)
        if fed is not None:
            slot = slot + fed
        return self.fc(torch.cat([previous, slot], dim=-1))

    def entry_embeddings(self, entries: torch.Tensor, parts: TargetParts) -> torch.Tensor:
        """[..., H] what the next frame reads for these best entries (draft-vocabulary ids, the blank one past
        them): the token's embedding, or the learned blank embedding."""
        is_blank = entries == len(parts.draft_to_target)
        if self.upstream:  # the blank is a token: its own embedding
            return parts.embed_tokens(parts.to_target_ids(entries.masked_fill(is_blank, self.blank_row())))
        embeds = parts.embed_tokens(parts.to_target_ids(entries.masked_fill(is_blank, 0)))
        return torch.where(is_blank[..., None], self.blank_embedding.to(embeds.dtype), embeds)

    def blank_logit(self, normed: torch.Tensor) -> torch.Tensor:
        """[..., 1] blank logits of normed frame states."""
        return (normed @ self.blank_weight.to(normed.dtype) + self.blank_bias.to(normed.dtype))[..., None]


class MedusaHeads(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.blocks = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(config.medusa_heads))
        for block in self.blocks:  # start as the identity: head j begins by predicting what the target does
            nn.init.zeros_(block.weight)
            nn.init.zeros_(block.bias)
        self.register_buffer("draft_to_target", torch.arange(config.draft_vocab or config.vocab_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[K, ..., H]: head j's feature, whose logits predict the token j + 2 positions after the feature's."""
        return torch.stack([features + F.silu(block(features)) for block in self.blocks])


class TargetParts(nn.Module):
    """The target's frozen embedding, final norm and output head rows (the draft vocabulary's), shared by heads."""

    def __init__(self, target: PreTrainedModel, draft_to_target: torch.Tensor, dtype: torch.dtype | None = None):
        """`dtype`: the head's dtype, when it differs from the target's (fp32 training; fp32 drafting on CPUs,
        where small bf16 products are slow): the norm and the head rows are copied into it, the (large)
        embedding stays shared and only the rows looked up are cast."""
        super().__init__()
        self.dtype = dtype or target.dtype
        self.embed = target.get_input_embeddings()
        self.norm = target.base_model.norm
        if self.dtype != target.dtype:
            self.norm = copy.deepcopy(self.norm).to(self.dtype)
        rows = target.get_output_embeddings().weight.detach()
        full = len(draft_to_target) == rows.shape[0] and bool((draft_to_target == torch.arange(rows.shape[0], device=draft_to_target.device)).all())
        self.head_rows = rows.to(self.dtype) if full else rows[draft_to_target.to(rows.device)].to(self.dtype)
        self.draft_to_target = draft_to_target.to(rows.device)
        self.full_vocab = full
        for param in self.parameters():
            param.requires_grad_(False)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).to(self.dtype)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of (predicted) features."""
        return F.linear(self.norm(features), self.head_rows)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids if self.full_vocab else self.draft_to_target[draft_ids]


def build_head(config: HeadConfig) -> EagleHead | MedusaHeads | Eagle3Head:
    if config.kind not in HEAD_KINDS:
        raise ConfigError(f"unknown head kind {config.kind!r}: use {', '.join(HEAD_KINDS)}")
    return {"eagle": EagleHead, "medusa": MedusaHeads, "ctc": CtcHead, "eagle3": Eagle3Head}[config.kind](config)


def save_head(head: EagleHead | MedusaHeads | Eagle3Head, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().contiguous().cpu() for name, tensor in head.state_dict().items()}
    save_file(weights, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(asdict(head.config), indent=1))


def head_dtype(target: PreTrainedModel, kind: HeadKind) -> torch.dtype:
    """The dtype a head drafts in: the target's. An EAGLE (or CTC) head drafts through the lean forward, whose
    packed products are fastest in bf16 (docs/design/backends.md). Medusa's blocks go through F.linear, which on CPUs runs small bf16/fp16
    products several times slower than fp32 ones: there it stays fp32."""
    if kind == "medusa" and target.device.type == "cpu":
        return torch.float32
    return target.dtype


def load_head(folder: str | Path, target: PreTrainedModel | None = None) -> EagleHead | MedusaHeads | Eagle3Head:
    """Load a head folder; with `target`, refuse a head trained for another hidden size or vocabulary."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"{folder} is not a head folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE} "
                             "(written by `draftsmith train heads`)")
    config = HeadConfig(**json.loads(config_path.read_text()))
    if target is not None:
        rows, layers = target.get_output_embeddings().weight.shape[0], target.config.num_hidden_layers
        head_layers = config.target_layers or layers  # a head that does not record it reads no middle layers
        if (config.hidden_size, config.vocab_size, head_layers) != (target.config.hidden_size, rows, layers):
            raise IncompatibleDrafterError(
                f"the head in {folder} was trained for a target with hidden size {config.hidden_size}, "
                f"{head_layers} layers and {config.vocab_size} output rows ({config.target or 'unknown'}); this "
                f"target has hidden size {target.config.hidden_size}, {layers} layers and {rows} output rows"
            )
    head = build_head(config)
    head.load_state_dict(load_file(str(weights_path)))
    if target is not None:
        head.to(device=target.device, dtype=head_dtype(target, config.kind))
    return head.eval()
