"""Layer skipping on the target's own weights: a policy says which layers a token runs (a fixed set found by
measuring acceptance, or trained D-LLM routers), and `SparseStep` runs one token through the target's lean
layers, skipping the others.

A token that skips a layer computes no keys or values there. Its slot in that layer's cache holds whatever was
written before, so every later token is masked off it in that layer ("holes"): no state that was not computed
is ever attended to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from draftsmith.backends.lean import LeanLlama
from draftsmith.errors import ConfigError


class SkipPolicy(Protocol):
    num_layers: int

    def executes(self, layer: int, x: torch.Tensor) -> bool:
        """Whether the token whose input to `layer` is x [1, 1, hidden] runs that layer."""


@dataclass(frozen=True)
class FixedSkip:
    """The same layers skipped for every token (SWIFT / Draft & Verify style self-speculation)."""

    num_layers: int
    skipped: frozenset[int]

    def __post_init__(self) -> None:
        outside = sorted(i for i in self.skipped if not 0 <= i < self.num_layers)
        if outside:
            raise ConfigError(f"layers {outside} do not exist: the model has layers 0..{self.num_layers - 1}")
        if len(self.skipped) >= self.num_layers:
            raise ConfigError("a layer-skipping draft must run at least one layer")

    def executes(self, layer: int, x: torch.Tensor) -> bool:
        return layer not in self.skipped

    @property
    def executed_ratio(self) -> float:
        return 1 - len(self.skipped) / self.num_layers


class SparseStep:
    """One token at a time through a target's lean layers under a skip policy, writing the keys and values of the
    layers it runs into the lean cache at the token's position. Positions from `begin`'s start on are this
    forward's own; the holes it leaves there are masked for the tokens after them."""

    def __init__(self, lm: LeanLlama, policy: SkipPolicy):
        if not isinstance(lm, LeanLlama):
            raise ConfigError("layer skipping runs on the lean forward (Llama-family targets with --lean); "
                              f"this target runs on {type(lm).__name__}")
        if policy.num_layers != len(lm.layers):
            raise ConfigError(f"the skip policy is for {policy.num_layers} layers, the target has {len(lm.layers)}")
        self.lm, self.policy = lm, policy
        self.holes: list[list[int]] = []
        self.cached_holes: torch.Tensor | None = None  # [layers, positions] of the cache before `begin`'s start
        self.layers_run = self.tokens = 0  # running totals, for the executed ratio

    def begin(self, capacity: int, cached_holes: torch.Tensor | None = None) -> None:
        """A new run of tokens: no holes of its own yet; the cache can take positions up to `capacity`.
        `cached_holes`: where the cached context itself has holes (a lossy sparse verifier wrote it), masked too."""
        self.lm._reserve(capacity)
        self.holes = [[] for _ in self.lm.layers]
        self.cached_holes = cached_holes if cached_holes is not None and bool(cached_holes.any()) else None

    @torch.inference_mode()
    def __call__(self, token: int, position: int) -> torch.Tensor:
        """Float32 logits [vocab] after `token` at `position`, which attends to the cache before it."""
        lm = self.lm
        x = lm.embed_tokens(torch.tensor([[token]], device=lm.device))
        rope = lm.rope(torch.tensor([position], device=lm.device))
        for i in range(len(lm.layers)):
            if not self.policy.executes(i, x):
                self.holes[i].append(position)
                continue
            mask = None
            if self.holes[i] or self.cached_holes is not None:
                mask = torch.ones(1, position + 1, dtype=torch.bool, device=lm.device)
                if self.cached_holes is not None:
                    mask[0, : self.cached_holes.shape[1]] = ~self.cached_holes[i]
                mask[0, self.holes[i]] = False
            x = lm.layer(i, x, rope, mask, position)
            self.layers_run += 1
        self.tokens += 1
        return lm.output_logits(x)[0]

    @property
    def executed_ratio(self) -> float:
        return self.layers_run / (self.tokens * len(self.lm.layers)) if self.tokens else 0.0


class RoutedVerify:
    """LOSSY: the target scores drafts (or decodes alone) with its routers deciding per token which layers run,
    as SpaDec's paper verifies; output is the sparse model's, not the target's (the benchmark reports agreement
    and quality). Prefill runs dense. A layer none of the fed tokens runs is skipped outright (where the saving
    is: one-token steps); otherwise it runs on all of them and the skippers keep their input. Either way a
    skipper's slot in that layer becomes a hole, masked for every later token, for as long as it is cached."""

    def __init__(self, routers):
        self.routers = routers
        self.holes = torch.zeros(0, 0, dtype=torch.bool)  # [layers, positions]
        self.layers_run = self.token_layers = 0

    def reset(self, lm: LeanLlama) -> None:
        if not isinstance(lm, LeanLlama):
            raise ConfigError("--lossy-sparse-verify runs on the lean forward (Llama-family targets)")
        if self.routers.num_layers != len(lm.layers):
            raise ConfigError(f"the routers are for {self.routers.num_layers} layers, the target has {len(lm.layers)}")
        self.holes = torch.zeros(len(lm.layers), 0, dtype=torch.bool, device=lm.device)
        self.layers_run = self.token_layers = 0  # per request

    @torch.inference_mode()
    def forward(self, lm: LeanLlama, ids: list[int], positions: list[int], tree_mask: torch.Tensor | None,
                features: bool = False):
        n, start = len(ids), lm.length
        end = start + n
        lm._reserve(end)
        if self.holes.shape[1] < end:
            with torch.inference_mode(False):  # a normal tensor: `keep` updates it outside inference mode
                grown = torch.zeros(len(lm.layers), max(end, 2 * self.holes.shape[1]), dtype=torch.bool,
                                    device=lm.device)
            grown[:, : self.holes.shape[1]] = self.holes
            self.holes = grown
        self.holes[:, start:end] = False
        base = lm.attention_mask(n, start, tree_mask, lm.device)
        if base is None:
            base = torch.ones(n, end, dtype=torch.bool, device=lm.device).tril(start)
        x = lm.embed_tokens(torch.tensor([ids], device=lm.device))
        rope = lm.rope(torch.tensor(positions, device=lm.device))
        for i in range(len(lm.layers)):
            runs = self.routers.decide(i, x)
            runs = torch.ones(n, dtype=torch.bool, device=lm.device) if runs is None else runs[0]
            self.holes[i, start:end] = ~runs
            self.token_layers += n
            if not runs.any():
                continue
            self.layers_run += int(runs.sum())
            out = lm.layer(i, x, rope, base & ~self.holes[i, :end], start)
            x = torch.where(runs[None, :, None], out, x)
        lm.length = end
        logits = lm.output_logits(x)
        return (logits, x[0]) if features else logits

    def keep(self, start: int, offsets: list[int]) -> None:
        """Move the holes with the cache entries the runner keeps."""
        index = torch.tensor(offsets, device=self.holes.device) + start
        self.holes[:, start : start + len(offsets)] = self.holes.index_select(1, index)

    @property
    def executed_ratio(self) -> float:
        return self.layers_run / self.token_layers if self.token_layers else 0.0
