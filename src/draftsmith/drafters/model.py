"""A smaller causal LM with the target's tokenizer drafts k tokens autoregressively over its own KV cache.

The draft model may differ from the target in two ways that must not crash a request: more output logits (a
vocabulary padded further than the target's), which are cut to the target's ids, and a shorter context, past
which it stops drafting (the target then decodes alone)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from draftsmith.acceptance import SamplingConfig, processed_probs
from draftsmith.backends.factory import cached_lm
from draftsmith.backends.protocol import BackendConfig
from draftsmith.draft import Draft, common_prefix
from draftsmith.drafters.base import Drafter


class ModelDrafter(Drafter):
    name = "model"

    def __init__(self, model: PreTrainedModel, vocab_size: int | None = None, confidence: float = 0.0,
                 keep_features: bool = False, backend: BackendConfig = BackendConfig()):
        """`vocab_size`: the target's number of logits; the draft's logits beyond it are ids the target cannot
        embed, so they are never drafted. None: use all of the draft model's logits. `confidence` (BiLD's
        fallback): stop drafting after a greedy token whose probability is below it. `keep_features`: keep each
        drafted token's hidden state and distribution (`last_hidden`, `last_probs`) for an acceptance rule that
        weighs them (collab.rule.CollabRule). `backend`: how the draft model's forward runs."""
        self.model = model
        self.vocab_size = vocab_size
        self.confidence, self.keep_features = confidence, keep_features
        self.last_hidden: torch.Tensor | None = None
        self.last_probs: torch.Tensor | None = None
        # positions the draft model can encode; None where its config sets no limit
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self.sampling = SamplingConfig()
        self.generator: torch.Generator | None = None
        self.lm = cached_lm(model, backend)
        self._cost_per_token: float | None = None
        self.cached: list[int] = []  # the tokens whose keys/values are in self.cache
        self.synced = 0  # length of the last context seen: those tokens are committed, never re-checked

    def cost_per_token(self) -> float:
        """Seconds per drafted token: this model's one-token forward, measured once per machine (cached) like
        the target's costs, so the adaptive draft length, and with it a seeded request's random draws, never
        follows the machine's momentary load."""
        from draftsmith.adaptive import calibrated_costs
        from draftsmith.target_runner import backend_key

        if self._cost_per_token is None:  # read once per drafter, not per request
            self._cost_per_token = calibrated_costs(self.model, self.lm, backend_key(self.lm, self.model))(1)
        return self._cost_per_token

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.sampling, self.generator = sampling, generator
        self.lm.reset(len(prompt_ids) + 256)
        self.cached, self.synced = [], 0

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> Draft:
        if self.max_positions is not None:
            # drafting token i feeds the token before it at position len(context) + i - 1
            k = min(k, self.max_positions - len(context) + 1)
        if k <= 0:
            return Draft()
        # roll back to the longest cached prefix of the context (drafted tokens beyond it were rejected),
        # keeping at least one token to feed so that there are logits to draft from
        keep = min(common_prefix(self.cached, context, start=self.synced), len(context) - 1)
        self.synced = len(context)
        self.lm.truncate(keep)
        self.cached = self.cached[:keep]
        feed = context[keep:]
        tokens, probs, kept_probs = [], [], []
        self._hidden_rows: list[torch.Tensor] = []
        for _ in range(k):
            logits = self._forward(feed)
            if self.sampling.greedy:
                token = int(logits.argmax())
            else:
                dist = processed_probs(logits, self.sampling)
                token = int(torch.multinomial(dist, 1, generator=self.generator))
                probs.append(dist)
            tokens.append(token)
            feed = [token]
            if self.keep_features or self.confidence:
                greedy_probs = logits.float().softmax(-1)
                kept_probs.append(greedy_probs)
                if greedy_probs[token] < self.confidence:
                    break
        if self.keep_features:
            self.last_hidden, self.last_probs = torch.stack(self._hidden_rows), torch.stack(kept_probs)
        return Draft(tokens=tokens, probs=torch.stack(probs) if probs else None)

    def _forward(self, ids: list[int]) -> torch.Tensor:
        self.cached.extend(ids)
        if not self.keep_features:
            return self.lm.forward(ids, last_only=True)[-1, : self.vocab_size]
        logits, hidden = self.lm.forward(ids, last_only=True, features=True)
        self._hidden_rows.append(hidden[-1].float())
        return logits[-1, : self.vocab_size]

