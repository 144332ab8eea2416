"""Drafters with known behaviour, to drive the engine through every acceptance and rollback case."""

from __future__ import annotations

import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.draft import ROOT, Draft


class OracleDrafter:
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
        return Draft(tokens=tokens, parents=parents)
