"""Self-speculation by layer skipping: the target itself, with some layers skipped per token, drafts a chain for
the dense target to verify (lossless: only the dense target decides).

The draft reads the target's own KV cache for the committed context (computed densely, so the draft sees exact
context states; under --lossy-sparse-verify the verifier's holes there are masked as the verifier masks them)
and writes its own draft tokens' keys and values past it, in the layers it runs; the dense
verification forward then overwrites those positions. No second model, no second cache, no second prefill.
Which layers a token skips comes from a policy (`sparse.py`): a fixed set measured on held-out prompts
(`layerskip:auto`) or trained D-LLM routers (`layerskip:DIR`).
"""

from __future__ import annotations

import torch

from draftsmith.acceptance import SamplingConfig, processed_probs
from draftsmith.backends.lean import LeanLlama
from draftsmith.draft import Draft
from draftsmith.drafters.base import Drafter
from draftsmith.errors import ConfigError
from draftsmith.layer_search import SkipSearchConfig, auto_skip
from draftsmith.sparse import SkipPolicy, SparseStep


class LayerSkipDrafter(Drafter):
    name = "layerskip"

    def __init__(self, policy: SkipPolicy | None, vocab_size: int | None = None, confidence: float = 0.0,
                 tokenizer=None, search: SkipSearchConfig | None = None):
        """`policy` None: search the layers to skip when bound to a target (`layerskip:auto`, cached on disk).
        `confidence`: stop drafting once the draft's probability of its own greedy token falls below this (0
        drafts the whole budget)."""
        self.policy, self.vocab_size, self.confidence = policy, vocab_size, confidence
        self.tokenizer, self.search = tokenizer, search
        self.runner = self.sparse = None
        self.sampling, self.generator = SamplingConfig(), None

    def bind(self, runner) -> None:
        """Draft with the engine's own target runner (its lean layers and cache)."""
        if self.policy is None:
            if not isinstance(runner.lm, LeanLlama):
                raise ConfigError("layerskip:auto runs on the lean forward (Llama-family targets)")
            self.policy = auto_skip(runner.model, self.tokenizer, runner.lm, runner.costs(), self.search)
        self.runner, self.sparse = runner, SparseStep(runner.lm, self.policy)

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.sampling, self.generator = sampling, generator
        if self.sparse is not None:
            self.sparse.layers_run = self.sparse.tokens = 0  # statistics per request

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> Draft:
        runner = self.runner
        if runner.pending or runner.length != len(context) - 1:  # the cache must hold the context but its root
            return Draft()
        start = runner.length
        verifier = runner.sparse_verify  # lossy sparse verification leaves holes in the cached context
        self.sparse.begin(start + k + 1, verifier.holes[:, :start] if verifier is not None else None)
        token, tokens, probs = context[-1], [], []
        for j in range(k):
            logits = self.sparse(token, start + j)[: self.vocab_size]
            if self.sampling.greedy:
                token = int(logits.argmax())
                if self.confidence and j and float(logits.softmax(-1)[token]) < self.confidence:
                    break
            else:
                dist = processed_probs(logits, self.sampling)
                token = int(torch.multinomial(dist, 1, generator=self.generator))
                probs.append(dist)
            tokens.append(token)
        return Draft(tokens=tokens, probs=torch.stack(probs) if probs else None)

    def statistics(self) -> dict[str, float]:
        return {"executed_ratio": self.sparse.executed_ratio if self.sparse else 0.0}
