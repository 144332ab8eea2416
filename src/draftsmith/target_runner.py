"""The target side of one speculative step: score a whole draft in ONE forward over the KV cache, then keep
only the accepted path's cache entries.

The cache holds every committed token except the last one (the root): each step feeds the root plus the draft
nodes, so row 0 of the logits predicts the first draft level and the last accepted row gives the bonus token.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from draftsmith.adaptive import CostCurve, calibrated_costs, drifted, synchronize
from draftsmith.backends.cuda_graphs import BUCKETS
from draftsmith.backends.factory import cached_lm
from draftsmith.backends.fused import build_tag as fused_build_tag
from draftsmith.backends.lean import LeanLlama
from draftsmith.backends.protocol import BackendConfig, Forward
from draftsmith.draft import ROOT, Draft, common_prefix
from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel


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

    def __init__(self, model: PreTrainedModel, backend: BackendConfig = BackendConfig()):
        self.model = model
        self.lm = cached_lm(model, backend)
        self.compile_s: float | None = getattr(self.lm, "compile_s", None)  # None: eager
        self.length = 0  # committed tokens in the cache
        self.tokens: list[int] = []  # those tokens (a cascade level syncs its cache to each new context by them)
        self._fed: list[int] = []  # the latest scored tokens: pending, root, draft
        self.pending: list[int] = []  # committed tokens not in the cache yet: fed with the next score (see sync)
        self.vocab_size: int | None = None  # logits kept per row (a draft model's beyond the target's are cut)
        self._costs: CostCurve | None = None
        self.observed: dict[int, list[float]] = {}  # this request's forwards: tokens fed -> seconds
        self.pruner = None  # cuts a draft tree between layers before the rest of the target runs (predictor.py)
        # the draft `prune` returned and its hidden rows, until that draft's verdict is committed
        self._pruned: tuple[Draft, torch.Tensor] | None = None
        self.sparse_verify = None  # LOSSY: routers decide the layers each scored token runs (sparse.RoutedVerify)

    def prefill(self, prompt_ids: list[int], features: bool = False, new_tokens: int = 0) -> torch.Tensor | None:
        """Start a request: cache every prompt token but the last, which becomes the first root. With
        `features`, return the last layer's hidden states of the cached tokens ([len - 1, hidden]).
        `new_tokens`: the most the request may add on top of the prompt (its new tokens and a draft)."""
        # captured steps hold the cache's address, so a cache grown mid-request means capturing every step
        # again inside the request: with graphs the whole request is reserved at its start; without them the
        # cache grows on demand (most requests stop well before their budget)
        captured = getattr(self.lm, "graphs", None) is not None
        self.lm.reset(len(prompt_ids) + new_tokens + BUCKETS[-1] if captured else 0)
        hidden = None
        if len(prompt_ids) > 1:
            out = self.lm.forward(prompt_ids[:-1], last_only=True, features=features)
            hidden = out[1] if features else None
        elif features:
            width = self.model.config.hidden_size * max(1, len(getattr(self.lm, "feature_layers", ())))
            hidden = torch.empty(0, width, dtype=self.model.dtype, device=self.model.device)
        self.length = len(prompt_ids) - 1
        self.tokens, self.pending = list(prompt_ids[:-1]), []
        self.observed = {}
        if self.sparse_verify is not None:
            self.sparse_verify.reset(self.lm)
        return hidden

    def prune(self, root_token: int, draft: Draft) -> Draft:
        """With a pruner: run the target's first `pruner.layer` layers over the whole tree, let the pruner pick
        the nodes to verify (one path, or all), keep those rows' states; `score` then runs the other layers
        on them only. Returns the draft to verify. Chains pass unchanged."""
        if self.pruner is None or draft.is_chain or not len(draft) or not self.pruner.worth_scoring(draft):
            return draft
        if not isinstance(self.lm, LeanLlama):
            raise ConfigError("pruning a draft tree between layers needs the lean forward (Llama-family targets)")
        self._flush_pending()
        ids = [root_token, *draft.tokens]
        positions = self._positions(draft)
        hidden = self.lm.forward_upto(ids, positions, self._mask(draft), self.pruner.layer)
        path = self.pruner.select(draft, hidden[0, 1:])
        if path is not None:
            rows = [0] + [node + 1 for node in path]
            self.lm.keep_layers(self.pruner.layer, self.length, rows)
            hidden = hidden[:, rows]
            draft = Draft(tokens=[draft.tokens[node] for node in path],
                          probs=draft.probs[path] if draft.probs is not None else None)
        self._pruned = (draft, hidden)
        return draft

    def _positions(self, draft: Draft) -> list[int]:
        """Positions of the root and the draft's nodes (a node sits at its depth past the root)."""
        return [self.length + depth for depth in (0, *draft.depths())]

    def _mask(self, draft: Draft) -> torch.Tensor | None:
        return None if draft.is_chain else tree_mask(draft).to(self.model.device)

    def _flush_pending(self) -> None:
        if self.pending:
            self.lm.forward(self.pending, last_only=True)
            self.tokens += self.pending
            self.length += len(self.pending)
            self.pending = []

    def score(self, root_token: int, draft: Draft, features: bool = False) -> Forward:
        """Logits [1 + len(draft), vocab] for the root and every draft node, in one forward (with `features`,
        also their hidden states [1 + len(draft), hidden]; else `hidden` is None). Pending tokens ride along
        before the root."""
        if self._pruned is not None and self._pruned[0] is draft:  # `prune` ran the first layers already
            hidden = self._pruned[1]
            self._fed = [root_token, *draft.tokens]
            positions = self._positions(draft)
            mask = self._mask(draft)
            out = self.lm.forward_rest(hidden, positions, mask, self.pruner.layer, features=features)
            return self._scores(out, features)
        if self.pending and (features or not draft.is_chain):  # only a chain continues them simply
            self._flush_pending()
        if self.sparse_verify is not None:  # lossy: the routed target scores
            self._flush_pending()
            self._fed = [root_token, *draft.tokens]
            positions = self._positions(draft)
            mask = self._mask(draft)
            out = self.sparse_verify.forward(self.lm, self._fed, positions, mask, features=features)
            return self._scores(out, features)
        ids = self._fed = [*self.pending, root_token, *draft.tokens]
        start = time.perf_counter()
        if draft.is_chain:
            out = self.lm.forward(ids, features=features)
        else:
            positions = self._positions(draft)
            out = self.lm.forward(ids, positions=positions, tree_mask=self._mask(draft), features=features)
        if self._costs is not None:  # the forward's time against its calibrated cost (see `recalibrate_if_drifted`)
            synchronize(self.lm)
            self.observed.setdefault(len(ids), []).append(time.perf_counter() - start)
        return self._scores(out, features, skip=len(self.pending))

    def _scores(self, out: torch.Tensor | Forward, features: bool, skip: int = 0) -> Forward:
        """A forward's output as `score` returns it: the rows from `skip` on, logits cut to the vocabulary."""
        logits, hidden = out if features else (out, None)
        return Forward(logits[skip:, : self.vocab_size], hidden)

    def commit(self, path: list[int]) -> None:
        """Keep the root and the accepted nodes (in path order); drop every other entry of the last step."""
        root = len(self.pending)
        keep = list(range(root + 1)) + [root + node + 1 for node in path]
        if self._pruned is not None:  # tell the pruner what the target accepted of what it let through
            self.pruner.observe(self._pruned[0], path)
            self._pruned = None
        self.lm.keep(self.length, keep)
        if self.sparse_verify is not None:
            self.sparse_verify.keep(self.length, keep)
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
        if self._costs is None:
            self._costs = calibrated_costs(self.model, self.lm, backend_key(self.lm, self.model))
        return self._costs

    def recalibrate_if_drifted(self) -> bool:
        """After a request: when its timed forwards say the cached cost curve is off by DRIFT or more (a curve
        measured while the machine was busy, or a machine that changed), measure it again and keep the new one.
        Returns whether it did; the cache then no longer holds the request's state."""
        observed, self.observed = self.observed, {}
        if self._costs is None or not drifted(self._costs, observed):
            return False
        self._costs = calibrated_costs(self.model, self.lm, backend_key(self.lm, self.model), refresh=True)
        return True


def backend_key(lm, model: PreTrainedModel) -> str:
    """What a forward's cost depends on beyond the model, device, dtype and threads, for its calibration's key:
    the backend, the lean forward's weight format (each has a cost curve of its own), compiled, captured or
    fused (and which build of the fused kernels: a changed kernel costs otherwise)."""
    if isinstance(lm, LeanLlama):
        key = f"lean-{lm.weights.name}"
    elif getattr(model, "weight_type", None):
        key = f"llamacpp-{model.weight_type}"
    else:
        key = "hf"
    if getattr(lm, "compile_s", None) is not None:
        key += "-compiled"
    if getattr(lm, "graphs", None) is not None:
        key += "-graphs"
    if getattr(lm, "fused", None) is not None:
        key += f"-fused-{fused_build_tag()}"
    return key
