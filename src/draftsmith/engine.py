"""The decode loop: draft, verify in one target forward, accept, commit, emit. Plain decoding is k = 0."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from draftsmith.acceptance import SamplingConfig, accept_greedy, accept_sampling, processed_probs
from draftsmith.adaptive import DraftLength
from draftsmith.draft import Draft
from draftsmith.drafters import Drafter
from draftsmith.errors import ConfigError
from draftsmith.models import encode_prompt, eos_token_ids
from draftsmith.streaming import TextStream
from draftsmith.verify import TargetRunner


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    k: int = 8  # draft tokens per target step; 0 = plain autoregressive decoding
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer)
    stop_on_eos: bool = True
    adaptive: bool = False  # choose each step's draft length (at most k) from measured costs and acceptance

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"k (draft tokens per step) must be >= 0, got {self.k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Stats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_steps: int = 0  # target forwards after prefill
    proposed: int = 0  # draft tokens proposed (for trees: the deepest level)
    accepted: int = 0  # draft tokens accepted
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0  # target forward + acceptance + cache commit
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

    def as_dict(self) -> dict:
        return {**asdict(self), "tau": self.tau, "acceptance_rate": self.acceptance_rate,
                "tokens_per_s": self.tokens_per_s}


@dataclass
class GenerationResult:
    tokens: list[int]  # generated tokens (a final EOS included, as HF generate returns it)
    text: str | None  # generated text, cut before a stop string; None without a tokenizer
    finish_reason: str  # "eos" | "stop" | "length"
    stats: Stats


class SpecEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        drafter: Drafter | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        lean: bool = True,  # our own Llama-family forward over a static cache; False: transformers' forward
        compile: bool = False,  # torch.compile the lean forward (once per process; its time is runner.compile_s)
    ):
        self.model, self.drafter, self.tokenizer = model, drafter, tokenizer
        self.runner = TargetRunner(model, lean=lean, compile=compile)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.draft_length: DraftLength | None = None  # adaptive state, kept across requests

    def adaptive_length(self, max_k: int) -> DraftLength:
        if self.draft_length is None:
            self.draft_length = DraftLength(self.runner.costs(), max_k)
        self.draft_length.max_k = max_k
        return self.draft_length

    def generate_text(
        self, prompt: str, config: GenerationConfig, on_text: Callable[[str], None] | None = None,
        templated: bool = False,
    ):
        """Generate from text; `templated` when the prompt went through the chat template (it has its BOS)."""
        if self.tokenizer is None:
            raise ConfigError("generate_text needs an engine built with a tokenizer")
        return self.generate(encode_prompt(self.tokenizer, prompt, templated), config, on_text)

    def generate(
        self, prompt_ids: list[int], config: GenerationConfig, on_text: Callable[[str], None] | None = None
    ) -> GenerationResult:
        self._check(prompt_ids, config)
        sampling = config.sampling
        adaptive = self.adaptive_length(config.k) if config.adaptive and self.drafter is not None else None
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ())))
        stream = TextStream(self.tokenizer, config.stop, on_text) if self.tokenizer is not None else None
        stats = Stats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        self.runner.prefill(prompt_ids, capacity=len(prompt_ids) + config.max_new_tokens + config.k + 1)
        if self.drafter is not None:
            self.drafter.reset(prompt_ids, sampling, generator)
        stats.prefill_s = time.perf_counter() - start

        context, new = list(prompt_ids), []
        finish = None
        while finish is None:
            budget = min(config.k, config.max_new_tokens - len(new) - 1) if self.drafter is not None else 0
            k = adaptive.next_k(budget) if adaptive is not None else budget
            t0 = time.perf_counter()
            draft = self.drafter.propose(context, k) if k > 0 else Draft()
            t1 = time.perf_counter()
            logits = self.runner.score(context[-1], draft)
            if sampling.greedy:
                path, next_token = accept_greedy(draft, logits)
            else:
                path, next_token = accept_sampling(draft, processed_probs(logits, sampling), generator)
            self.runner.commit(path)
            stats.draft_s += t1 - t0
            stats.verify_s += time.perf_counter() - t1
            stats.target_steps += 1
            stats.proposed += max(draft.depths(), default=0)
            stats.accepted += len(path)
            if adaptive is not None:
                adaptive.update(len(draft), len(path), t1 - t0)

            step_tokens = [draft.tokens[i] for i in path] + [next_token]
            step_tokens, finish = self._cut(step_tokens, config, len(new))
            if stream is not None:
                kept = stream.push(step_tokens)
                if kept is not None:
                    step_tokens, finish = step_tokens[:kept], "stop"
            context += step_tokens
            new += step_tokens

        stats.new_tokens = len(new)
        stats.total_s = time.perf_counter() - start
        text = stream.finish() if stream is not None else None
        return GenerationResult(tokens=new, text=text, finish_reason=finish, stats=stats)

    def _cut(self, tokens: list[int], config: GenerationConfig, produced: int) -> tuple[list[int], str | None]:
        """Truncate a step's tokens at EOS (kept) or at the max_new_tokens budget."""
        if config.stop_on_eos:
            for i, token in enumerate(tokens):
                if token in self.eos_ids:
                    return tokens[: i + 1], "eos"
        room = config.max_new_tokens - produced
        if len(tokens) >= room:
            return tokens[:room], "length"
        return tokens, None

    def _check(self, prompt_ids: list[int], config: GenerationConfig) -> None:
        if not prompt_ids:
            raise ConfigError("the prompt is empty: give at least one token")
        if config.stop and self.tokenizer is None:
            raise ConfigError("stop strings need an engine built with a tokenizer")
        if self.max_context and len(prompt_ids) + config.max_new_tokens > self.max_context:
            raise ConfigError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the "
                f"model's context of {self.max_context} tokens"
            )
