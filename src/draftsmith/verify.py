"""The target side of one speculative step: score a whole draft in ONE forward over the KV cache, then keep
only the accepted path's cache entries.

The cache holds every committed token except the last one (the root): each step feeds the root plus the draft
nodes, so row 0 of the logits predicts the first draft level and the last accepted row gives the bonus token.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from draftsmith.adaptive import CostCurve, calibrated_costs
from draftsmith.cached_lm import LeanLlama, cached_lm
from draftsmith.draft import ROOT, Draft, common_prefix


def tree_mask(draft: Draft) -> torch.Tensor:
    """[1 + n, 1 + n] bool over the root and the nodes: each node sees the root, its ancestors and itself."""
    n = len(draft) + 1
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:, 0] = True
    for node, parent in enumerate(draft.parent_ids()):
        row = node + 1
        if parent != ROOT:
            allowed[row] = allowed[parent + 1]
        allowed[row, row] = True
    return allowed


class TargetRunner:
    """Owns the target model and its KV cache for one request at a time."""

    def __init__(self, model: PreTrainedModel, lean: bool = True, compile: bool = False, weights: str = "auto"):
        self.model = model
        self.lm = cached_lm(model, lean=lean, compile=compile, weights=weights)
        self.compile_s: float | None = getattr(self.lm, "compile_s", None)  # None: eager
        self.length = 0  # committed tokens in the cache
        self.tokens: list[int] = []  # those tokens (a cascade level syncs its cache to each new context by them)
        self._fed: list[int] = []  # the latest scored tokens: pending, root, draft
        self.pending: list[int] = []  # committed tokens not in the cache yet: fed with the next score (see sync)
        self.vocab_size: int | None = None  # logits kept per row (a draft model's beyond the target's are cut)
        self._costs: CostCurve | None = None

    def prefill(self, prompt_ids: list[int], features: bool = False) -> torch.Tensor | None:
        """Start a request: cache every prompt token but the last, which becomes the first root. With
        `features`, return the last layer's hidden states of the cached tokens ([len - 1, hidden])."""
        self.lm.reset()
        hidden = None
        if len(prompt_ids) > 1:
            out = self.lm.forward(prompt_ids[:-1], last_only=True, features=features)
            hidden = out[1] if features else None
        elif features:
            hidden = torch.empty(0, self.model.config.hidden_size, dtype=self.model.dtype, device=self.model.device)
        self.length = len(prompt_ids) - 1
        self.tokens, self.pending = list(prompt_ids[:-1]), []
        return hidden

    def score(
        self, root_token: int, draft: Draft, features: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [1 + len(draft), vocab] for the root and every draft node, in one forward (with `features`,
        also their hidden states [1 + len(draft), hidden]). Pending tokens ride along before the root."""
        if self.pending and (features or not draft.is_chain):  # only a chain continues them simply
            self.lm.forward(self.pending, last_only=True)
            self.tokens += self.pending
            self.length += len(self.pending)
            self.pending = []
        ids = self._fed = [*self.pending, root_token, *draft.tokens]
        if draft.is_chain:
            out = self.lm.forward(ids, features=features)
        else:
            positions = [self.length + depth for depth in (0, *draft.depths())]
            mask = tree_mask(draft).to(self.model.device)
            out = self.lm.forward(ids, positions=positions, tree_mask=mask, features=features)
        logits, hidden = out if features else (out, None)
        logits = logits[len(self.pending) :, : self.vocab_size]
        return (logits, hidden) if features else logits

    def commit(self, path: list[int]) -> None:
        """Keep the root and the accepted nodes (in path order); drop every other entry of the last step."""
        root = len(self.pending)
        keep = list(range(root + 1)) + [root + node + 1 for node in path]
        self.lm.keep(self.length, keep)
        self.length += len(keep)
        self.tokens += [self._fed[i] for i in keep]
        self.pending = []

    def sync(self, context: list[int]) -> None:
        """Make the runner hold context[:-1] (its last token becomes the root), for a cascade level whose context
        the level above rewrites: keep the longest prefix the cache holds, drop the rest (tokens the level above
        rejected); what is new waits as pending tokens, fed by the next score's forward (one forward, not two)."""
        keep = common_prefix(self.tokens[: len(context) - 1], context)
        if keep < self.length:
            self.lm.truncate(keep)
            del self.tokens[keep:]
            self.length = keep
        self.pending = context[keep:-1]

    def costs(self) -> CostCurve:
        """This target's forward cost by number of tokens fed (measured once per machine, cached on disk, read
        once per runner)."""
        if self._costs is not None:
            return self._costs
        if isinstance(self.lm, LeanLlama):
            backend = "lean"
        elif getattr(self.model, "weight_type", None):
            backend = f"llamacpp-{self.model.weight_type}"
        else:
            backend = "hf"
        if self.compile_s is not None:
            backend += "-compiled"
        self._costs = calibrated_costs(self.model, self.lm, backend)
        return self._costs
