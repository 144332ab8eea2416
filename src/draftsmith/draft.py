"""The Draft: what a drafter proposes. A chain is a tree whose every node's parent is the node before it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from draftsmith.errors import DraftsmithError

ROOT = -1  # parent id of first-level nodes: the last committed token, fed to the target with the draft


class DraftError(DraftsmithError):
    """A drafter broke the Draft contract (a bug in the drafter, not bad user input)."""


@dataclass
class Draft:
    tokens: list[int] = field(default_factory=list)
    # parents[i] < i is the node that node i continues, ROOT for the first level; None means a chain.
    parents: list[int] | None = None
    # probs[i] is the distribution node i was drawn from (sampling); None means the drafter is deterministic.
    probs: torch.Tensor | None = None
    # confidence[i] is the drafter's log-probability of node i given its parent (what an acceptance predictor
    # may weigh beside the target's own state); None where the drafter gives none.
    confidence: list[float] | None = None

    def check(self, budget: int | None = None) -> None:
        """Refuse a malformed draft before the target sees it: parents before children, one distribution per
        node, at most the budget of nodes."""
        n = len(self.tokens)
        if budget is not None and n > budget:
            raise DraftError(f"the drafter proposed {n} nodes, more than the budget of {budget}")
        if self.parents is not None:
            if len(self.parents) != n:
                raise DraftError(f"{n} draft tokens but {len(self.parents)} parents")
            for node, parent in enumerate(self.parents):
                if not ROOT <= parent < node:
                    raise DraftError(f"node {node} has parent {parent}: parents must come before their children")
        if self.probs is not None and (self.probs.dim() != 2 or self.probs.shape[0] != n):
            raise DraftError(f"{n} draft tokens need {n} distributions, got probs of shape {tuple(self.probs.shape)}")
        if self.confidence is not None and len(self.confidence) != n:
            raise DraftError(f"{n} draft tokens but {len(self.confidence)} confidences")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return self.parents is None

    def parent_ids(self) -> list[int]:
        return list(range(-1, len(self.tokens) - 1)) if self.parents is None else self.parents

    def depths(self) -> list[int]:
        """Depth of each node, first level = 1 (the root token is depth 0)."""
        depth: list[int] = []
        for parent in self.parent_ids():
            depth.append(1 if parent == ROOT else depth[parent] + 1)
        return depth

    def children(self) -> dict[int, list[int]]:
        kids: dict[int, list[int]] = {}
        for node, parent in enumerate(self.parent_ids()):
            kids.setdefault(parent, []).append(node)
        return kids


def common_prefix(a: list[int], b: list[int], start: int = 0) -> int:
    """Length of the common prefix of two token sequences, given that they agree on their first `start` items
    (how much of a drafter's or a cache's tokens a rewritten context still holds)."""
    n = min(len(a), len(b))
    for i in range(min(start, n), n):
        if a[i] != b[i]:
            return i
    return n
