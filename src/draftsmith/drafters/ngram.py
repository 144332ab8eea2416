"""Prompt lookup: find the longest n-gram that ends the context and also occurred earlier, and copy what
followed its first occurrence.

The index maps each n-gram (min_n <= n <= max_n) to where its first occurrence ended; it is updated
incrementally as tokens are committed, so a proposal costs O(max_n) lookups, not a context scan. Inside a
cascade the context it sees holds drafted tokens that may be rejected later: the index then unregisters what it
learnt from them. The first occurrence is copied, not the most recent: it was accepted more often on code
(docs/drafters/ngram.md).

With `branches` > 1 (for GPUs, where verifying 64 tokens costs about what one does) the draft is a tree: the
first occurrence's continuation as the trunk, then the continuations of the most recent other occurrences of the
longest matching n-grams (shorter ones too, where the longest has too few), merged into one prefix tree. Every
node is a deterministic choice distinct from its siblings, so greedy acceptance follows the longest matching
path and recursive rejection keeps the target's distribution under sampling.
"""

from __future__ import annotations

import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.draft import Draft, common_prefix
from draftsmith.drafters.base import Drafter
from draftsmith.errors import ConfigError


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, min_n: int = 1, max_n: int = 4, branches: int = 1):
        if not 1 <= min_n <= max_n:
            raise ConfigError(f"n-gram sizes need 1 <= min_n <= max_n, got min_n={min_n}, max_n={max_n}")
        if branches < 1:
            raise ConfigError(f"an n-gram draft needs at least 1 branch, got branches={branches}")
        self.min_n, self.max_n, self.branches = min_n, max_n, branches
        self.seen: list[int] = []  # the tokens indexed
        # n-gram -> indices of the tokens after its occurrences, oldest first (one, the first, unless branching)
        self.followers: dict[tuple[int, ...], list[int]] = {}
        self.registered: list[list[tuple[int, ...]]] = []  # [end]: the n-grams given follower `end`

    def cost_per_token(self) -> float:
        return 0.0  # a dictionary lookup: nothing next to a forward pass

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.seen, self.followers, self.registered = [], {}, []

    def _sync(self, context: list[int]) -> None:
        indexed = len(self.seen)
        if len(context) < indexed or context[:indexed] != self.seen:
            # tokens indexed earlier were rejected: forget the n-grams that followed or contained them
            indexed = common_prefix(self.seen, context)
            for keys in reversed(self.registered[max(indexed, 1) :]):  # the newest followers are the last
                for key in keys:
                    self.followers[key].pop()
                    if not self.followers[key]:
                        del self.followers[key]
            del self.registered[max(indexed, 1) :]
        if not self.registered:
            self.registered.append([])  # position 0 follows no n-gram
        # register the n-grams whose follower is now known, i.e. ending before the last token
        for end in range(max(indexed, 1), len(context)):
            new = []
            for n in range(self.min_n, min(self.max_n, end) + 1):
                key = tuple(context[end - n : end])
                ends = self.followers.setdefault(key, [])
                if not ends or self.branches > 1:  # a chain needs only the first occurrence
                    ends.append(end)
                    new.append(key)
            self.registered.append(new)
        self.seen = list(context)

    def _match(self, context: list[int]) -> tuple[int, int]:
        """(n, start): the longest indexed n-gram ending the context and where its first follower is; (0, 0)
        when none matches."""
        self._sync(context)
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            ends = self.followers.get(tuple(context[-n:]))
            if ends is not None:
                return n, ends[0]
        return 0, 0

    def draft_kind(self, context: list[int]) -> int:
        """The length of the match the next proposal copies from (0: none, so no draft). The adaptive draft
        length keeps an acceptance estimate per kind: a long match is accepted far more often than a short one."""
        return self._match(context)[0]

    def propose(self, context: list[int], k: int) -> Draft:
        n, start = self._match(context)
        if not n:
            return Draft()
        trunk = context[start : start + k]
        others = self._other_continuations(context, start, k) if self.branches > 1 and k > 1 else []
        if not others:
            return Draft(tokens=trunk)
        # the trunk keeps half the budget; each other continuation adds at most its share of new nodes
        trunk = trunk[: k - k // 2]
        tokens, parents = list(trunk), [-1] + list(range(len(trunk) - 1))
        children = {(parent, token): node for node, (token, parent) in enumerate(zip(tokens, parents))}
        share = max(1, (k - len(trunk)) // len(others))
        for continuation in others:
            node, added = -1, 0
            for token in continuation:
                child = children.get((node, token))
                if child is None:
                    if added == share or len(tokens) == k:
                        break
                    child = children[(node, token)] = len(tokens)
                    tokens.append(token)
                    parents.append(node)
                    added += 1
                node = child
        return Draft(tokens=tokens, parents=parents)

    def _other_continuations(self, context: list[int], trunk_start: int, length: int) -> list[list[int]]:
        """Up to branches - 1 continuations that differ from the trunk's: the most recent occurrences of the
        longest matching n-gram first, then of shorter ones."""
        found, starts = [context[trunk_start : trunk_start + length]], {trunk_start}
        for n in range(min(self.max_n, len(context)), self.min_n - 1, -1):
            for end in reversed(self.followers.get(tuple(context[-n:]), [])[-4 * self.branches :]):
                if end in starts:
                    continue
                starts.add(end)
                continuation = context[end : end + length]
                if any(known[: len(continuation)] == continuation for known in found):
                    continue  # it adds no node
                found.append(continuation)
                if len(found) == self.branches:
                    return found[1:]
        return found[1:]
