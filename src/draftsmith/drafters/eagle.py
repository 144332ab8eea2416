"""EAGLE-style drafting: a trained head predicts the target's next feature from (feature, next token), runs
autoregressively over a dynamic tree (EAGLE-2), and the target verifies the whole tree in one forward.

The head keeps its own KV cache over committed positions. After each step the engine's feedback brings the
target's TRUE features of the kept tokens: the head drops its draft-tree entries and re-reads those, so its
state never carries its own guesses past a step. At decode time the head's layer runs through the lean forward
(`LeanLayers`: a preallocated cache, fused products in the fastest weight format), not transformers' module:
each tree level is one small product chain, where module overhead and slow fp32 kernels dominated.

Tree growth (EAGLE-2): from the root, expand level by level the `top_k` nodes of highest cumulative draft
log-probability, each proposing its `top_k` best tokens, up to `depth` levels (default 3 x 4, measured: see
TreeConfig); then keep the n best nodes of
the whole tree (prefix-closed, since a child never scores above its parent). n is chosen per step to maximise
expected tokens per second: the expected accepted length of the best n nodes (the sum of their path
probabilities, rescaled by how well recent predictions matched what was accepted) over the measured
verification cost of n + 1 tokens. The tree is deterministic (top-k), so under sampling each node's draft
distribution is a point mass and recursive rejection keeps the target's distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from draftsmith.acceptance import SamplingConfig
from draftsmith.adaptive import CostCurve, best_tree_size
from draftsmith.backends.format_choice import cached_fastest_format, drafter_format
from draftsmith.backends.formats import WeightFormat
from draftsmith.backends.layers import lean_layer, LeanLayers
from draftsmith.backends.cuda_graphs import drafting_capture
from draftsmith.draft import ROOT, Draft
from draftsmith.drafters.base import Drafter, Feedback
from draftsmith.drafters.captured_tree import CapturedTree
from draftsmith.errors import ConfigError
from draftsmith.heads import EagleHead, TargetParts


@dataclass
class TreeConfig:
    # on a CPU a level costs about what verifying two nodes does: shallow, narrow trees (docs/design/backends.md)
    depth: int = 5  # levels drafted
    top_k: int = 4  # nodes expanded per level, and children proposed per expanded node
    memory: float = 0.9  # weight of the past in the calibration of predicted against accepted length

    def __post_init__(self) -> None:
        if self.depth < 1 or self.top_k < 1:
            raise ConfigError(f"tree depth and top_k must be >= 1, got depth={self.depth}, top_k={self.top_k}")

    @classmethod
    def for_device(cls, device: torch.device, **overrides) -> TreeConfig:
        """On a GPU a captured level costs little whatever its width and verifying 64 nodes about what one
        costs: wider and deeper trees there (EAGLE-2's own depth 6, top-8), from which the costs still choose
        how many nodes to verify."""
        defaults = {"depth": 6, "top_k": 8} if device.type == "cuda" else {}
        return cls(**{**defaults, **overrides})


class EagleDrafter(Drafter):
    name = "eagle"
    needs_features = True
    sizes_itself = True  # the engine gives the node budget; the tree's size comes from the costs
    gives_confidence = True  # each node's draft log-probability given its parent (Draft.confidence)
    layers_class = LeanLayers  # how the head's layer runs over its cache (EAGLE-3's reads a pair: eagle3.py)

    def __init__(self, head: EagleHead, target: PreTrainedModel, tree: TreeConfig | None = None,
                 graphs: bool | None = None):
        """`graphs`: draft from captured CUDA graphs (captured_tree.py; None: on CUDA)."""
        self.device, self.dtype = target.device, next(head.parameters()).dtype
        self.head, self.tree = head, tree or TreeConfig.for_device(self.device)
        self.parts = TargetParts(target, head.draft_to_target, dtype=self.dtype)
        self.layers = lean_head(head, self.parts.head_rows, self.layers_class, drafter_format(target))
        fmt = self.layers.weights
        self.fc_weight, self.head_rows = fmt.prepare(head.fc.weight.detach()), fmt.prepare(self.parts.head_rows)
        self.costs: CostCurve | None = None  # set by the engine
        self.calibration = 1.0  # accepted / predicted length, running
        capture = drafting_capture(graphs, self.device)
        self.captured = CapturedTree(self, capture) if capture is not None else None
        self.reset([], SamplingConfig(), None)

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator | None) -> None:
        self.layers.reset(0)
        self.length = 0  # committed (feature, next token) pairs in the cache; pair j sits at position j + 1
        self.root_feature: torch.Tensor | None = None  # predicted feature at the newest committed token
        self.predicted_length = 0.0  # expected accepted length of the last proposed tree

    @torch.inference_mode()
    def _run(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor
             ) -> torch.Tensor:
        """Head forward of new pairs on top of its cache; allowed: [new, cached + new] bool."""
        return self.layers.append(self._fuse(features, self.parts.embed_tokens(tokens)), positions, allowed)[0]

    def _fuse(self, features: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """[1, new, H]: the head's fc over (feature, embedding of the next token) pairs."""
        pairs = torch.cat([features.to(self.dtype), token_embeds.to(self.dtype)], dim=-1)[None]
        return self.layers.weights.multiply(pairs, self.fc_weight) + self.head.fc.bias

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits, the target's frozen norm and output rows in the head's weight format."""
        return self.layers.weights.multiply(self.parts.norm(features), self.head_rows)

    @torch.inference_mode()
    def feedback(self, step: Feedback) -> None:
        accepted = len(step.accepted)
        if self.predicted_length and not step.pruned:  # how well the tree's predicted length matched what was accepted
            m = self.tree.memory
            self.calibration = m * self.calibration + (1 - m) * min(2.0, (accepted + 0.5) / (self.predicted_length + 0.5))
        self.layers.truncate(self.length)  # drop the draft tree's entries
        n = len(step.next_tokens)
        if n == 0:
            return
        if self.captured is not None and self.captured.feedback(step.features, step.next_tokens):
            self.length += n
            self.root_feature = self.captured.root
            return
        tokens = torch.tensor(step.next_tokens, device=self.device)
        positions = torch.arange(self.length + 1, self.length + 1 + n, device=self.device)
        allowed = torch.ones(n, self.length + n, dtype=torch.bool, device=self.device).tril(self.length)
        out = self._run(step.features, tokens, positions, allowed)
        self.length += n
        if self.captured is not None:  # the captured tree reads the root feature from its buffer
            self.captured.root.copy_(out[-1])
            out = self.captured.root[None]
        self.root_feature = out[-1]

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> Draft:
        if self.root_feature is None or k < 1:
            return Draft()
        candidates = self.captured.propose() if self.captured is not None else None
        return self._select(*(candidates or self._grow()), k)

    def _grow(self) -> tuple[list[int], list[int], list[float]]:
        """The tree's candidates, eagerly: target token ids, parents (ROOT: the root) and cumulative
        log-probabilities, level by level."""
        top_k, base = self.tree.top_k, self.length  # base: the head's committed length
        # every scored candidate: token (draft vocabulary), parent candidate (-1: root), cumulative log-prob
        cand_tokens, cand_parents, cand_scores = [], [], []
        in_cache: dict[int, int] = {}  # candidate -> its row in the head's cache (once expanded)
        log_probs = self._logits(self.root_feature[None]).float().log_softmax(-1)[0]
        scores, tokens = log_probs.topk(min(top_k, log_probs.shape[-1]))
        frontier = self._add(cand_tokens, cand_parents, cand_scores, tokens, torch.full_like(tokens, ROOT), scores)
        parent_features = self.root_feature[None].expand(len(frontier), -1)
        for level in range(1, self.tree.depth):
            # feed the frontier: each node attends to the committed cache, its expanded ancestors and itself
            rows, start = len(frontier), self.layers.length
            visible_rows, visible_columns = [], []  # gathered on the host, written in one operation
            for i, node in enumerate(frontier):
                ancestor = cand_parents[node]
                while ancestor != ROOT:
                    visible_rows.append(i)
                    visible_columns.append(in_cache[ancestor])
                    ancestor = cand_parents[ancestor]
                visible_rows.append(i)
                visible_columns.append(start + i)
            allowed = torch.zeros(rows, start + rows, dtype=torch.bool, device=self.device)
            allowed[:, :base] = True
            allowed[visible_rows, visible_columns] = True
            for i, node in enumerate(frontier):
                in_cache[node] = start + i
            node_tokens = self.parts.to_target_ids(torch.tensor([cand_tokens[n] for n in frontier], device=self.device))
            positions = torch.full((rows,), base + level, device=self.device)
            out = self._run(parent_features, node_tokens, positions, allowed)
            log_probs = self._logits(out).float().log_softmax(-1)
            child_scores, child_tokens = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
            parent_scores = torch.tensor([cand_scores[n] for n in frontier], device=self.device)
            total = (child_scores + parent_scores[:, None]).flatten()
            best = total.topk(min(top_k, total.numel())).indices  # expand only the best top_k children
            parents = torch.tensor(frontier, device=self.device)[best // child_tokens.shape[1]]
            frontier = self._add(cand_tokens, cand_parents, cand_scores, child_tokens.flatten()[best], parents, total[best])
            parent_features = out[best // child_tokens.shape[1]]
        return self.target_ids(cand_tokens), cand_parents, cand_scores

    def target_ids(self, draft_ids: list[int]) -> list[int]:
        """Target token ids of draft-vocabulary ids."""
        if self.parts.full_vocab or not draft_ids:
            return draft_ids
        return self.parts.to_target_ids(torch.tensor(draft_ids, device=self.device)).tolist()

    @staticmethod
    def _add(tokens: list, parents: list, scores: list, new_tokens, new_parents, new_scores) -> list[int]:
        first = len(tokens)
        tokens += new_tokens.tolist()
        parents += new_parents.tolist()
        scores += new_scores.tolist()
        return list(range(first, len(tokens)))

    def _select(self, tokens: list[int], parents: list[int], scores: list[float], budget: int) -> Draft:
        """Of the candidates (target token ids, parents, cumulative log-probabilities), the best nodes (a child never scores above its parent, so the set is prefix-closed), their number
        chosen from the costs, ordered parents first."""
        order = sorted(range(len(tokens)), key=lambda i: -scores[i])
        values = torch.tensor([scores[i] for i in order]).exp() * self.calibration
        n = best_tree_size(values, self.costs, budget) if self.costs is not None else min(budget, len(order))
        kept = set(order[:n])
        for node in list(kept):  # ties could break prefix-closure: keep every ancestor
            while parents[node] != ROOT and parents[node] not in kept:
                node = parents[node]
                kept.add(node)
        while len(kept) > budget:  # the budget is hard: drop the worst leaves
            leaves = [i for i in kept if not any(parents[j] == i for j in kept)]
            kept.discard(min(leaves, key=lambda i: scores[i]))
        chosen = sorted(kept, key=lambda i: (self._depth(parents, i), -scores[i]))
        index = {node: i for i, node in enumerate(chosen)}
        self.predicted_length = float(values[: len(chosen)].sum())
        return Draft(tokens=[tokens[i] for i in chosen], parents=[index.get(parents[i], ROOT) if parents[i] != ROOT else ROOT
                                                          for i in chosen],
                     confidence=[_given_parent(scores, parents, i) for i in chosen])

    @staticmethod
    def _depth(parents: list[int], node: int) -> int:
        depth = 1
        while parents[node] != ROOT:
            node, depth = parents[node], depth + 1
        return depth


def _given_parent(scores: list[float], parents: list[int], node: int) -> float:
    """A node's log-probability given its parent's, from cumulative ones; floored so that a zero-mass node
    (a CTC candidate can carry none) stays a finite input."""
    value = scores[node] - (scores[parents[node]] if parents[node] != ROOT else 0.0)
    return value if value > -30.0 else -30.0  # also catches NaN (-inf minus -inf)


@torch.no_grad()
def lean_head(head: EagleHead, head_rows: torch.Tensor, layers_class: type[LeanLayers] = LeanLayers,
              fmt: WeightFormat | None = None) -> LeanLayers:
    """The head's decoder layer as lean layers over a cache of its own, in the weight format that multiplies the
    draft vocabulary's output rows (the largest product of a tree level) fastest here. fp16 may round the
    head's own weights (a trained head holds values below float16's normal range): that changes proposals
    only, which the target verifies. `fmt`: a format chosen for it (`drafter_format`: beside a 4-bit target)."""
    cfg, weight = head.config, head.fc.weight
    if fmt is None:
        fmt = cached_fastest_format(head_rows, fp16=True, fused=None)  # the fused kernels' products compete too
    positions = torch.arange(cfg.max_position_embeddings, device=weight.device)[None]
    cos, sin = head.rotary(weight[:1, :1], positions)
    return layers_class([lean_layer(head.layer, fmt)], fmt, cos[0], sin[0], cfg.num_attention_heads,
                      cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps, weight.dtype, weight.device)
