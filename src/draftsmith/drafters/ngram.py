"""Prompt lookup: find the longest n-gram that ends the context and also occurred earlier, and copy what
followed its first occurrence.

The index maps each n-gram (min_n <= n <= max_n) to where its first occurrence ended; it is updated
incrementally as tokens are committed, so a proposal costs O(max_n) lookups, not a context scan. Inside a
cascade the context it sees holds drafted tokens that may be rejected later: the index then unregisters what it
learnt from them. The first
occurrence beats the most recent one on code: replaying HF greedy outputs of SmolLM2 on HumanEval prompts,
drafts of 10 tokens gave 2.84 tokens per step against 2.54 (n-grams of 1 to 4 tokens).
"""

from __future__ import annotations

import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.draft import Draft, common_prefix
from draftsmith.errors import ConfigError


class NgramDrafter:
    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ConfigError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.seen: list[int] = []  # the tokens indexed
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its first occurrence
        self.registered: list[list[tuple[int, ...]]] = []  # [end]: the n-grams first registered with follower end

    def cost_per_token(self) -> float:
        return 0.0  # a dictionary lookup: nothing next to a forward pass

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.seen, self.follower, self.registered = [], {}, []

    def _sync(self, context: list[int]) -> None:
        indexed = len(self.seen)
        if len(context) < indexed or context[:indexed] != self.seen:
            # tokens indexed earlier were rejected: forget the n-grams that followed or contained them
            indexed = common_prefix(self.seen, context)
            for keys in self.registered[max(indexed, 1) :]:
                for key in keys:
                    del self.follower[key]
            del self.registered[max(indexed, 1) :]
        if not self.registered:
            self.registered.append([])  # position 0 follows no n-gram
        # register the n-grams whose follower is now known, i.e. ending before the last token
        for end in range(max(indexed, 1), len(context)):
            new = []
            for n in range(self.min_n, min(self.max_n, end) + 1):
                key = tuple(context[end - n : end])
                if key not in self.follower:
                    self.follower[key] = end
                    new.append(key)
            self.registered.append(new)
        self.seen = list(context)

    def _match(self, context: list[int]) -> tuple[int, int]:
        """(n, start): the longest indexed n-gram ending the context and where its first follower is; (0, 0)
        when none matches."""
        self._sync(context)
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            start = self.follower.get(tuple(context[-n:]))
            if start is not None:
                return n, start
        return 0, 0

    def draft_kind(self, context: list[int]) -> int:
        """The length of the match the next proposal copies from (0: none, so no draft). The adaptive draft
        length keeps an acceptance estimate per kind: replaying SmolLM2's greedy HumanEval outputs under
        llama.cpp's BF16 verification costs, one estimate per match length ran 1.25x plain decoding against
        1.17x for one shared estimate."""
        return self._match(context)[0]

    def propose(self, context: list[int], k: int) -> Draft:
        n, start = self._match(context)
        return Draft(tokens=context[start : start + k]) if n else Draft()
