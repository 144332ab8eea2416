"""A feature-head tree with prompt lookup's chain grafted onto it (`--drafter eagle+ngram`).

The two drafters win on different tokens: the head predicts what the target would write, prompt lookup copies
spans the context already holds (names, docstring examples, repeated lines), at no drafting cost. Each step the
head's tree is drafted as usual; then the n-gram chain is walked down from the root, following tree nodes that
already propose the same token and adding the rest of the chain as new nodes under the last one it shares. The
target verifies both in one forward and greedy acceptance keeps the longest accepted path, so a step gains
whichever branch runs further. Every node stays a distinct deterministic choice among its siblings (point
masses), so recursive rejection under sampling keeps the target's distribution exactly.
"""

from __future__ import annotations

import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.adaptive import CostCurve
from draftsmith.draft import ROOT, Draft
from draftsmith.drafters.base import Drafter, Feedback
from draftsmith.drafters.eagle import EagleDrafter
from draftsmith.drafters.ngram import NgramDrafter


class TreeWithLookup(Drafter):
    needs_features = True
    sizes_itself = True

    def __init__(self, tree: EagleDrafter, lookup: NgramDrafter, max_chain: int = 8):
        self.tree, self.lookup, self.max_chain = tree, lookup, max_chain
        self.name = f"{tree.name}+{lookup.name}"
        self.tree_nodes = 0  # nodes of the last draft that the head proposed (the chain's own come after them)

    @property
    def costs(self) -> CostCurve | None:
        return self.tree.costs

    @costs.setter
    def costs(self, curve: CostCurve | None) -> None:  # the engine hands the tree drafter its cost curve
        self.tree.costs = curve

    def bind(self, runner) -> None:  # a head that reads the target's middle layers says which (EAGLE-3)
        if hasattr(self.tree, "bind"):
            self.tree.bind(runner)

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator | None) -> None:
        self.tree.reset(prompt_ids, sampling, generator)
        self.lookup.reset(prompt_ids, sampling, generator)

    def feedback(self, step: Feedback) -> None:
        # the head calibrates its predicted length on the nodes it drafted (a path's tree nodes come first)
        accepted = step.accepted if step.pruned else [i for i in step.accepted if i < self.tree_nodes]
        self.tree.feedback(Feedback(step.features, step.next_tokens, accepted, step.pruned))

    def propose(self, context: list[int], k: int) -> Draft:
        chain = self.lookup.propose(context, min(k, self.max_chain)).tokens
        # the chain's nodes are kept out of the tree's budget: a tree sized to the whole budget (a GPU's, where
        # verifying more nodes costs little) would otherwise leave the chain no room
        draft = self.tree.propose(context, max(1, k - len(chain)) if chain else k)
        self.tree_nodes = len(draft)
        if not chain:
            return draft
        tokens, parents = list(draft.tokens), draft.parent_ids()
        children: dict[int, dict[int, int]] = {}  # node -> {token: child}
        for node, (token, parent) in enumerate(zip(tokens, parents)):
            children.setdefault(parent, {})[token] = node
        node = ROOT
        for token in chain:
            child = children.get(node, {}).get(token)
            if child is None:
                if len(tokens) >= k:  # the node budget is hard
                    break
                child = len(tokens)
                tokens.append(token)
                parents.append(node)
                children.setdefault(node, {})[token] = child
            node = child
        return Draft(tokens=tokens, parents=parents)
