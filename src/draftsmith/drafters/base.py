"""The drafter contract: what every drafter inherits and the engine calls without probing.

A drafter sees only the committed token sequence (prompt + accepted output). That sequence grows by appends
within a request; anything a drafter drafted beyond it was rejected, so it rolls its own state back to it.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.draft import Draft

if TYPE_CHECKING:
    from draftsmith.adaptive import CostCurve


@dataclass
class Feedback:
    """What the target just committed, for drafters that draft from the target's own features (heads, CTC).

    After the prefill: the prompt's tokens but the last; after a step: the root and the accepted draft nodes.
    `features[i]` is the target's last-layer hidden state (before its final norm) at the i-th committed position
    and `next_tokens[i]` the token that follows it there, so `next_tokens[-1]` is the newest committed token
    (the next root, whose features the target has not computed yet). `accepted` lists the draft's accepted
    node ids (empty after the prefill)."""

    features: torch.Tensor  # [m, hidden]
    next_tokens: list[int]  # m tokens
    accepted: list[int] = field(default_factory=list)
    pruned: bool = False  # the target verified a part of the proposal (a pruner's path): `accepted` indexes that


class Drafter:
    """Every drafter proposes and is reset per request; the rest are capabilities with defaults that do
    nothing, which a drafter overrides where it has them."""

    name: str = "drafter"
    # drafts from the target's features: the engine asks the target for them and hands them over through one
    # `feedback` call after the prefill and after every step, never by running the target again
    needs_features: bool = False
    # a tree drafter that sizes its trees itself from `costs`, the target's verification cost curve (set by
    # the engine); the engine's node budget is then an upper bound, not a length
    sizes_itself: bool = False
    costs: CostCurve | None = None
    gives_confidence: bool = False  # fills Draft.confidence (its log-probability of each node given its parent)

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator | None) -> None:
        """A new request starts with this prompt."""

    def propose(self, context: list[int], k: int) -> Draft:
        """Up to k draft tokens (for trees: nodes) continuing `context` (the committed tokens)."""
        raise NotImplementedError

    def feedback(self, step: Feedback) -> None:
        """What the target kept (only for drafters that need features)."""

    def cost_per_token(self) -> float | None:
        """Seconds per drafted token, calibrated once (for the adaptive draft length); None: learnt from the
        measured draft times."""
        return None

    def draft_kind(self, context: list[int]) -> Hashable:
        """What the next proposal will be (the n-gram match length): one acceptance estimate per kind."""
        return None

    def bind(self, runner) -> None:
        """Self-speculation: the drafter runs on the target's own layers and cache (verify.TargetRunner)."""

    def statistics(self) -> dict[str, float]:
        """Per-request numbers of the drafter's own, for the bench."""
        return {}
