"""CS-Drafting (arXiv 2312.11462): drafters ordered large to small under the target.

- Vertical cascade: a model drafter drafts by running the engine's own speculative step over its own KV cache,
  with the drafters below it as ITS drafter; its review may be lenient (leniency > 1), the target's never is.
- Horizontal cascade: a block's later positions come from smaller drafters (far-ahead tokens rarely survive,
  so cheaper guesses suffice there).

The k-matrix says both. Row 0 is what the target reviews, row r what drafter r - 1 reviews when it drafts;
column j is drafter j; entry [r][j] is how many tokens of a block drafter j contributes, in column order. A
reviewer takes drafts only from drafters smaller than itself (entries left of the diagonal are 0), and a
statistical drafter (MaG, n-gram) reviews nothing (its row, if given, is all 0). Example, drafters
(student, mag) and k-matrix 4,2/0,3: the target reviews 4 student tokens then 2 MaG tokens; the student drafts
its 4 tokens by reviewing blocks of 3 MaG tokens.

Lossless at the top: every drafted token comes with the exact distribution it was drawn from (the acceptance
rule's Verdict reports it for a model level; a deterministic drafter's is a point mass), which is the q the
target's rejection sampling needs. Greedy output is the target's greedy output whatever the levels below do.

Configuration (no strings evaluated): `cascade` (defaults), `cascade:4,2/0,3` (a k-matrix for the default
drafters) or `cascade:FILE.toml` holding
    drafters = ["student", "mag"]      # largest first: any --drafter spec of a model, `mag[:FILE]` or `ngram`
    k_matrix = [[4, 2], [0, 3]]
    leniency = 1.0                     # the reviews below the top; one number, or one per row from row 1
    leniency_rule = "argmax"           # argmax: p(x) >= max p / l (ours); upstream: p(x) > q(x) / l (CS-Drafting's)

`cascade:upstream` is the cascade as the upstream code configures it: two draft models above MaG (the shipped
student, then the student's first 3 layers), its k-matrix [[5, 14, 10], [0, 1, 10], [0, 0, 10]], leniency 2 by
its rule; `cascade:upstream-l4` (any number >= 1 after `-l`) changes only the leniency.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draftsmith.acceptance import LENIENCY_RULES, SamplingConfig, acceptance_rule
from draftsmith.draft import Draft
from draftsmith.drafters.base import Drafter
from draftsmith.errors import ConfigError
from draftsmith.step import Stats, speculative_step
from draftsmith.target_runner import TargetRunner

DEFAULT_DRAFTERS = ("student", "mag")
DEFAULT_K_MATRIX = ((4, 2), (0, 3))
# upstream's main.py: FLAN-T5 base and small above MaG; here the student and its first 3 layers (no training)
UPSTREAM_DRAFTERS = ("student", "student:layers=3", "mag")
UPSTREAM_K_MATRIX = ((5, 14, 10), (0, 1, 10), (0, 0, 10))
UPSTREAM_LENIENCY = 2.0


@dataclass
class CascadeConfig:
    drafters: list[str] = field(default_factory=lambda: list(DEFAULT_DRAFTERS))
    k_matrix: list[list[int]] = field(default_factory=lambda: [list(row) for row in DEFAULT_K_MATRIX])
    leniency: float | list[float] = 1.0
    leniency_rule: str = "argmax"

    def __post_init__(self) -> None:
        if self.leniency_rule not in LENIENCY_RULES:
            raise ConfigError(f"leniency_rule must be one of {', '.join(LENIENCY_RULES)}, got '{self.leniency_rule}'")
        n = len(self.drafters)
        if n == 0:
            raise ConfigError("a cascade needs at least one drafter")
        if not self.k_matrix or len(self.k_matrix) > n:
            raise ConfigError(f"the k-matrix needs 1 to {n} rows (row 0: the target's review, row r: drafter r-1's), "
                              f"got {len(self.k_matrix)}")
        for r, row in enumerate(self.k_matrix):
            if len(row) != n or not all(isinstance(x, int) and x >= 0 for x in row):
                raise ConfigError(f"k-matrix row {r} must hold {n} counts >= 0 (one per drafter), got {row}")
            if any(row[:r]):
                raise ConfigError(f"k-matrix row {r} (drafter {r - 1}'s reviews) takes tokens from a drafter not "
                                  f"smaller than drafter {r - 1}: entries before column {r} must be 0, got {row}")
        if sum(self.k_matrix[0]) == 0:
            raise ConfigError("k-matrix row 0 (what the target reviews) drafts nothing")
        self.k_matrix = [list(row) for row in self.k_matrix] + [[0] * n for _ in range(n - len(self.k_matrix))]
        lenient = self.leniency if isinstance(self.leniency, list) else [self.leniency] * (n - 1)
        if len(lenient) != n - 1 or any(not isinstance(x, int | float) or x < 1 for x in lenient):
            raise ConfigError(f"leniency: one number >= 1, or one per reviewing drafter ({n - 1}), got {self.leniency}")
        self.leniency = [float(x) for x in lenient]


def parse_cascade(spec: str) -> CascadeConfig:
    """`` (defaults), `upstream[-lL]` (upstream's configuration, leniency L), `R0/R1/...` (k-matrix rows of
    comma-separated counts) or a .toml file."""
    if not spec:
        return CascadeConfig()
    if spec.startswith("upstream"):
        leniency = spec.removeprefix("upstream").removeprefix("-l") or str(UPSTREAM_LENIENCY)
        try:
            leniency_value = float(leniency)
        except ValueError:
            raise ConfigError(f"cascade:{spec}: write upstream, or upstream-lL with a leniency L >= 1, "
                              "e.g. upstream-l4") from None
        return CascadeConfig(list(UPSTREAM_DRAFTERS), [list(row) for row in UPSTREAM_K_MATRIX], leniency_value,
                             "upstream")
    if spec.endswith(".toml"):
        path = Path(spec)
        if not path.is_file():
            raise ConfigError(f"cascade configuration not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from e
        unknown = set(data) - {"drafters", "k_matrix", "leniency", "leniency_rule"}
        if unknown:
            raise ConfigError(f"{path}: unknown keys {sorted(unknown)} (use drafters, k_matrix, leniency, leniency_rule)")
        return CascadeConfig(**data)
    try:
        rows = [[int(x) for x in row.split(",")] for row in spec.split("/")]
    except ValueError:
        raise ConfigError(f"cannot read the k-matrix '{spec}': rows of comma-separated counts separated by '/', "
                          "e.g. 4,2/0,3, upstream[-lL] or a .toml file") from None
    return CascadeConfig(k_matrix=rows)


class Horizontal:
    """One row of the k-matrix as a drafter: drafter j's count of tokens, in column order, each continuing the
    tokens before it. Distributions: a model level's as its acceptance rule reports them, point masses for the
    deterministic drafters (when sampling, or for a reviewer whose rule weighs q: `with_probs`)."""

    def __init__(self, parts: list[tuple[Drafter, int]], vocab_size: int, with_probs: bool = False):
        self.parts = [(drafter, n) for drafter, n in parts if n > 0]
        self.vocab_size, self.with_probs = vocab_size, with_probs
        self.greedy = True
        # per part: tokens it proposed, and those its reviewer accepted (read from the next context it is given)
        self.proposed = [0] * len(self.parts)
        self.accepted = [0] * len(self.parts)
        self._last: tuple[int, list[int], list[int]] | None = None  # (context length, tokens, part of each)

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.greedy = sampling.greedy
        self.proposed, self.accepted, self._last = [0] * len(self.parts), [0] * len(self.parts), None

    def propose(self, context: list[int], k: int) -> Draft:
        self._count_accepted(context)
        tokens, probs, owner = [], [], []
        for index, (drafter, n) in enumerate(self.parts):
            n = min(n, k - len(tokens))
            if n <= 0:
                break
            draft = drafter.propose(context + tokens, n)
            tokens += draft.tokens
            owner += [index] * len(draft)
            self.proposed[index] += len(draft)
            if (self.with_probs or not self.greedy) and len(draft):
                probs.append(draft.probs[:, : self.vocab_size] if draft.probs is not None
                             else torch.nn.functional.one_hot(torch.tensor(draft.tokens), self.vocab_size).float())
        self._last = (len(context), tokens, owner)
        return Draft(tokens=tokens, probs=torch.cat([p.float().cpu() for p in probs]) if probs else None)

    def _count_accepted(self, context: list[int]) -> None:
        """Credit the previous draft's tokens that the context now holds (the reviewer accepted them)."""
        if self._last is None:
            return
        start, tokens, owner = self._last
        for i, token in enumerate(tokens):
            if start + i >= len(context) or context[start + i] != token:
                break
            self.accepted[owner[i]] += 1


class ReviewingLevel:
    """A draft model that drafts k tokens by running the speculative step over its own KV cache, its drafter
    being the row of the k-matrix below it and its rule the (lenient) acceptance rule; with nothing below it,
    the same step drafts one token per forward."""

    def __init__(self, name: str, model, below: Horizontal | None, leniency: float, vocab_size: int,
                 leniency_rule: str = "argmax"):
        self.name, self.below, self.leniency, self.leniency_rule = name, below, leniency, leniency_rule
        self.runner = TargetRunner(model)
        self.runner.vocab_size = vocab_size  # a draft model's padded logits beyond the target's ids are never drafted
        self.stats = Stats()
        self.generator, self.rule = None, acceptance_rule(SamplingConfig())

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.generator, self.rule = generator, acceptance_rule(sampling, self.leniency, self.leniency_rule)
        self.runner.prefill(prompt_ids)
        self.stats = Stats(prompt_tokens=len(prompt_ids))
        if self.below is not None:
            self.below.reset(prompt_ids, sampling, generator)

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> Draft:
        self.runner.sync(context)
        context, tokens, dists = list(context), [], []
        while len(tokens) < k:
            lower_k = k - len(tokens) - 1 if self.below is not None else 0  # the step's own token is the k-th
            step = speculative_step(self.below, self.runner, self.rule, context, lower_k, self.generator, self.stats)
            tokens += step.tokens
            context += step.tokens
            if step.verdict.dists is not None:
                dists.append(step.verdict.dists)
        self.stats.new_tokens += len(tokens)
        return Draft(tokens=tokens, probs=torch.cat(dists).float().cpu() if dists else None)


class CascadeDrafter(Drafter):
    """Row 0 of the k-matrix over the levels: the drafter the target's engine sees."""

    name = "cascade"

    def __init__(self, levels: list[Drafter], config: CascadeConfig, vocab_size: int):
        self.levels, self.config = levels, config
        self.top = Horizontal(list(zip(levels, config.k_matrix[0])), vocab_size)
        self.max_k = sum(config.k_matrix[0])

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.top.reset(prompt_ids, sampling, generator)
        for level in self.levels:
            level.reset(prompt_ids, sampling, generator)

    def propose(self, context: list[int], k: int) -> Draft:
        return self.top.propose(context, min(k, self.max_k))

    def statistics(self) -> dict[str, float]:
        """Per drafter: tokens it proposed to the target and those accepted (the last step's verdict is not yet
        known to the drafter); per reviewing level: its own steps, proposals, acceptances and tokens per step."""
        out: dict[str, float] = {}
        for (drafter, _), proposed, accepted in zip(self.top.parts, self.top.proposed, self.top.accepted):
            out[f"{drafter.name}_to_target_proposed"] = proposed
            out[f"{drafter.name}_to_target_accepted"] = accepted
        for level in self.levels:
            if isinstance(level, ReviewingLevel) and level.below is not None:
                out[f"{level.name}_steps"] = level.stats.target_steps
                out[f"{level.name}_proposed"] = level.stats.proposed
                out[f"{level.name}_accepted"] = level.stats.accepted
                out[f"{level.name}_acceptance"] = round(level.stats.acceptance_rate, 4)
        return out


def build_cascade(config: CascadeConfig, build_level, vocab_size: int) -> CascadeDrafter:
    """`build_level(spec)` returns ("model", model) for a draft model or ("drafter", drafter) for a
    statistical one (drafters.build_drafter's resolution, injected to keep this module free of model loading)."""
    built = [build_level(spec) for spec in config.drafters]
    kinds = [spec.partition(":")[0] for spec in config.drafters]
    levels: list[Drafter | None] = [None] * len(built)
    # the smallest first: a reviewing level needs the row below it built over the smaller levels
    for j in reversed(range(len(built))):
        kind, obj = built[j]
        row = config.k_matrix[j + 1] if j + 1 < len(config.k_matrix) else [0] * len(built)
        if kind == "drafter":
            if any(row):
                raise ConfigError(f"k-matrix row {j + 1}: '{config.drafters[j]}' is not a model and reviews nothing; "
                                  "its row must be all 0")
            levels[j] = obj
            continue
        weighs_q = config.leniency_rule == "upstream" and config.leniency[j] > 1  # greedy drafts then carry q
        below = Horizontal(list(zip(levels, row)), vocab_size, with_probs=weighs_q) if any(row) else None
        name = kinds[j] if kinds.count(kinds[j]) == 1 else f"{kinds[j]}{j + 1}"
        levels[j] = ReviewingLevel(name, obj, below, config.leniency[j], vocab_size, config.leniency_rule)
    return CascadeDrafter(levels, config, vocab_size)
