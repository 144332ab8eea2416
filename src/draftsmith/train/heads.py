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
- CTC: EAGLE's regression and soft cross-entropy on the pairs, plus w_ctc * CTC loss of each anchor's F frames
  (a chain in feature space from the pair's output, each frame attending to the pairs up to its anchor and the
  anchor's frames up to itself, as at decode time) against
  the target's next L argmax tokens, with a blank that is one past the draft vocabulary, never a real token.
  Upstream's weights by default: regression 1, cross-entropy 0.1, CTC 0.01. With `ctc_feed` each frame also
  reads the embedding of the frame before's best entry, chosen free-running from the head's own frames (as at
  decode time, so training sees what drafting will: no teacher-forced alignment to mismatch).
  With upstream frames (`ctc_frames_from = "upstream"`, the CTC drafter's own training), anchor t's frames are
  the head's teacher-forced pair outputs at t..t+F-1, the labels the same target tokens, the blank a token.
Held-out evaluation reports top-1 agreement with the target; for Medusa also each head's top-k accuracy, from
which the static tree is chosen (the paths of highest estimated acceptance probability).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from draftsmith.errors import ConfigError
from draftsmith.draft import common_prefix
from draftsmith.drafters.ctc import ctc_collapse
from draftsmith.heads import (CTC_FRAME_SOURCES, HEAD_KINDS, CtcHead, Eagle3Head, EagleHead, HeadConfig, HeadKind, MedusaHeads,
                              TargetParts, build_head, default_feature_layers, load_head, save_head)
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
    w_ctc: float = 0.01  # CTC: weight of the CTC term (upstream's)
    ctc_labels: int = 3  # CTC: future tokens the frames spell out
    ctc_frames: int = 0  # CTC: frames per step; 0 = 2 x ctc_labels (upstream: 6 frames for 3 labels)
    ctc_feed: bool = False  # CTC: each frame reads the embedding of the previous frame's best entry
    feature_layers: list[int] = field(default_factory=list)  # EAGLE-3: target layers read; [] = 2, L/2, L-3
    ctc_frames_from: str = "chain"  # CTC: "chain" (ours) or "upstream" (the head's own consecutive outputs)
    eval_unroll: int = 3  # held-out agreement is reported for this many drafting steps
    eval_sequences: int = 64
    init_from: str | None = None  # a trained head folder to fine-tune (its shape and draft vocabulary kept)
    extra: dict = field(default_factory=dict)  # recorded in the head's config (command, data, ...)

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConfigError(f"head kind must be one of {', '.join(HEAD_KINDS)}, got {self.kind!r}")
        self.ctc_frames = self.ctc_frames or 2 * self.ctc_labels
        if self.ctc_labels < 1 or self.ctc_frames < self.ctc_labels:
            raise ConfigError(f"CTC needs labels >= 1 and at least as many frames as labels, got {self.ctc_labels} "
                              f"labels and {self.ctc_frames} frames")
        if self.ctc_frames_from not in CTC_FRAME_SOURCES:
            raise ConfigError(f"--ctc-frames must be one of {', '.join(CTC_FRAME_SOURCES)}, got '{self.ctc_frames_from}'")
        if self.ctc_feed and self.ctc_frames_from == "upstream":
            raise ConfigError("--ctc-feed is for chain frames: upstream frames are always fed the head's best entries")
        if min(self.w_regression, self.w_ce, self.w_ctc) < 0:
            raise ConfigError("loss weights must be >= 0")
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
    """EAGLE's losses; an EAGLE-3 head (a batch with the target's three layers) reads those and is trained on
    the cross-entropy alone, through its own norm and output head: its layer's output is no target feature."""
    ids, features = batch["input_ids"], batch["features"]
    eagle3 = isinstance(model.head, Eagle3Head)
    inputs = (batch["aux_features"] if eagle3 else features)[:, :-1]
    if model.training and cfg.noise:
        inputs = inputs + torch.randn_like(inputs) * cfg.noise * model.feature_scale
    logits = model.head.logits if eagle3 else model.parts.logits
    total, metrics = features.new_zeros(()), {}
    for step, predicted in enumerate(unrolled_features(model.head, model.parts, ids, inputs, unroll or cfg.unroll), 1):
        span = ids.shape[1] - step  # anchors whose target feature a + step exists
        following = features[:, step : step + span]
        p = model.target_probs(following)
        log_q = logits(predicted[:, :span]).float().log_softmax(-1)
        ce = -(p * log_q).sum(-1).mean()
        suffix = "" if step == 1 else f"_step{step}"
        if eagle3:
            total = total + 0.8 ** (step - 1) * ce
        else:
            regression = F.smooth_l1_loss(predicted[:, :span] / model.feature_scale, following / model.feature_scale)
            total = total + 0.8 ** (step - 1) * (cfg.w_regression * regression + cfg.w_ce * ce)
            metrics[f"regression{suffix}"] = regression.detach()
        metrics.update({f"ce{suffix}": ce.detach(), f"top1{suffix}": (log_q.argmax(-1) == p.argmax(-1)).float().mean()})
    return total, metrics


def ctc_frame_log_probs(head: CtcHead, parts: TargetParts, predicted: torch.Tensor, positions: torch.Tensor, cache
                        ) -> torch.Tensor:
    """[F, B, pairs, draft vocabulary + 1] log-probabilities of every pair's frames. predicted: [B, pairs, H] the
    pairs' outputs over a cache holding the pairs. Frame f of anchor a sits at position a + 2 + f and sees the
    pairs up to a and the anchor's frames up to itself: a depth-(f + 2) step of `unrolled_mask`, the attention
    the drafter's frames have at decode time. A feeding head's frame f also reads the embedding of frame f-1's
    best entry, chosen from its own logits as at decode time (no gradient flows through the choice)."""
    previous, fed, logits = predicted, None, []
    for frame in range(head.config.ctc_frames):
        mask = unrolled_mask(predicted.shape[1], frame + 2, predicted.device)[None, None]
        previous = head.decode(head.frame_input(previous, frame, fed), positions + frame + 1, mask, cache)
        normed = parts.norm(previous)
        logits.append(head.frame_logits(normed, parts).float())
        if head.config.ctc_feed:
            fed = head.entry_embeddings(logits[-1].detach().argmax(-1), parts)
    return torch.stack(logits).log_softmax(-1)


def upstream_frames(pair_log_probs: torch.Tensor, frames: int, anchors: int) -> torch.Tensor:
    """[F, B, anchors, entries]: anchor a's frames are the pairs' own outputs a, a+1, .., a+F-1 (upstream's
    `logits_cycle`: the head's consecutive teacher-forced outputs). pair_log_probs: [B, pairs, entries]."""
    return torch.stack([pair_log_probs[:, f : f + anchors] for f in range(frames)])


def ctc_loss(model: HeadWithTarget, batch: Batch, cfg: HeadTrainConfig) -> tuple[torch.Tensor, dict]:
    head, parts = model.head, model.parts
    ids, features = batch["input_ids"], batch["features"]
    labels_per_anchor = head.config.ctc_labels
    # anchor a's labels: the target's argmax at features a+1..a+L; upstream frames also need pairs a..a+F-1
    reach = max(labels_per_anchor, head.config.ctc_frames - 1) if head.upstream else labels_per_anchor
    anchors = ids.shape[1] - 1 - reach
    if anchors < 1:
        raise ConfigError(f"sequences of {ids.shape[1]} tokens are too short for {labels_per_anchor} CTC labels")
    inputs = features[:, :-1]
    if model.training and cfg.noise:
        inputs = inputs + torch.randn_like(inputs) * cfg.noise * model.feature_scale
    positions = torch.arange(1, ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
    cache = DynamicCache()
    predicted = head(inputs, parts.embed_tokens(ids[:, 1:]), positions, None, cache)  # the pairs: EAGLE's losses
    following = features[:, 1:]
    regression = F.smooth_l1_loss(predicted / model.feature_scale, following / model.feature_scale)
    p = model.target_probs(following)
    log_q = parts.logits(predicted).float().log_softmax(-1)
    ce = -(p * log_q).sum(-1).mean()

    if head.upstream:
        pair_log_probs = head.frame_logits(parts.norm(predicted), parts).float().log_softmax(-1)
        log_probs = upstream_frames(pair_log_probs, head.config.ctc_frames, anchors)
    else:
        log_probs = ctc_frame_log_probs(head, parts, predicted, positions, cache)[:, :, :anchors]
    log_probs = log_probs.reshape(log_probs.shape[0], -1, log_probs.shape[-1])  # [F, B * anchors, V + 1]
    labels = p.argmax(-1).unfold(1, labels_per_anchor, 1)[:, :anchors].reshape(-1, labels_per_anchor)
    if head.upstream:  # a label that is the blank token cannot be spelled: upstream's rare <unk>; drop its window
        keep = (labels != head.blank_row()).all(-1)
        log_probs, labels = log_probs[:, keep], labels[keep]
    blank = log_probs.shape[-1] - 1
    frames = log_probs.shape[0]
    ctc = F.ctc_loss(log_probs, labels, torch.full((labels.shape[0],), frames, dtype=torch.long),
                     torch.full((labels.shape[0],), labels_per_anchor, dtype=torch.long), blank=blank,
                     reduction="mean", zero_infinity=True)
    total = cfg.w_regression * regression + cfg.w_ce * ce + cfg.w_ctc * ctc
    best = log_probs.argmax(-1)  # [F, N]: each frame's best entry
    metrics = {"regression": regression.detach(), "ce": ce.detach(), "ctc": ctc.detach(),
               "top1": (log_q.argmax(-1) == p.argmax(-1)).float().mean(),
               "ctc_blank_rate": (best == blank).float().mean()}
    if not model.training:  # held-out: how much of the label sequence the best alignment's collapse spells
        matched = sum(common_prefix(ctc_collapse(alignment, blank), want)
                      for alignment, want in zip(best.T.tolist(), labels.tolist()))
        metrics["ctc_prefix"] = torch.tensor(matched / labels.shape[0])
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
            batch = self.data.batch(start, 16, device)
            if self.cfg.kind in ("eagle", "eagle3"):
                _, metrics = eagle_loss(model, batch, self.cfg, unroll=self.cfg.eval_unroll)
            else:
                _, metrics = (ctc_loss if self.cfg.kind == "ctc" else medusa_loss)(model, batch, self.cfg)
            for name, value in metrics.items():
                if name.startswith(("top1", "ctc")):
                    sums[name] = sums.get(name, 0.0) + float(value)
            batches += 1
        return {name: value / batches for name, value in sums.items()}


def draft_vocabulary(counts: torch.Tensor, size: int) -> torch.Tensor:
    """The `size` most frequent target tokens of the training data (ascending ids), from its token counts."""
    if size == 0 or size >= len(counts):
        return torch.arange(len(counts))
    return counts.topk(size).indices.sort().values


def head_to_tune(folder: str, kind: HeadKind, target: PreTrainedModel | None = None) -> EagleHead | MedusaHeads:
    """The trained head in `folder`, refused unless it is of `kind` (checked by the CLI before any data is built)."""
    head = load_head(folder, target)
    if head.config.kind != kind:
        raise ConfigError(f"--init-from {folder} holds a {head.config.kind} head, not {kind}")
    return head


def initial_head(target: PreTrainedModel, counts: torch.Tensor, cfg: HeadTrainConfig, target_name: str
                 ) -> EagleHead | MedusaHeads:
    """A new head with the data's draft vocabulary, or (with `cfg.init_from`) a trained one to fine-tune, in fp32."""
    if cfg.init_from:
        return head_to_tune(cfg.init_from, cfg.kind, target).float()
    draft_ids = draft_vocabulary(counts, cfg.draft_vocab)
    eagle3 = dict(feature_layers=head_feature_layers(cfg, target), target_layers=target.config.num_hidden_layers
                  ) if cfg.kind == "eagle3" else {}
    config = HeadConfig.for_target(cfg.kind, target, draft_vocab=len(draft_ids) if cfg.draft_vocab else 0,
                                   medusa_heads=cfg.medusa_heads, ctc_frames=cfg.ctc_frames,
                                   ctc_labels=cfg.ctc_labels, ctc_feed=cfg.ctc_feed,
                                   ctc_frames_from=cfg.ctc_frames_from, target=target_name, **eagle3)
    if cfg.kind == "ctc" and cfg.ctc_frames_from == "upstream":  # the blank token must be a draft entry
        counts = counts.clone()
        counts[config.ctc_blank_token] = counts.max() + 1
        draft_ids = draft_vocabulary(counts, cfg.draft_vocab)
    head = build_head(config)
    head.draft_to_target.copy_(draft_ids)
    if isinstance(head, Eagle3Head):
        head.init_from_target(target)
    return head


def head_feature_layers(cfg: HeadTrainConfig, target: PreTrainedModel) -> list[int]:
    """The target layers an EAGLE-3 head reads (ascending, inside the target), by default 2, L/2, L-3."""
    layers = target.config.num_hidden_layers
    chosen = list(cfg.feature_layers) or default_feature_layers(layers)
    if len(chosen) != 3 or chosen != sorted(set(chosen)) or not 0 <= chosen[0] <= chosen[-1] < layers:
        raise ConfigError(f"an EAGLE-3 head reads 3 distinct layers of the target's {layers}, ascending, from 0 to "
                          f"{layers - 1}; got {chosen}")
    return chosen


def train_head(
    target: PreTrainedModel, shards: Path | list[Path], cfg: HeadTrainConfig, train: TrainConfig,
    target_name: str = "",
) -> tuple[EagleHead | MedusaHeads, dict]:
    """Train a head on the training shards of every folder in `shards` (held out: the first folder's) and save
    it (with its config) in train.out_dir."""
    started = time.perf_counter()
    trainer = Trainer(train, task=cfg)  # seeds first: the head's initialisation is reproducible
    folders = shards if isinstance(shards, list) else [shards]
    data, heldout = FeatureShards(folders, "train"), FeatureShards(folders[0], "heldout")
    counts = data.token_counts(target.get_output_embeddings().weight.shape[0])
    head = initial_head(target, counts, cfg, target_name)
    config = head.config
    coverage = float(counts[head.draft_to_target.cpu()].sum() / counts.sum())  # share of the data's tokens it holds
    parts = TargetParts(target, head.draft_to_target, dtype=torch.float32)  # frozen parts in fp32, like the head
    inputs = data.features if data.aux is None else data.aux  # what the head reads (the noise's unit)
    if (cfg.kind == "eagle3") != (data.aux is not None):
        raise ConfigError(f"{', '.join(map(str, folders))}: {'no' if data.aux is None else ''} EAGLE-3 layer features "
                          f"in the shards, for a {cfg.kind} head: use a data folder built for this kind")
    scale = float(inputs[: min(len(data), 256)].float().pow(2).mean().sqrt())
    model = HeadWithTarget(head, parts, scale)
    loss = {"eagle": eagle_loss, "eagle3": eagle_loss, "medusa": medusa_loss, "ctc": ctc_loss}[cfg.kind]
    evaluate = HeldoutAgreement(heldout, cfg)
    if cfg.init_from:  # what fine-tuning gained is measured on the same held-out data
        with torch.no_grad():
            cfg.extra["heldout_init"] = evaluate(model.to(trainer.device).eval())
    result = trainer.fit(model, data, lambda m, b: loss(m, b, cfg), evaluate)
    if cfg.kind == "medusa":
        accuracy = rank_accuracy(model, heldout)
        config.medusa_paths = static_tree(accuracy, cfg.medusa_tree_nodes)
        cfg.extra["medusa_rank_accuracy"] = [[round(float(a), 4) for a in row] for row in accuracy]
    init = {"init_from": cfg.init_from, "init_training": config.training} if cfg.init_from else {}
    config.training = {**cfg.extra, **init, "draft_vocab_coverage": round(coverage, 4), "steps": result.step,
                       "heldout": result.eval, "train_seconds": round(time.perf_counter() - started, 1),
                       "train_sequences": len(data), "seq_len": int(data.ids.shape[1])}
    head.config = config
    if trainer.is_main_process:
        save_head(head, train.out_dir)
    return head, config.training
