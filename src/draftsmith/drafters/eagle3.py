"""EAGLE-3 drafting (`--drafter eagle3[:DIR]`): the EAGLE drafter's dynamic trees, with EAGLE-3's head.

What differs from `eagle` is only what the head reads and how it decodes (see heads.Eagle3Head): the target
hands over the residual stream entering three of its layers (the lean forward and the transformers backend
return them concatenated once told which, in `bind`), the head fuses them (3H -> H) and reads the pair
[embedding of the next token ; feature] in its layer, and decodes through its own norm and output head. Inside
a draft tree a node reads its parent's output (H), which is not fused again.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from draftsmith.backends.layers import LeanLayers
from draftsmith.drafters.eagle import EagleDrafter, TreeConfig
from draftsmith.errors import ConfigError
from draftsmith.heads import Eagle3Head


class Eagle3Layers(LeanLayers):
    """EAGLE-3's decoder layer over the lean cache. Its input x is [embedding ; feature] ([1, n, 2H]): queries,
    keys and values read both halves, each normed by its own weight, and the feature half is the residual."""

    def _qkv_rows(self, i: int, x: torch.Tensor) -> torch.Tensor:
        w, half = self.layers[i], x.shape[-1] // 2
        pair = torch.cat([self.norm(x[..., :half], w["attn_norm"]), self.norm(x[..., half:], w["hidden_norm"])], dim=-1)
        return self._mm(pair, w["wqkv"])

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., x.shape[-1] // 2 :]


class Eagle3Drafter(EagleDrafter):
    name = "eagle3"
    layers_class = Eagle3Layers

    def __init__(self, head: Eagle3Head, target: PreTrainedModel, tree: TreeConfig | None = None,
                 graphs: bool | None = None):
        super().__init__(head, target, tree, graphs)
        fmt = self.layers.weights
        self.layers.layers[0]["hidden_norm"] = fmt.norm_weight(head.hidden_norm.weight.detach())
        self.final_norm = fmt.norm_weight(head.norm.weight.detach())
        self.head_rows = fmt.prepare(head.lm_head.weight.detach())  # its own output head, not the target's rows
        self.feature_layers = tuple(head.config.feature_layers)

    def bind(self, runner) -> None:
        """Have the target's forward return the residual stream entering the head's three layers."""
        if not hasattr(runner.lm, "feature_layers"):
            raise ConfigError("eagle3 reads the target's middle layers, which the torch backends give (not llama.cpp's)")
        if runner.pruner is not None or runner.sparse_verify is not None:
            raise ConfigError("eagle3 reads the target's middle layers: it does not combine with a predictor or "
                              "sparse verification, which split the target's forward")
        runner.lm.feature_layers = self.feature_layers

    def _fuse(self, features: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """[1, new, 2H]: the pairs [embedding of the next token ; feature], the target's three layers fused."""
        dtype = self.layers.stream_dtype
        hidden = features[None].to(self.dtype)
        if hidden.shape[-1] != self.head.config.hidden_size:
            hidden = self.layers.weights.multiply(hidden, self.fc_weight)
        return torch.cat([token_embeds[None].to(dtype), hidden.to(dtype)], dim=-1)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers.weights.multiply(self.layers.norm(features, self.final_norm), self.head_rows)
