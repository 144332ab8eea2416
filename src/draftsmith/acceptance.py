"""Logits processing and acceptance rules. Separate from drafting and from the forward pass.

Target logits come as one row per fed position: row 0 is the root (the last committed token), row i + 1 is
draft node i. Row r predicts the token that follows position r.

An acceptance rule (greedy, rejection sampling, either made lenient) turns a draft and the reviewer's logits
into a Verdict, which also says which distribution each emitted token was drawn from: a cascade level that
drafts for the level above hands those up as its draft distributions q, which keeps the top review lossless.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from draftsmith.draft import ROOT, Draft
from draftsmith.errors import ConfigError

GREEDY_BELOW = 1e-5  # temperatures under this are greedy: dividing logits by 1e-45 overflows to NaN probabilities
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; bounded so every seed is valid on every device


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    seed: int | None = None

    def __post_init__(self) -> None:
        # written so that NaN fails too (every comparison with NaN is false)
        if not 0 <= self.temperature < math.inf:
            raise ConfigError(f"temperature must be >= 0 and finite (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be in [0, 2**63 - 1], got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def processed_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Sampling distribution after temperature, top-k, then top-p (the order HF applies them), in float32."""
    logits = logits.float() / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= cfg.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits.softmax(-1)


def accept_greedy(draft: Draft, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Follow the draft while it agrees with the target's argmax; then emit the target's own argmax."""
    # max's indices: the first maximum, as argmax's, in a third of argmax's time on CPUs over a verification's rows
    best = target_logits.max(-1).indices.tolist()
    children = draft.children()
    path: list[int] = []
    node = ROOT
    while True:
        want = best[node + 1]
        node = next((c for c in children.get(node, ()) if draft.tokens[c] == want), None)
        if node is None:
            return path, want
        path.append(node)


def accept_sampling(
    draft: Draft, target_probs: torch.Tensor, generator: torch.Generator
) -> tuple[list[int], int]:
    """Lossless speculative sampling (Leviathan/Chen), generalised to trees by recursive rejection.

    At each node, the children are tried in order: child c is accepted with probability
    min(1, p(x_c) / q_c(x_c)); on rejection p becomes norm(max(p - q_c, 0)). When every child is rejected
    (or there are none), the next token is drawn from what is left of p. A deterministic drafter has a
    one-hot q. The output distribution equals the target's `target_probs`, whatever the drafter proposes.
    """
    children = draft.children()
    path: list[int] = []
    node = ROOT
    while True:
        p = target_probs[node + 1]
        for child in children.get(node, ()):
            x = draft.tokens[child]
            q = _draft_distribution(draft, child, p)
            accept_prob = (p[x] / q[x]).clamp(max=1.0) if q[x] > 0 else p.new_tensor(0.0)
            if torch.rand((), generator=generator, device=p.device) < accept_prob:
                path.append(child)
                node = child
                break
            residual = (p - q).clamp(min=0)
            # residual mass is zero only when p <= q everywhere, i.e. p == q; then x was accepted surely
            p = residual / residual.sum() if residual.sum() > 0 else p
        else:
            return path, int(torch.multinomial(p, 1, generator=generator))


def _draft_distribution(draft: Draft, node: int, like: torch.Tensor) -> torch.Tensor:
    if draft.probs is not None:
        q = draft.probs[node].to(like.device, torch.float32)
        if q.shape[-1] < like.shape[-1]:  # drafter with fewer logits: the extra target ids get no draft mass
            q = torch.nn.functional.pad(q, (0, like.shape[-1] - q.shape[-1]))
        return q[: like.shape[-1]]
    q = torch.zeros_like(like)
    q[draft.tokens[node]] = 1.0
    return q


@dataclass
class Verdict:
    path: list[int]  # accepted draft node ids, root to leaf
    next_token: int  # the correction or bonus token after them
    # [len(path) + 1, vocab]: the distribution each emitted token (path, then next_token) was drawn from, given
    # the tokens before it; None for a deterministic rule (greedy)
    dists: torch.Tensor | None = None

    @property
    def tokens_emitted(self) -> int:
        return len(self.path) + 1


class AcceptanceRule:
    """What every acceptance rule inherits: `accept`, and capabilities with defaults that do nothing."""

    needs_features = False  # also given `features` and `context` as keywords by `accept`'s caller

    def accept(self, draft: Draft, logits: torch.Tensor, generator: torch.Generator) -> Verdict:
        """Review `draft` against the reviewer's logits (one row per fed position). A rule with
        `needs_features = True` is also given `features` (the reviewer's hidden states, one row per fed position)
        and `context` (the committed tokens) as keywords."""
        raise NotImplementedError

    def reset(self, prompt_ids: list[int]) -> None:
        """A new request starts (a rule with per-request state)."""

    def statistics(self) -> dict[str, float]:
        """Per-request numbers of the rule's own, for the bench."""
        return {}


LENIENCY_RULES = ("argmax", "upstream")  # how a lenient greedy review measures a token: see GreedyRule


@dataclass(frozen=True)
class GreedyRule(AcceptanceRule):
    """Accept a draft token while it is the reviewer's argmax. A lenient reviewer (leniency l > 1, for cascade
    levels below the top only) also accepts some other tokens, by one of two rules:

    - `argmax` (ours): p(x) >= max p / l, the token within a factor l of the reviewer's own best;
    - `upstream` (CS-Drafting's own review): p(x) > q(x) / l, with q the drafter's probability of x (1 for a
      deterministic drafter such as MaG). Its Verdict hands the reviewer's distributions up as the q of the
      tokens it emits, as the upstream code does, for a lenient reviewer above to weigh them."""

    leniency: float = 1.0
    rule: str = "argmax"

    def __post_init__(self) -> None:
        if self.rule not in LENIENCY_RULES:
            raise ConfigError(f"leniency rule must be one of {', '.join(LENIENCY_RULES)}, got '{self.rule}'")

    def accept(self, draft: Draft, logits: torch.Tensor, generator: torch.Generator | None = None) -> Verdict:
        if self.rule == "upstream":
            return self._upstream(draft, logits)
        if self.leniency == 1.0:
            path, next_token = accept_greedy(draft, logits)
            return Verdict(path, next_token)
        log_probs = logits.float().log_softmax(-1)
        best_log_prob, best = log_probs.max(-1)
        floor = (best_log_prob - torch.tensor(self.leniency).log()).tolist()
        children, path, node = draft.children(), [], ROOT
        while True:
            row = log_probs[node + 1]
            node = next((c for c in children.get(node, ()) if row[draft.tokens[c]] >= floor[node + 1]), None)
            if node is None:
                return Verdict(path, int(best[path[-1] + 1 if path else 0]))
            path.append(node)

    def _upstream(self, draft: Draft, logits: torch.Tensor) -> Verdict:
        probs = logits.float().softmax(-1)
        best = probs.argmax(-1).tolist()
        children, path, node = draft.children(), [], ROOT

        def passes(child: int, row: int) -> bool:
            x = draft.tokens[child]
            if x == best[row]:
                return True
            # upstream tests the relaxed condition only when lenient, so leniency 1 is the exact greedy review
            p = probs[row]
            return self.leniency > 1 and bool(p[x] > _draft_distribution(draft, child, p)[x] / self.leniency)

        while True:
            row = node + 1
            node = next((c for c in children.get(node, ()) if passes(c, row)), None)
            if node is None:
                rows = [0] + [n + 1 for n in path]
                return Verdict(path, best[rows[-1]], probs[rows])
            path.append(node)


@dataclass(frozen=True)
class RejectionRule(AcceptanceRule):
    """Speculative sampling (recursive rejection over a tree): lossless at leniency 1. A lenient reviewer
    accepts x with probability min(1, l * p(x) / q(x)); it then no longer samples p, and its Verdict reports
    the distribution it did sample, so the level above stays exact."""

    sampling: SamplingConfig
    leniency: float = 1.0

    def accept(self, draft: Draft, logits: torch.Tensor, generator: torch.Generator) -> Verdict:
        probs = processed_probs(logits, self.sampling)
        if self.leniency == 1.0:
            path, next_token = accept_sampling(draft, probs, generator)
            # the theorem of speculative sampling: every emitted token is distributed as the reviewer's p
            return Verdict(path, next_token, probs[[0] + [node + 1 for node in path]])
        return self._lenient(draft, probs, generator)

    def _lenient(self, draft: Draft, probs: torch.Tensor, generator: torch.Generator) -> Verdict:
        children, path, dists, node = draft.children(), [], [], ROOT
        while True:
            p = probs[node + 1]
            emitted = torch.zeros_like(p)  # the emitted token's law, marginal over the siblings' coin flips
            survive, chosen, rest = 1.0, None, p
            for child in children.get(node, ()):
                q = _draft_distribution(draft, child, p)
                accepted = torch.minimum(q, self.leniency * rest)  # mass of "x drafted and accepted"
                emitted += survive * accepted
                x = draft.tokens[child]
                accept_prob = accepted[x] / q[x] if q[x] > 0 else p.new_tensor(0.0)
                if chosen is None and torch.rand((), generator=generator, device=p.device) < accept_prob:
                    chosen = child
                survive *= float(1 - accepted.sum())
                residual = (rest - q).clamp(min=0)
                rest = residual / residual.sum() if residual.sum() > 0 else rest
            emitted += survive * rest
            dists.append(emitted / emitted.sum())
            if chosen is None:
                return Verdict(path, int(torch.multinomial(rest, 1, generator=generator)), torch.stack(dists))
            path.append(chosen)
            node = chosen


def acceptance_rule(sampling: SamplingConfig, leniency: float = 1.0, leniency_rule: str = "argmax") -> AcceptanceRule:
    """The rule for these sampling settings; leniency > 1 only where a lossy review is allowed. When sampling,
    both leniency rules are the same test (accept x with min(1, l p(x) / q(x)): upstream's p > q / l made a
    probability), so `leniency_rule` chooses only between the greedy reviews."""
    if leniency < 1:
        raise ConfigError(f"leniency must be >= 1 (1 = exact review), got {leniency}")
    return GreedyRule(leniency, leniency_rule) if sampling.greedy else RejectionRule(sampling, leniency)
