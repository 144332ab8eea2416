"""What the engine asks of a target backend, and the one config that chooses and tunes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch


class Forward(NamedTuple):
    """What a forward with features returns: float32 logits [n, vocab] and the hidden states [n, hidden] the
    drafter reads (the last layer's before the final norm, or the `feature_layers`' inputs concatenated)."""

    logits: torch.Tensor
    hidden: torch.Tensor | None


class CachedLM(Protocol):
    """A causal LM with its KV cache: feed tokens (at given positions, under an optional tree mask), get float32
    logits, keep or drop cache entries by moving `length`."""

    length: int  # cached positions
    feature_layers: tuple[int, ...]  # empty: features are the last layer's; else these layers' inputs (EAGLE-3)

    def reset(self, capacity: int = 0) -> None:
        """Empty the cache, with room for `capacity` positions where the backend preallocates."""

    def forward(self, ids: list[int], positions: list[int] | None = None, tree_mask: torch.Tensor | None = None,
                last_only: bool = False, features: bool = False) -> torch.Tensor | Forward:
        """Float32 logits [n, vocab] (or [1, vocab] with last_only) for tokens fed after the cache; with
        `features`, a `Forward` that also holds their hidden states."""

    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep entries start + offsets (in that order) at start, start + 1, ...; drop everything after them."""

    def truncate(self, length: int) -> None:
        """Drop every entry from `length` on."""


@dataclass(frozen=True)
class BackendConfig:
    """How the target's forward runs: one typed config from the command line to the forward, the same for
    generate, serve and bench."""

    lean: bool = True  # our own Llama-family forward over a static cache; False: transformers' forward
    compile: bool = False  # torch.compile the lean forward (once per process; its time is the runner's compile_s)
    weights: str = "auto"  # the lean forward's weight layout (format_choice.choose_format)
    graphs: bool | None = None  # replay captured CUDA graphs for steps (None: on CUDA below fp32; cuda_graphs.py)
    fused: bool | None = None  # the lean forward's fused CPU kernels (None: on CPU below fp32; fused.py)
