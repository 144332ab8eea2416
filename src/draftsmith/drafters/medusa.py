"""Medusa drafting: K heads on the target's last feature propose the next K tokens in one shot; a static tree
(paths of per-head ranks, chosen by the training command from each head's held-out top-k accuracy) arranges
them for one verification forward.

The last kept feature is that of the position before the root (the token the target just emitted), so head j
proposes the token j + 1 places after the root: head 0 fills the tree's first level.

Each step verifies only the tree's n most probable paths (their probability estimated, as when the tree was
chosen, by the product of the heads' held-out rank accuracies), n chosen from the measured verification cost
curve as for EAGLE trees: a 32-node tree costs twice a one-token step in bf16 on a CPU.

Beside a target that multiplies its GGUF file's blocks, the heads' products and the output rows run as Q8_0
blocks through the same block kernels (`drafter_format`), as EAGLE heads and draft models do there.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from draftsmith.acceptance import SamplingConfig
from draftsmith.adaptive import CostCurve, best_tree_size
from draftsmith.backends.format_choice import drafter_format
from draftsmith.draft import ROOT, Draft
from draftsmith.drafters.base import Drafter, Feedback
from draftsmith.errors import ConfigError
from draftsmith.heads import MedusaHeads, TargetParts


def default_paths(heads: int, width: int = 4) -> list[list[int]]:
    """A tree for an untuned head: `width` candidates at the first level, then the top choice of each head."""
    return [[r] for r in range(width)] + [[0] * depth for depth in range(2, heads + 1)]


class MedusaDrafter(Drafter):
    name = "medusa"
    needs_features = True
    sizes_itself = True  # the engine gives the node budget; how many paths to verify comes from the costs
    gives_confidence = True  # each node's head log-probability (Draft.confidence)

    def __init__(self, heads: MedusaHeads, target: PreTrainedModel, paths: list[list[int]] | None = None):
        self.heads = heads
        self.parts = TargetParts(target, heads.draft_to_target, dtype=next(heads.parameters()).dtype)
        self.paths = paths or heads.config.medusa_paths or default_paths(heads.config.medusa_heads)
        if any(len(p) > heads.config.medusa_heads for p in self.paths):
            raise ConfigError(f"a Medusa tree path is deeper than the {heads.config.medusa_heads} heads")
        known = {()}
        for path in sorted(self.paths, key=len):  # prefix-closed, so every node's parent is in the tree
            if tuple(path[:-1]) not in known:
                raise ConfigError(f"Medusa tree path {path} has no parent path {path[:-1]} in the tree")
            known.add(tuple(path))
        accuracy = heads.config.training.get("medusa_rank_accuracy")
        self.path_values = [_path_probability(p, accuracy) for p in self.paths]
        # most probable first (a path never beats its prefix, so every prefix of this order is prefix-closed)
        order = sorted(range(len(self.paths)), key=lambda i: (-self.path_values[i], len(self.paths[i]), self.paths[i]))
        self.paths = [self.paths[i] for i in order]
        self.path_values = torch.tensor([self.path_values[i] for i in order])
        self.width = max(max(p) for p in self.paths) + 1
        self.format = drafter_format(target)  # None: the heads' own dtype through F.linear
        if self.format is not None:
            self.block_weights = [self.format.prepare(block.weight.detach()) for block in heads.blocks]
            self.head_rows = self.format.prepare(self.parts.head_rows)
        self.feature: torch.Tensor | None = None
        self.costs: CostCurve | None = None  # set by the engine

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator | None) -> None:
        self.feature = None

    def feedback(self, step: Feedback) -> None:
        if len(step.features):
            self.feature = step.features[-1]

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> Draft:
        if self.feature is None or k < 1:
            return Draft()
        log_probs, ranked = self._logits(self.feature[None].to(self.parts.dtype)).float().log_softmax(-1).topk(
            self.width, dim=-1)  # [K, width]
        both = torch.stack([self.parts.to_target_ids(ranked).double(), log_probs.double()]).tolist()  # one transfer
        candidates, log_probs = [[int(token) for token in row] for row in both[0]], both[1]
        n = best_tree_size(self.path_values, self.costs, k) if self.costs is not None else min(k, len(self.paths))
        paths = sorted(self.paths[:n], key=lambda p: (len(p), p))  # parents before children
        node_of = {(): ROOT}
        tokens, parents, confidence = [], [], []
        for path in paths:
            node_of[tuple(path)] = len(tokens)
            tokens.append(candidates[len(path) - 1][path[-1]])
            parents.append(node_of[tuple(path[:-1])])
            confidence.append(log_probs[len(path) - 1][path[-1]])  # head j's own log-probability of its token
        return Draft(tokens=tokens, parents=parents, confidence=confidence)


    def _logits(self, feature: torch.Tensor) -> torch.Tensor:
        """[K, draft vocabulary]: each head's logits for the feature [1, H]."""
        if self.format is None:
            return self.parts.logits(self.heads(feature)[:, 0])
        multiply = self.format.multiply
        outputs = torch.cat([feature + F.silu(multiply(feature, weight) + block.bias)
                             for block, weight in zip(self.heads.blocks, self.block_weights)])  # [K, H]
        return multiply(self.parts.norm(outputs), self.head_rows)


def _path_probability(path: list[int], accuracy: list[list[float]] | None) -> float:
    """Estimated chance that the target accepts the whole path: the product of head j's held-out accuracy at
    the path's rank j (Medusa's independence estimate). Without measurements: shallower and lower ranks first."""
    if accuracy is None:
        return math.prod(0.5 / (1 + rank) for rank in path)
    return math.prod(accuracy[depth][rank] for depth, rank in enumerate(path))
