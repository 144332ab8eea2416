"""The target side of one speculative step: score a whole draft in ONE forward over the KV cache, then keep
only the accepted path's cache entries.

The cache holds every committed token except the last one (the root): each step feeds the root plus the draft
nodes, so row 0 of the logits predicts the first draft level and the last accepted row gives the bonus token.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from draftsmith.draft import ROOT, Draft


def tree_attention_mask(draft: Draft, past_length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [1, 1, 1 + n, past + 1 + n]: every node sees the committed prefix, the root and its ancestors."""
    n = len(draft) + 1
    allowed = torch.zeros(n, past_length + n, dtype=torch.bool)
    allowed[:, : past_length + 1] = True  # prefix and root
    for node, parent in enumerate(draft.parent_ids()):
        row = node + 1
        if parent != ROOT:
            allowed[row, past_length : past_length + n] = allowed[parent + 1, past_length : past_length + n]
        allowed[row, past_length + row] = True
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


class TargetRunner:
    """Owns the target model and its KV cache for one request at a time."""

    def __init__(self, model: PreTrainedModel):
        self.model = model
        self.cache = DynamicCache(config=model.config)
        self.length = 0  # committed tokens in the cache

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> None:
        """Start a request: cache every prompt token but the last, which becomes the first root."""
        self.cache = DynamicCache(config=self.model.config)
        self.length = 0
        if len(prompt_ids) > 1:
            self._forward(torch.tensor([prompt_ids[:-1]], device=self.model.device))
            self.length = len(prompt_ids) - 1

    @torch.inference_mode()
    def score(self, root_token: int, draft: Draft) -> torch.Tensor:
        """Logits [1 + len(draft), vocab] for the root and every draft node, in one forward."""
        ids = torch.tensor([[root_token, *draft.tokens]], device=self.model.device)
        if draft.is_chain:
            return self._forward(ids)
        positions = torch.tensor([[0, *draft.depths()]], device=self.model.device) + self.length
        mask = tree_attention_mask(draft, self.length, self.model.dtype, self.model.device)
        return self._forward(ids, position_ids=positions, attention_mask=mask)

    @torch.inference_mode()
    def commit(self, path: list[int]) -> None:
        """Keep the root and the accepted nodes (in path order); drop every other entry of the last step."""
        keep = [0] + [node + 1 for node in path]
        fed = self.cache.get_seq_length() - self.length
        if keep != list(range(len(keep))):  # a tree path that skips siblings: move its entries into place
            index = torch.tensor(keep, device=self.model.device) + self.length
            for layer in self.cache.layers:
                for name in ("keys", "values"):
                    tensor = getattr(layer, name)
                    tensor[:, :, self.length : self.length + len(keep)] = tensor.index_select(2, index)
        self.cache.crop(-(fed - len(keep)))
        self.length += len(keep)

    def _forward(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, **kwargs)
        return out.logits[0].float()
