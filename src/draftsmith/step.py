"""One speculative step: draft (at most k nodes), score the draft in one forward of the reviewing model, accept
by a rule, commit the accepted path to the reviewer's cache. The engine runs it with the target; a cascade level
runs the same step with its own model, its own drafter and its own (possibly lenient) rule."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from draftsmith.acceptance import AcceptanceRule, Verdict
from draftsmith.draft import Draft
from draftsmith.drafters.base import Drafter, Feedback
from draftsmith.target_runner import TargetRunner


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_steps: int = 0  # reviewer forwards after prefill
    proposed: int = 0  # draft tokens proposed (for trees: the deepest level)
    accepted: int = 0  # draft tokens accepted
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0  # reviewer forward + acceptance + cache commit
    draft_nodes: int = 0  # nodes verified (chains: tokens; trees: every node)
    accepted_lengths: list[int] = field(default_factory=list)  # [n]: steps that accepted n draft tokens
    drafter: dict[str, float] = field(default_factory=dict)  # the drafter's own statistics, where it keeps some
    last_draft_s: float = field(default=0.0, repr=False)  # the latest step's drafting time
    total_s: float = 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per target step, bonus token included (1.0 for plain decoding)."""
        return self.new_tokens / self.target_steps if self.target_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s else 0.0

    def record(self, draft: Draft, verdict: Verdict, draft_s: float, verify_s: float) -> None:
        self.last_draft_s = draft_s
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.target_steps += 1
        self.proposed += max(draft.depths(), default=0)
        self.accepted += len(verdict.path)
        self.accepted_lengths += [0] * (len(verdict.path) + 1 - len(self.accepted_lengths))
        self.accepted_lengths[len(verdict.path)] += 1
        self.draft_nodes += len(draft)

    def as_dict(self) -> dict:
        stats = asdict(self)
        stats.pop("last_draft_s")
        return {**stats, "tau": self.tau, "acceptance_rate": self.acceptance_rate,
                "tokens_per_s": self.tokens_per_s}


@dataclass
class Step:
    draft: Draft
    verdict: Verdict

    @property
    def tokens(self) -> list[int]:
        """The tokens this step emits: the accepted draft path, then the correction / bonus token."""
        return [self.draft.tokens[i] for i in self.verdict.path] + [self.verdict.next_token]


def speculative_step(
    drafter: Drafter | None, runner: TargetRunner, rule: AcceptanceRule, context: list[int], k: int,
    generator: torch.Generator, stats: Stats, features: bool = False,
) -> Step:
    """`context` is the committed sequence; the reviewer's cache holds all of it but its last token (the root).
    With `features`, the drafter drafts from the reviewer's features and is told what was kept."""
    t0 = time.perf_counter()
    draft = drafter.propose(context, k) if k > 0 and drafter is not None else Draft()
    draft.check(budget=k)
    t1 = time.perf_counter()
    proposed, draft = draft, runner.prune(context[-1], draft)  # with a pruner: the part worth verifying
    rule_features = rule.needs_features  # a rule that weighs the reviewer's hidden states
    logits, hidden = runner.score(context[-1], draft, features=features or rule_features)
    review = {"features": hidden, "context": context} if rule_features else {}
    verdict = rule.accept(draft, logits, generator, **review)
    runner.commit(verdict.path)
    t2 = time.perf_counter()
    if features:  # the drafter's own forward over what was kept counts as drafting
        kept_rows = torch.tensor([0] + [node + 1 for node in verdict.path], device=hidden.device)
        step_tokens = [draft.tokens[i] for i in verdict.path] + [verdict.next_token]
        drafter.feedback(Feedback(hidden[kept_rows], step_tokens, verdict.path, pruned=draft is not proposed))
    stats.record(draft, verdict, (t1 - t0) + (time.perf_counter() - t2), t2 - t1)
    return Step(draft, verdict)
