"""The decode loop: draft, verify in one target forward, accept, commit, emit. Plain decoding is k = 0."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from draftsmith.acceptance import AcceptanceRule, SamplingConfig, acceptance_rule
from draftsmith.adaptive import DraftLength
from draftsmith.backends.protocol import BackendConfig
from draftsmith.draft import Draft
from draftsmith.drafters.base import Drafter, Feedback
from draftsmith.step import Stats, speculative_step
from draftsmith.errors import ConfigError
from draftsmith.models import encode_prompt, eos_token_ids
from draftsmith.predictor import PathPruner
from draftsmith.streaming import TextStream
from draftsmith.target_runner import TargetRunner

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    k: int = 8  # draft tokens per target step; 0 = plain autoregressive decoding
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer)
    stop_on_eos: bool = True
    adaptive: bool = False  # choose each step's draft length (at most k) from measured costs and acceptance
    end_ids: frozenset[int] = frozenset()  # tokens that end the generation (kept), as EOS does: line ends, say

    def __post_init__(self) -> None:
        if self.k < 0:
            raise ConfigError(f"k (draft tokens per step) must be >= 0, got {self.k}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class GenerationResult:
    tokens: list[int]  # generated tokens (a final EOS included, as HF generate returns it)
    text: str | None  # generated text, cut before a stop string; None without a tokenizer
    finish_reason: str  # "eos" | "stop" | "length" | "cancelled"
    stats: Stats


def random_streams(seed: int | None, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """Two independent generators, for drafting and for acceptance, derived from one seed: a drafter that
    draws more or fewer values (another k, another tree) never shifts the acceptance rule's draws."""
    if seed is None:
        seed = int(torch.randint(2**62, ()))
    streams = []
    for stream in range(2):
        generator = torch.Generator(device=device)
        generator.manual_seed(hash((seed, stream)) & (2**63 - 1))
        streams.append(generator)
    return streams[0], streams[1]


class SpecEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        drafter: Drafter | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        backend: BackendConfig = BackendConfig(),  # how the target's forward runs (backends.protocol.BackendConfig)
        pruner: PathPruner | None = None,  # cuts draft trees between the target's layers before verifying
        sparse_verify=None,  # LOSSY: the target verifies with routers skipping layers (sparse.RoutedVerify)
        rule: AcceptanceRule | None = None,  # LOSSY where it is not greedy's: replaces the rule sampling implies
    ):
        self.model, self.drafter, self.tokenizer = model, drafter, tokenizer
        self.runner = TargetRunner(model, backend)
        if pruner is not None and sparse_verify is not None:
            raise ConfigError("predictor pruning and the lossy sparse verification do not combine: pick one")
        gives_confidence = drafter is not None and drafter.gives_confidence
        if pruner is not None and pruner.weighs_confidence and not gives_confidence:
            raise ConfigError(f"this predictor weighs the drafter's confidence per node, which the "
                              f"{drafter.name if drafter is not None else 'chosen'} drafter does not give: train one for it with "
                              "`draftsmith train predictor --no-confidence`")
        self.runner.pruner, self.runner.sparse_verify = pruner, sparse_verify
        self.rule = rule
        if drafter is not None:  # self-speculation: a drafter may run on the target's own layers and cache
            drafter.bind(self.runner)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.max_context = getattr(model.config, "max_position_embeddings", None)

    @property
    def wants_features(self) -> bool:
        """The drafter drafts from the target's features: scoring returns them and the drafter gets feedback."""
        return self.drafter is not None and self.drafter.needs_features

    def adaptive_length(self, max_k: int) -> DraftLength:
        """Fresh adaptive state for one request, from costs measured once per machine (the target's forward, and
        the drafter's where it offers `cost_per_token`): a request's draft lengths, and so its random draws,
        depend neither on what ran before it nor on the machine's load."""
        return DraftLength(self.runner.costs(), max_k, draft_cost=self.drafter.cost_per_token())

    def draft_kind(self, context: list[int]) -> Hashable:
        """What the drafter says of its next proposal before making it (`draft_kind`, optional; the n-gram
        drafter's match length): the adaptive draft length keeps an acceptance estimate per kind."""
        return self.drafter.draft_kind(context)

    def generate_text(
        self, prompt: str, config: GenerationConfig, on_text: Callable[[str], None] | None = None,
        templated: bool = False,
    ):
        """Generate from text; `templated` when the prompt went through the chat template (it has its BOS)."""
        if self.tokenizer is None:
            raise ConfigError("generate_text needs an engine built with a tokenizer")
        return self.generate(encode_prompt(self.tokenizer, prompt, templated), config, on_text)

    def generate(
        self, prompt_ids: list[int], config: GenerationConfig, on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """`should_stop` is asked after the prefill and after every step; when it says True, generation ends
        there with finish_reason "cancelled"."""
        self._check(prompt_ids, config)
        sampling = config.sampling
        sizes_itself = self.drafter is not None and self.drafter.sizes_itself  # trees sized from the costs
        pruner, layers = self.runner.pruner, self.model.config.num_hidden_layers
        if pruner is not None:
            pruner.start_request(self.runner.costs, layers)
        if sizes_itself and self.drafter.costs is None:
            self.drafter.costs = self.runner.costs()
            if pruner is not None:
                self.drafter.costs = pruner.tree_costs(self.drafter.costs, layers)
        adaptive = None
        if config.adaptive and self.drafter is not None and not sizes_itself:
            adaptive = self.adaptive_length(config.k)
        draft_generator, accept_generator = random_streams(sampling.seed, self.model.device)
        stream = TextStream(self.tokenizer, config.stop, on_text) if self.tokenizer is not None else None
        stats = Stats(prompt_tokens=len(prompt_ids))
        start = time.perf_counter()
        wants_features = self.wants_features
        prompt_features = self.runner.prefill(prompt_ids, features=wants_features,
                                               new_tokens=config.max_new_tokens + config.k)
        if self.drafter is not None:
            self.drafter.reset(prompt_ids, sampling, draft_generator)
        if self.rule is not None:  # a rule may keep per-request state (collab.rule.CollabRule)
            self.rule.reset(prompt_ids)
        if wants_features:
            self.drafter.feedback(Feedback(prompt_features, prompt_ids[1:]))
        stats.prefill_s = time.perf_counter() - start

        context, new = list(prompt_ids), []
        finish = "cancelled" if should_stop is not None and should_stop() else None
        while finish is None:
            budget = min(config.k, config.max_new_tokens - len(new) - 1) if self.drafter is not None else 0
            kind = self.draft_kind(context) if adaptive is not None else None
            k = adaptive.next_k(budget, kind) if adaptive is not None else budget
            draft, path, next_token = self.step(context, k, sampling, accept_generator, stats)
            if adaptive is not None:
                adaptive.update(max(draft.depths(), default=0), len(path), stats.last_draft_s, kind)

            step_tokens = [draft.tokens[i] for i in path] + [next_token]
            step_tokens, finish = self._cut(step_tokens, config, len(new))
            if stream is not None:
                kept = stream.push(step_tokens)
                if kept is not None:
                    step_tokens, finish = step_tokens[:kept], "stop"
            context += step_tokens
            new += step_tokens
            if finish is None and should_stop is not None and should_stop():
                finish = "cancelled"

        stats.new_tokens = len(new)
        stats.total_s = time.perf_counter() - start
        if self.runner.recalibrate_if_drifted():  # the costs sized this request wrongly: the next one re-reads them
            if sizes_itself:
                self.drafter.costs = None
            if pruner is not None:
                pruner.forget_costs()
        if self.drafter is not None:
            stats.drafter = self.drafter.statistics()
        if self.rule is not None:
            stats.drafter = {**stats.drafter, **self.rule.statistics()}
        if pruner is not None:
            stats.drafter = {**stats.drafter, **pruner.statistics()}
        if self.runner.sparse_verify is not None:  # lossy: the share of layers the routed target ran
            stats.drafter = {**stats.drafter, "verify_executed_ratio": self.runner.sparse_verify.executed_ratio}
        text = stream.finish() if stream is not None else None
        return GenerationResult(tokens=new, text=text, finish_reason=finish, stats=stats)

    def step(
        self, context: list[int], k: int, sampling: SamplingConfig, generator: torch.Generator, stats: Stats
    ) -> tuple[Draft, list[int], int]:
        """One speculative step of the target (step.speculative_step). Returns the draft, the accepted node ids
        and the correction / bonus token."""
        rule = self.rule if self.rule is not None else acceptance_rule(sampling)
        step = speculative_step(self.drafter, self.runner, rule, context, k, generator, stats,
                                features=self.wants_features)
        return step.draft, step.verdict.path, step.verdict.next_token

    def _cut(self, tokens: list[int], config: GenerationConfig, produced: int) -> tuple[list[int], str | None]:
        """Truncate a step's tokens at EOS (kept) or at the max_new_tokens budget."""
        for i, token in enumerate(tokens):
            if config.stop_on_eos and token in self.eos_ids:
                return tokens[: i + 1], "eos"
            if token in config.end_ids:
                return tokens[: i + 1], "stop"
        room = config.max_new_tokens - produced
        if len(tokens) >= room:
            return tokens[:room], "length"
        return tokens, None

    def _check(self, prompt_ids: list[int], config: GenerationConfig) -> None:
        if not prompt_ids:
            raise ConfigError("the prompt is empty: give at least one token")
        if self.rule is not None and not config.sampling.greedy:  # the rules given here review greedy chains
            raise ConfigError(f"the acceptance rule {type(self.rule).__name__} reviews greedy drafts only: use "
                              "temperature 0")
        if config.stop and self.tokenizer is None:
            raise ConfigError("stop strings need an engine built with a tokenizer")
        if self.max_context and len(prompt_ids) + config.max_new_tokens > self.max_context:
            raise ConfigError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the "
                f"model's context of {self.max_context} tokens"
            )
