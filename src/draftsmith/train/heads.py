"""Train feature heads (EAGLE-style, Medusa) on precomputed target features, with the project's one trainer.

Losses, per real position, as in the papers:
- EAGLE: SmoothL1 between the predicted and the target's next feature (in units of the features' RMS) plus
  w_ce * soft cross-entropy between the target's next-token distribution and the head's (both over the draft
  vocabulary, through the target's frozen norm and output head). Training inputs get Gaussian noise, since at
  decode time the head reads its own (imperfect) predicted features after the first level. With `unroll` > 1
  the head is also trained as it drafts (EAGLE-3's training-time test): step d reads its own step d-1
  prediction, attending to the true pairs up to its anchor and its own earlier steps there, exactly the
  attention of a depth-d tree node at decode time; step d's loss weighs 0.8^(d-1).
- Medusa: head j's soft cross-entropy against the target's distribution j + 1 positions ahead, heads
  weighted 0.8^j (later heads are harder and matter less: a path dies at its first miss).
Held-out evaluation reports top-1 agreement with the target; for Medusa also each head's top-k accuracy, from
which the static tree is chosen (the paths of highest estimated acceptance probability).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from draftsmith.errors import ConfigError
from draftsmith.heads import EagleHead, HeadConfig, HeadKind, MedusaHeads, TargetParts, build_head, save_head
from draftsmith.train.features import FeatureShards
from draftsmith.train.trainer import Batch, TrainConfig, Trainer

TOP_RANKS = 10  # Medusa: ranks whose accuracy is measured per head, the tree's branching limit


@dataclass
class HeadTrainConfig:
    kind: HeadKind = "eagle"
    draft_vocab: int = 8192  # most frequent training tokens the head drafts from; 0 = the whole vocabulary
    medusa_heads: int = 4
    medusa_tree_nodes: int = 32  # nodes of the static tree chosen from held-out accuracy
    w_regression: float = 1.0
    w_ce: float = 0.1
    noise: float = 0.1  # std of Gaussian input noise, in units of the features' RMS
    unroll: int = 1  # training-time test: steps the head is trained on its own predictions (1 = EAGLE-1)
    eval_unroll: int = 3  # held-out agreement is reported for this many drafting steps
    eval_sequences: int = 64
    extra: dict = field(default_factory=dict)  # recorded in the head's config (command, data, ...)

    def __post_init__(self) -> None:
        if self.kind not in ("eagle", "medusa"):
            raise ConfigError(f"head kind must be eagle or medusa, got {self.kind!r}")
        if self.draft_vocab < 0 or self.medusa_heads < 1 or self.medusa_tree_nodes < 1:
            raise ConfigError("draft_vocab >= 0, medusa_heads >= 1 and medusa_tree_nodes >= 1 are required")
        if self.unroll < 1 or self.eval_unroll < 1:
            raise ConfigError(f"unroll and eval_unroll must be >= 1, got {self.unroll} and {self.eval_unroll}")


class HeadWithTarget(nn.Module):
    """What the trainer optimises: the head, next to the target's frozen parts (not trained, not saved)."""

    def __init__(self, head: EagleHead | MedusaHeads, parts: TargetParts, feature_scale: float):
        super().__init__()
        self.head, self.parts, self.feature_scale = head, parts, feature_scale

    def target_probs(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.parts.logits(features).float().softmax(-1)


def unrolled_mask(anchors: int, step: int, device: torch.device) -> torch.Tensor:
    """[anchors, step * anchors] bool: at step d (1-based) the query of anchor a sees step 1's keys of anchors
    0..a (the true pairs) and its own keys of steps 2..d (the draft path above that anchor)."""
    eye = torch.eye(anchors, dtype=torch.bool, device=device)
    causal = torch.ones(anchors, anchors, dtype=torch.bool, device=device).tril()
    return torch.cat([causal] + [eye] * (step - 1), dim=1)


def unrolled_features(head: EagleHead, parts: TargetParts, ids: torch.Tensor, inputs: torch.Tensor, steps: int
                      ) -> list[torch.Tensor]:
    """The head's predicted features [B, T-1, H] for drafting steps 1..steps. Step 1: pair a = (feature a,
    token a+1) at position a+1 predicts feature a+1. Step d: anchor a reads its step d-1 prediction with
    token a+d at position a+d and predicts feature a+d (the last anchors' rows, past the data, are padding)."""
    length = ids.shape[1] - 1
    positions = torch.arange(1, ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    cache = DynamicCache() if steps > 1 else None
    outputs = []
    for step in range(1, min(steps, length) + 1):
        mask = None if step == 1 else unrolled_mask(length, step, ids.device)[None, None]
        tokens = F.pad(ids[:, step : step + length], (0, step - 1))
        inputs = head(inputs, parts.embed_tokens(tokens), positions + step - 1, mask, cache)
        outputs.append(inputs)
    return outputs


def eagle_loss(model: HeadWithTarget, batch: Batch, cfg: HeadTrainConfig, unroll: int | None = None
               ) -> tuple[torch.Tensor, dict]:
    ids, features = batch["input_ids"], batch["features"]
    inputs = features[:, :-1]
    if model.training and cfg.noise:
        inputs = inputs + torch.randn_like(inputs) * cfg.noise * model.feature_scale
    total, metrics = features.new_zeros(()), {}
    for step, predicted in enumerate(unrolled_features(model.head, model.parts, ids, inputs, unroll or cfg.unroll), 1):
        span = ids.shape[1] - step  # anchors whose target feature a + step exists
        following = features[:, step : step + span]
        regression = F.smooth_l1_loss(predicted[:, :span] / model.feature_scale, following / model.feature_scale)
        p = model.target_probs(following)
        log_q = model.parts.logits(predicted[:, :span]).float().log_softmax(-1)
        ce = -(p * log_q).sum(-1).mean()
        total = total + 0.8 ** (step - 1) * (cfg.w_regression * regression + cfg.w_ce * ce)
        suffix = "" if step == 1 else f"_step{step}"
        metrics.update({f"regression{suffix}": regression.detach(), f"ce{suffix}": ce.detach(),
                        f"top1{suffix}": (log_q.argmax(-1) == p.argmax(-1)).float().mean()})
    return total, metrics


def medusa_loss(model: HeadWithTarget, batch: Batch, cfg: HeadTrainConfig) -> tuple[torch.Tensor, dict]:
    features = batch["features"]
    outputs = model.head(features)  # [K, B, T, H]
    total, metrics = features.new_zeros(()), {}
    for j, out in enumerate(outputs):
        span = features.shape[1] - j - 1  # head j at t predicts from the target's distribution at t + j + 1
        if span < 1:
            break
        p = model.target_probs(features[:, j + 1 :])
        log_q = model.parts.logits(out[:, :span]).float().log_softmax(-1)
        ce = -(p * log_q).sum(-1).mean()
        total = total + 0.8**j * ce
        metrics[f"ce{j}"] = ce.detach()
        metrics[f"top1_head{j}"] = (log_q.argmax(-1) == p.argmax(-1)).float().mean()
    return total, metrics


@torch.no_grad()
def rank_accuracy(model: HeadWithTarget, data: FeatureShards, batch_size: int = 16) -> torch.Tensor:
    """Medusa: [heads, TOP_RANKS] share of held-out positions where the target's argmax is head j's rank r."""
    k = model.head.config.medusa_heads
    hits, count = torch.zeros(k, TOP_RANKS), torch.zeros(k)
    device = next(model.head.parameters()).device
    for start in range(0, len(data), batch_size):
        features = data.features[start : start + batch_size].to(device, torch.float32)
        for j, out in enumerate(model.head(features)):
            span = features.shape[1] - j - 1
            want = model.parts.logits(features[:, j + 1 :]).argmax(-1)
            ranked = model.parts.logits(out[:, :span]).topk(TOP_RANKS, dim=-1).indices
            hits[j] += (ranked == want[..., None]).flatten(0, 1).float().sum(0).cpu()
            count[j] += want.numel()
    return hits / count[:, None]


def static_tree(accuracy: torch.Tensor, nodes: int) -> list[list[int]]:
    """The `nodes` paths (prefix-closed, each a list of per-depth ranks) of highest estimated acceptance
    probability, the product of the per-head rank accuracies along the path (Medusa's independence estimate)."""
    heads, ranks = accuracy.shape
    frontier = [(-float(accuracy[0, r]), [r]) for r in range(ranks)]
    heapq.heapify(frontier)
    chosen: list[list[int]] = []
    while frontier and len(chosen) < nodes:
        negative, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < heads:
            for r in range(ranks):
                heapq.heappush(frontier, (negative * float(accuracy[len(path), r]), path + [r]))
    return sorted(chosen, key=lambda p: (len(p), p))


class HeldoutAgreement:
    def __init__(self, data: FeatureShards, cfg: HeadTrainConfig):
        self.data, self.cfg = data, cfg

    def __call__(self, model: HeadWithTarget) -> dict[str, float]:
        device = next(model.head.parameters()).device
        sums: dict[str, float] = {}
        batches = 0
        for start in range(0, len(self.data), 16):
            batch = {"input_ids": self.data.ids[start : start + 16].to(device),
                     "features": self.data.features[start : start + 16].to(device, torch.float32)}
            _, metrics = (eagle_loss(model, batch, self.cfg, unroll=self.cfg.eval_unroll) if self.cfg.kind == "eagle"
                          else medusa_loss(model, batch, self.cfg))
            for name, value in metrics.items():
                if name.startswith("top1"):
                    sums[name] = sums.get(name, 0.0) + float(value)
            batches += 1
        return {name: value / batches for name, value in sums.items()}


def draft_vocabulary(data: FeatureShards, vocab_size: int, size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent target tokens of the training data (ascending ids) and their share of it."""
    counts = data.token_counts(vocab_size)
    if size == 0 or size >= vocab_size:
        return torch.arange(vocab_size), 1.0
    top = counts.topk(size).indices.sort().values
    return top, float(counts[top].sum() / counts.sum())


def train_head(
    target: PreTrainedModel, shards: Path | list[Path], cfg: HeadTrainConfig, train: TrainConfig,
    target_name: str = "",
) -> tuple[EagleHead | MedusaHeads, dict]:
    """Train a head on the training shards of every folder in `shards` (held out: the first folder's) and save
    it (with its config) in train.out_dir."""
    started = time.perf_counter()
    trainer = Trainer(train)  # seeds first: the head's initialisation is reproducible
    folders = shards if isinstance(shards, list) else [shards]
    data, heldout = FeatureShards(folders, "train"), FeatureShards(folders[0], "heldout")
    rows = target.get_output_embeddings().weight.shape[0]
    draft_ids, coverage = draft_vocabulary(data, rows, cfg.draft_vocab)
    config = HeadConfig.for_target(cfg.kind, target, draft_vocab=len(draft_ids) if cfg.draft_vocab else 0,
                                   medusa_heads=cfg.medusa_heads, target=target_name)
    head = build_head(config)
    head.draft_to_target.copy_(draft_ids)
    parts = TargetParts(target, head.draft_to_target, dtype=torch.float32)  # frozen parts in fp32, like the head
    scale = float(data.features[: min(len(data), 256)].float().pow(2).mean().sqrt())
    model = HeadWithTarget(head, parts, scale)
    loss = eagle_loss if cfg.kind == "eagle" else medusa_loss
    evaluate = HeldoutAgreement(heldout, cfg)
    result = trainer.fit(model, data, lambda m, b: loss(m, b, cfg), evaluate)
    if cfg.kind == "medusa":
        accuracy = rank_accuracy(model, heldout)
        config.medusa_paths = static_tree(accuracy, cfg.medusa_tree_nodes)
        cfg.extra["medusa_rank_accuracy"] = [[round(float(a), 4) for a in row] for row in accuracy]
    config.training = {**cfg.extra, "draft_vocab_coverage": round(coverage, 4), "steps": result.step,
                       "heldout": result.eval, "train_seconds": round(time.perf_counter() - started, 1),
                       "train_sequences": len(data), "seq_len": int(data.ids.shape[1])}
    head.config = config
    if trainer.is_main_process:
        save_head(head, train.out_dir)
    return head, config.training
