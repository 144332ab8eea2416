"""`layerskip:auto`: choose which of the target's layers its self-draft skips, training-free, by measured
acceptance on held-out prompts (the idea of Draft & Verify and SWIFT; the search here is our own).

Acceptance is measured as the draft runs it: each position's token goes through the kept layers only, attending
to the DENSE keys and values of the context before it (the draft reads the target's own cache), and its argmax
is compared with the token the dense target wrote there. All positions of a sequence are scored in one batched
pass per layer set, so a candidate set costs about one prefill of the generated part.

Search: rank layers by the agreement left when each alone is skipped, then score the sets that skip the 1, 2, 3,
... lowest-ranked layers; keep the set of best expected speed, from the measured agreement a (chains of a
geometric acceptance), the target's measured cost curve and the draft's per-token cost (the target's one-token
step scaled by the share of weights it multiplies). The choice is cached on disk per model, dtype and machine.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import asdict, dataclass

import torch

from draftsmith.adaptive import CostCurve, calibration_key
from draftsmith.backends.lean import LeanLlama
from draftsmith.errors import ConfigError
from draftsmith.paths import cached_entry
from draftsmith.progress import Bar
from draftsmith.sparse import FixedSkip


SEARCH_VERSION = 2  # part of the cache key: bump when the search or its objective changes


@dataclass
class SkipSearchConfig:
    prompts: int = 4  # held-out function prompts of the corpus (never a benchmark's)
    new_tokens: int = 64  # dense greedy tokens written per prompt: the positions scored
    max_skipped_share: float = 0.7  # never skip more than this share of the layers
    max_k: int = 8  # longest draft chain considered for the expected speed
    corpus: str | None = None  # default: the Python standard library
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.new_tokens < 2:
            raise ConfigError("the layer search needs at least 1 prompt and 2 new tokens per prompt")
        if not 0 < self.max_skipped_share < 1:
            raise ConfigError(f"max_skipped_share must be in (0, 1), got {self.max_skipped_share}")


@dataclass
class DenseContext:
    """One held-out sequence with the dense target's keys and values at every layer."""

    ids: torch.Tensor  # [T]
    first: int  # positions first..T-2 predict generated tokens
    keys: torch.Tensor  # [layers, kv heads, T, d]
    values: torch.Tensor


def dense_contexts(lm: LeanLlama, sequences: list[tuple[list[int], int]]) -> list[DenseContext]:
    """Run each (tokens, index of the first generated token) densely once and keep its cache."""
    contexts = []
    for ids, first_generated in sequences:
        lm.reset(len(ids))
        lm.forward(ids, last_only=True)
        keys, values = lm.k_cache[:, :, : len(ids)].clone(), lm.v_cache[:, :, : len(ids)].clone()
        contexts.append(DenseContext(torch.tensor(ids), first_generated - 1, keys, values))
    lm.reset(0)
    return contexts


@torch.inference_mode()
def first_draft_agreement(lm: LeanLlama, contexts: list[DenseContext], skipped: set[int]) -> float:
    """Share of generated positions where the draft that skips `skipped` (over the dense context) predicts the
    dense target's token."""
    hits = total = 0
    group = lm.n_heads // lm.n_kv
    for ctx in contexts:
        positions = torch.arange(ctx.first, len(ctx.ids) - 1, device=lm.device)
        x = lm.embed_tokens(ctx.ids[positions].to(lm.device))[None]
        rope = lm.rope(positions)
        before = positions[:, None] > torch.arange(len(ctx.ids), device=lm.device)[None]  # key j strictly before
        for i in range(len(lm.layers)):
            if i in skipped:
                continue
            q, k, v = lm.qkv(i, x, rope)
            keys = ctx.keys[i][None].repeat_interleave(group, 1)
            values = ctx.values[i][None].repeat_interleave(group, 1)
            scale = lm.head_dim**-0.5
            context_scores = (q.float() @ keys.float().transpose(-1, -2) * scale).masked_fill(~before, float("-inf"))
            own_score = (q.float() * k.float().repeat_interleave(group, 1)).sum(-1, keepdim=True) * scale
            weights = torch.cat([context_scores, own_score], -1).softmax(-1)
            attn = weights[..., :-1] @ values.float() + weights[..., -1:] * v.float().repeat_interleave(group, 1)
            x = lm.mix(i, x, attn.to(lm.product_dtype))
        predicted = lm.output_logits(x).argmax(-1).cpu()
        hits += int((predicted == ctx.ids[positions.cpu() + 1]).sum())
        total += len(positions)
    return hits / total


def expected_rate(agreement: float, draft_cost: float, costs: CostCurve, max_k: int) -> tuple[float, int]:
    """Best tokens per second over chain lengths 1..max_k, and that length, for a geometric acceptance (k = 0,
    plain decoding, never: the search compares drafts with each other; the speedup says whether one pays)."""
    a = min(agreement, 0.99)
    best = (0.0, 1)
    for k in range(1, max_k + 1):
        rate = (1 - a ** (k + 1)) / (1 - a) / (costs(k + 1) + k * draft_cost)
        best = max(best, (rate, k))
    return best


def draft_cost_share(lm: LeanLlama, skipped: set[int]) -> float:
    """The draft's per-token cost as a share of the dense step's: weights multiplied (layers run + head)."""
    layer = sum(w.numel() for name, w in lm.model.model.layers[0].named_parameters() if "proj" in name)
    head = lm.model.lm_head.weight.numel()
    run = len(lm.layers) - len(skipped)
    return (run * layer + head) / (len(lm.layers) * layer + head)


def search_skipped_layers(lm: LeanLlama, sequences: list[tuple[list[int], int]], costs: CostCurve,
                          config: SkipSearchConfig, progress: bool = True) -> dict:
    """The layer set to skip, with what was measured. See the module docstring."""
    contexts = dense_contexts(lm, sequences)
    n = len(lm.layers)
    trials = n + int(config.max_skipped_share * n)
    with Bar(disable=not progress, transient=True) as bar:
        task = bar.add_task("measuring layer skips", total=trials)
        alone = {}
        for layer in range(n):
            alone[layer] = first_draft_agreement(lm, contexts, {layer})
            bar.advance(task)
        order = sorted(range(n), key=lambda layer: -alone[layer])
        tried = []
        for count in range(1, int(config.max_skipped_share * n) + 1):
            skipped = set(order[:count])
            agreement = first_draft_agreement(lm, contexts, skipped)
            rate, k = expected_rate(agreement, costs(1) * draft_cost_share(lm, skipped), costs, config.max_k)
            tried.append({"skipped": sorted(skipped), "agreement": agreement, "expected_tokens_per_s": rate, "k": k})
            bar.advance(task)
    best = max(tried, key=lambda t: t["expected_tokens_per_s"])
    if best["expected_tokens_per_s"] * costs(1) < 1:
        warnings.warn(f"layerskip:auto: no skip set is expected to beat plain decoding on this machine (best: "
                      f"{len(best['skipped'])} layers skipped, agreement {best['agreement']:.2f}, expected "
                      f"x{best['expected_tokens_per_s'] * costs(1):.2f}): verifying a chain costs too much more than "
                      "a one-token step here", stacklevel=2)
    return {"skipped": best["skipped"], "agreement": best["agreement"], "k": best["k"],
            "expected_speedup": best["expected_tokens_per_s"] * costs(1), "tried": tried,
            "skip_alone": alone, "positions": sum(len(c.ids) - 1 - c.first for c in contexts)}


def heldout_sequences(model, tokenizer, config: SkipSearchConfig) -> list[tuple[list[int], int]]:
    """The dense target's greedy continuations of held-out function prompts (tokens, first generated index)."""
    from draftsmith.data.corpus import load_corpus
    from draftsmith.data.onpolicy import function_prompts, prompt_ids
    from draftsmith.engine import GenerationConfig, SpecEngine

    docs = load_corpus(config.corpus, split="heldout")
    prompts = function_prompts(docs)
    if not prompts:
        raise ConfigError(f"no documented functions in the held-out corpus {config.corpus or 'stdlib'}")
    random.Random(config.seed).shuffle(prompts)
    engine = SpecEngine(model, None)
    sequences = []
    for code in prompts[: config.prompts]:
        ids = prompt_ids(tokenizer, code, chat=False)[-256:]
        out = engine.generate(ids, GenerationConfig(max_new_tokens=config.new_tokens, k=0, stop_on_eos=False))
        sequences.append((ids + out.tokens, len(ids)))
    return sequences


def auto_skip(model, tokenizer, lm: LeanLlama, costs: CostCurve, config: SkipSearchConfig | None = None,
              refresh: bool = False) -> FixedSkip:
    """The cached layer set of `layerskip:auto` for this model (searched on first use, then read from disk)."""
    config = config or SkipSearchConfig()
    key = f"search{SEARCH_VERSION}-{calibration_key(model, 'lean')}-{json.dumps(asdict(config), sort_keys=True)}"
    search = lambda: search_skipped_layers(lm, heldout_sequences(model, tokenizer, config), costs, config)  # noqa: E731
    return FixedSkip(len(lm.layers), frozenset(cached_entry("layerskip.json", key, search, refresh)["skipped"]))
