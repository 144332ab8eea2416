"""Any transformers causal LM through its own forward, over a DynamicCache cropped on rollback."""

from __future__ import annotations

import contextlib

import torch
from transformers import DynamicCache, PreTrainedModel

from draftsmith.backends.protocol import Forward
from draftsmith.errors import ConfigError


class HFCachedLM:
    """Sliding-window layers (Gemma 3, ...) keep only their window, so a rollback past it needs the states they
    dropped: the cache records them until each step's crop, which then trims the window back."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.feature_layers: tuple[int, ...] = ()  # see LeanLayers.feature_layers
        self.reset()

    def reset(self, capacity: int = 0) -> None:
        self.cache, self.length = DynamicCache(config=self.model.config), 0
        self.cache.activate_past_recording()

    @torch.inference_mode()
    def forward(
        self, ids: list[int], positions: list[int] | None = None, tree_mask: torch.Tensor | None = None,
        last_only: bool = False, features: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Float32 logits [n, vocab] (or [1, vocab] with last_only) for tokens fed after the cache; with
        `features`, also the last layer's hidden states [n, hidden] (every row, before the final norm)."""
        if features:
            with last_hidden_states(self.model, self.feature_layers) as captured:
                logits = self.forward(ids, positions, tree_mask, last_only)
            return Forward(logits, torch.cat(captured, dim=-1)[0])
        device = self.model.device
        kwargs = {"logits_to_keep": 1} if last_only else {}
        if tree_mask is not None:
            kwargs["attention_mask"] = self._tree_attention_mask(tree_mask.cpu(), positions)
        if positions is not None:
            kwargs["position_ids"] = torch.tensor([positions], device=device)
        out = self.model(input_ids=torch.tensor([ids], device=device), past_key_values=self.cache, use_cache=True,
                         **kwargs)
        self.length += len(ids)
        return out.logits[0].float()

    def _tree_attention_mask(self, tree_mask: torch.Tensor, positions: list[int]) -> torch.Tensor | dict:
        """Additive [1, 1, n, keys] masks: a tree's nodes see the cache, their ancestors and themselves.
        Sliding-window layers hold only the last window - 1 cached keys, and a node sees only keys less than a
        window behind it; models mixing both kinds of layer take one mask per layer type."""
        n, config = len(positions), self.model.config
        layer_types = set(getattr(config, "layer_types", None) or  # as transformers' cache infers them
                          ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"])
        if not layer_types <= {"full_attention", "sliding_attention"}:
            raise ConfigError(f"tree drafts are not supported on {sorted(layer_types)} layers: use a chain drafter")
        allowed = torch.ones(n, self.length + n, dtype=torch.bool)
        allowed[:, self.length :] = tree_mask
        masks = {"full_attention": allowed}
        if "sliding_attention" in layer_types:
            window = config.sliding_window
            held = min(self.length, window - 1)
            key_positions = torch.cat([torch.arange(self.length - held, self.length), torch.tensor(positions)])
            in_window = torch.tensor(positions)[:, None] - key_positions[None] < window
            masks["sliding_attention"] = allowed[:, self.length - held :] & in_window
        masks = {kind: self._additive(mask) for kind, mask in masks.items() if kind in layer_types}
        return masks if len(masks) > 1 else next(iter(masks.values()))

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[None, None].to(self.model.device)

    @torch.inference_mode()
    def keep(self, start: int, offsets: list[int]) -> None:
        """Keep entries start + offsets (in that order) at start, start + 1, ...; drop everything after them."""
        if offsets != list(range(len(offsets))):
            kept = torch.tensor(offsets, device=self.model.device) + start
            for layer in self.cache.layers:
                if not getattr(layer, "is_initialized", True):  # a layer sharing another's states
                    continue
                shift = layer.keys.shape[-2] - self.length  # a windowed layer holds only the last positions
                index = kept + shift
                for tensor in (layer.keys, layer.values):
                    tensor[:, :, start + shift : start + shift + len(offsets)] = tensor.index_select(2, index)
        self.truncate(start + len(offsets))

    def truncate(self, length: int) -> None:
        if self.length:  # (transformers cannot crop a windowed layer that was never filled)
            self.cache.crop(-(self.length - length))  # always, even by 0: it also trims windowed layers back
        self.length = length



@contextlib.contextmanager
def last_hidden_states(model: PreTrainedModel, layers: tuple[int, ...] = ()):
    """Capture the input of the model's final norm during a forward: the last layer's hidden states before the
    norm, the features the lean forward returns (transformers' hidden_states[-1] is after the norm). With
    `layers` (ascending ids), the residual stream entering each of those decoder layers instead, in that order
    (transformers' hidden_states[i]; EAGLE-3's features)."""
    captured: list[torch.Tensor] = []
    if layers:
        stack = model.base_model.layers
        hook = lambda module, args, kwargs: captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        handles = [stack[i].register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
    else:
        norm = getattr(model.base_model, "norm", None)
        if norm is None:
            raise ConfigError(f"{model.config.model_type}: no final norm found to take hidden features from")
        handles = [norm.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
