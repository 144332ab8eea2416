"""Drafters: each proposes a Draft for the target to verify. One protocol, one small module each.

A drafter sees only the committed token sequence (prompt + accepted output). That sequence grows by appends
within a request; anything a drafter drafted beyond it was rejected, so it rolls its own state back to it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.draft import Draft
from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from draftsmith.models import LoadedModel


class Drafter(Protocol):
    name: str

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        """A new request starts with this prompt."""

    def propose(self, context: list[int], k: int) -> Draft:
        """Up to k draft tokens continuing `context` (the committed tokens)."""


def build_drafter(spec: str, target: LoadedModel, **options) -> Drafter | None:
    """`none`, `ngram`, or `model:PATH` (a smaller causal LM with the target's tokenizer)."""
    if spec in ("none", "", None):
        return None
    if spec == "ngram":
        from draftsmith.drafters.ngram import NgramDrafter

        return NgramDrafter(**{k: v for k, v in options.items() if k in ("min_n", "max_n")})
    if spec.startswith("model:"):
        from draftsmith.drafters.model import ModelDrafter
        from draftsmith.models import check_same_vocabulary, load_model

        path = spec.removeprefix("model:")
        if not path:
            raise ConfigError("give the draft model after 'model:', e.g. model:runs/student")
        draft = load_model(path, device=str(target.device), dtype=str(target.dtype).removeprefix("torch."))
        check_same_vocabulary(target, draft)
        # a draft model with more logits than the target must not draft ids the target cannot embed
        return ModelDrafter(draft.model, vocab_size=target.model.get_output_embeddings().weight.shape[0])
    raise ConfigError(f"unknown drafter '{spec}': use none, ngram or model:PATH")
