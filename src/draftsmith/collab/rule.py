"""Acceptance rules between a small drafting model and the large reviewing one, for line completion. Both are
LOSSY by design (they may keep a token the large model would not emit) and review greedy chains.

- CollabRule: a token both models agree on is kept; at a disagreement the classifier decides: the small model's
  token stays when P(small right) > threshold (and reviewing goes on along the chain), else the large model's
  token is emitted and the step ends. A fully kept chain gets the large model's bonus token. Threshold 1 (P is
  never above it) is plain greedy speculative decoding: the output equals the large model's greedy output.
- BildRule (BiLD's rollback): a disagreeing small token stays while the large model's cross-entropy on it,
  -log p_large(token), is below `rollback`. BiLD's fallback is the drafter's `confidence`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from draftsmith.acceptance import AcceptanceRule, Verdict
from draftsmith.collab.classifier import load_classifier
from draftsmith.collab.domains import Domain, SplitConfig, domain_documents, resolve_domain
from draftsmith.collab.features import ContextIndex, CorpusIndex, FeatureBuilder, LineState, Position, token_texts
from draftsmith.collab.finetune import SMALL_FILE, load_small
from draftsmith.draft import Draft
from draftsmith.drafters.model import ModelDrafter
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel, logit_rows


def chain_tokens(draft: Draft) -> list[int]:
    if not draft.is_chain:
        raise ConfigError("the collaborative and BiLD rules review chains (a small model's draft), not trees")
    return draft.tokens


@dataclass
class BildRule(AcceptanceRule):
    rollback: float = 2.0

    def accept(self, draft: Draft, logits: torch.Tensor, generator: torch.Generator | None = None) -> Verdict:
        log_probs = logits.float().log_softmax(-1)
        best = log_probs.argmax(-1).tolist()
        path: list[int] = []
        for i, token in enumerate(chain_tokens(draft)):
            if token != best[i] and -float(log_probs[i, token]) >= self.rollback:
                return Verdict(path, best[i])
            path.append(i)
        return Verdict(path, best[len(path)])


@dataclass
class CollabRule(AcceptanceRule):
    classifier: torch.nn.Module
    builder: FeatureBuilder
    drafter: ModelDrafter  # keep_features: its drafted tokens' hidden states and distributions
    tokenizer: object
    threshold: float = 0.5
    needs_features = True
    asked: int = field(default=0, init=False)  # disagreements reviewed by the classifier
    kept: int = field(default=0, init=False)  # of them, small tokens kept

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"the collaborative threshold must be in [0, 1] (1 = lossless), got {self.threshold}")

    def reset(self, prompt_ids: list[int]) -> None:
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        self.prompt_len = len(prompt_ids)
        self.context, self.line = ContextIndex.of(text, prompt_ids), LineState(text, prompt_ids, self.builder.token_texts)
        self.asked = self.kept = 0

    def statistics(self) -> dict[str, float]:
        return {"classifier_asked": self.asked, "classifier_kept_small": self.kept}

    def accept(self, draft: Draft, logits: torch.Tensor, generator: torch.Generator | None = None, *,
               features: torch.Tensor, context: list[int]) -> Verdict:
        best = logits.argmax(-1).tolist()
        generated = context[self.prompt_len :]
        path: list[int] = []
        for i, token in enumerate(chain_tokens(draft)):
            if token != best[i]:
                if self.threshold >= 1 or self._small_right(i, best[i], token, logits, features, generated) <= self.threshold:
                    return Verdict(path, best[i])
                self.kept += 1
            path.append(i)
            generated = generated + [token]
        return Verdict(path, best[len(path)])

    def _small_right(self, i: int, large: int, small: int, logits: torch.Tensor, features: torch.Tensor,
                     generated: list[int]) -> float:
        self.asked += 1
        line_ids, line_text, in_line = self.line.at(generated)
        vocab = self.drafter.last_probs.shape[-1]
        position = Position(large, small, logits[i, :vocab].float().softmax(-1), self.drafter.last_probs[i],
                            features[i].float(), self.drafter.last_hidden[i], line_ids, line_text, in_line, generated)
        scalars = torch.from_numpy(self.builder.scalars(position, self.context))
        return float(self.classifier.probability(position.large_hidden[None], position.small_hidden[None],
                                                 scalars[None])[0])


def line_end_ids(tokenizer) -> frozenset[int]:
    """Ids whose text holds a line break: a line completion ends with them."""
    return frozenset(i for i, text in enumerate(token_texts(tokenizer)) if "\n" in text)


def folder_domain(folder: Path) -> tuple[Domain, SplitConfig]:
    """The domain (and its split) a collab folder was fine-tuned on, from its collab.json."""
    meta = json.loads((folder / SMALL_FILE).read_text())
    source = Path(meta["source"])
    # a folder made on another machine: its domain's source is found again by name (a default domain, a package)
    here = source.is_absolute() and source.exists()
    domain = Domain(meta["domain"], source) if here else resolve_domain(meta["domain"])
    return domain, SplitConfig(**meta.get("split", {}))


def collab_drafter_and_rule(folder: Path, target: LoadedModel, threshold: float = 0.5
                            ) -> tuple[ModelDrafter, CollabRule]:
    """The fine-tuned small model of a collab folder as a drafter, and the classifier rule reviewing it."""
    small = load_small(folder, target)
    classifier = load_classifier(folder)
    domain, split = folder_domain(folder)
    drafter = ModelDrafter(small, vocab_size=logit_rows(target.model), keep_features=True)
    builder = FeatureBuilder(token_texts(target.tokenizer), CorpusIndex(domain_documents(domain, "finetune", split)))
    return drafter, CollabRule(classifier, builder, drafter, target.tokenizer, threshold)
