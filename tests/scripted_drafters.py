"""Drafters with known behaviour, to drive the engine through every acceptance and rollback case."""

from __future__ import annotations

import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.draft import ROOT, Draft
from draftsmith.drafters.base import Drafter


class OracleDrafter(Drafter):
    """Proposes the true continuation (from a reference output), corrupting the token at chosen offsets."""

    name = "oracle"

    def __init__(self, reference: list[int], prompt_len: int, wrong_at: set[int] = frozenset(), vocab: int = 10):
        self.reference, self.prompt_len, self.wrong_at, self.vocab = reference, prompt_len, wrong_at, vocab

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        pass

    def propose(self, context: list[int], k: int) -> Draft:
        done = len(context) - self.prompt_len
        tokens = list(self.reference[done : done + k])
        for offset in self.wrong_at:
            if offset < len(tokens):
                tokens[offset] = (tokens[offset] + 1) % self.vocab
        return Draft(tokens=tokens)


class TreeOracleDrafter(OracleDrafter):
    """A tree: at each level a wrong sibling first, then the true token, so the accepted path skips nodes."""

    name = "tree-oracle"

    def propose(self, context: list[int], k: int) -> Draft:
        truth = super().propose(context, max(k // 2, 1)).tokens
        tokens, parents = [], []
        parent = ROOT
        for token in truth:
            tokens += [(token + 1) % self.vocab, token]
            parents += [parent, parent]
            parent = len(tokens) - 1  # the true node continues
        return Draft(tokens=tokens[:k], parents=parents[:k])  # never past the node budget


class SampledTreeDrafter(Drafter):
    """A sampling tree drafter with a known q: q(next | last token) is a fixed random table, peaked so that
    siblings often repeat. Level d holds widths[d] children, drawn i.i.d. from q, under each of the first
    `expand` nodes of level d - 1; every node carries the q it was drawn from."""

    name = "sampled-tree"

    def __init__(self, vocab: int, widths: tuple[int, ...] = (3, 2, 2), expand: int = 2, seed: int = 0,
                 sharpness: float = 2.0):
        table_generator = torch.Generator().manual_seed(seed)
        self.q = (torch.randn(vocab, vocab, generator=table_generator) * sharpness).softmax(-1)
        self.widths, self.expand = widths, expand
        self.generator = torch.Generator().manual_seed(0)
        self.duplicate_siblings = 0  # how many proposals had two siblings with the same token

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.generator = generator

    def propose(self, context: list[int], k: int) -> Draft:
        tokens: list[int] = []
        parents: list[int] = []
        frontier = [(ROOT, context[-1])]  # (node, its token) whose children the next level draws
        for width in self.widths:
            level = []
            for node, last in frontier[: self.expand]:
                siblings = torch.multinomial(self.q[last], width, replacement=True, generator=self.generator)
                for token in siblings.tolist():
                    tokens.append(token)
                    parents.append(node)
                    level.append((len(tokens) - 1, token))
                self.duplicate_siblings += len(set(siblings.tolist())) < width
            frontier = level
        tokens, parents = tokens[:k], parents[:k]  # the engine's budget counts nodes (breadth-first: still a tree)
        probs = torch.stack([self.q[context[-1] if p == ROOT else tokens[p]] for p in parents]) if tokens else None
        return Draft(tokens=tokens, parents=parents, probs=probs)
