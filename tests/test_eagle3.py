"""EAGLE-3 heads: the target's three layers reach the head on both backends, drafting stays exactly the target's
greedy output (trees, reduced vocabulary, the lookup chain), the lean head computes what the trained module
computes, and a head made for another target is refused with both sides named."""

from __future__ import annotations

import pytest
import torch

from draftsmith.adaptive import CostCurve
from draftsmith.cached_lm import HFCachedLM, LeanLlama
from draftsmith.drafters.eagle import TreeConfig
from draftsmith.drafters.eagle3 import Eagle3Drafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import IncompatibleDrafterError
from draftsmith.heads import Eagle3Head, HeadConfig, load_head, save_head
from tiny_models import hf_greedy, tiny_llama

FLAT = CostCurve([1, 64], [1.0, 1.0])
PROMPTS = [[5, 17, 33, 8, 21, 40, 9], [60, 2, 2, 71, 14], [3]]
NEW = 40
LAYERS = [0, 2, 3]  # of a 4-layer target: the embeddings' stream, and two layers' inputs


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4, num_layers=4)


def eagle3_head(target, seed: int = 0, draft_vocab: int = 0) -> Eagle3Head:
    torch.manual_seed(seed)
    config = HeadConfig.for_target("eagle3", target, draft_vocab=draft_vocab, feature_layers=LAYERS,
                                   target_layers=target.config.num_hidden_layers)
    head = Eagle3Head(config)
    if draft_vocab:
        head.draft_to_target.copy_(torch.randperm(target.config.vocab_size)[:draft_vocab].sort().values)
    head.init_from_target(target)
    return head.eval()


def eagle3(target, seed: int = 0, draft_vocab: int = 0, **tree) -> Eagle3Drafter:
    drafter = Eagle3Drafter(eagle3_head(target, seed, draft_vocab), target, TreeConfig(**tree))
    drafter.costs = FLAT
    return drafter


@pytest.mark.parametrize("lean", [True, False])
def test_both_backends_return_the_inputs_of_the_heads_layers(target, lean):
    """The features are transformers' hidden_states[i] (the residual stream entering layer i), concatenated."""
    lm = LeanLlama(target) if lean else HFCachedLM(target)
    lm.reset(64)
    lm.feature_layers = tuple(LAYERS)
    ids = PROMPTS[0]
    _, features = lm.forward(ids, features=True)
    with torch.no_grad():
        states = target(torch.tensor([ids]), output_hidden_states=True).hidden_states
    want = torch.cat([states[i][0] for i in LAYERS], dim=-1)
    torch.testing.assert_close(features, want, atol=1e-5, rtol=1e-5)
    _, step = lm.forward([7], features=True)  # a step after the cache: its own row
    assert step.shape == (1, 3 * target.config.hidden_size)


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("make", [
    lambda t: eagle3(t, depth=4, top_k=3),
    lambda t: eagle3(t, depth=5, top_k=1),
    lambda t: eagle3(t, draft_vocab=40, depth=3, top_k=4),
])
def test_eagle3_drafting_is_exact(target, lean, make):
    engine = SpecEngine(target, make(target), lean=lean)
    for prompt in PROMPTS:
        for k in (1, 24):
            result = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=k))
            assert result.tokens == hf_greedy(target, prompt, NEW), (prompt, k)


def test_eagle3_with_the_lookup_chain_is_exact(target):
    from draftsmith.drafters.merged import TreeWithLookup
    from draftsmith.drafters.ngram import NgramDrafter

    engine = SpecEngine(target, TreeWithLookup(eagle3(target, depth=3, top_k=2), NgramDrafter(), max_chain=8))
    for prompt in ([7, 8, 9, 10, 11, 12] * 4 + [7, 8], PROMPTS[0]):
        result = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=24))
        assert result.tokens == hf_greedy(target, prompt, NEW)


def test_the_lean_eagle3_head_computes_what_the_trained_module_computes(target):
    """Verification repairs any draft, so the decode-time layer (the pair through the lean cache, the target's
    features fused, then a node reading its parent's output) is checked against the training module."""
    from transformers import DynamicCache

    drafter = eagle3(target, draft_vocab=30)
    head = drafter.head
    torch.manual_seed(1)
    n, hidden = 6, target.config.hidden_size
    features, tokens = torch.randn(n, 3 * hidden), torch.randint(0, target.config.vocab_size, (n,))
    lean = drafter._run(features, tokens, torch.arange(1, n + 1), torch.ones(n, n, dtype=torch.bool).tril())
    cache = DynamicCache()
    with torch.no_grad():
        module = head(features[None], drafter.parts.embed_tokens(tokens)[None], torch.arange(1, n + 1)[None], None,
                      cache)[0]
    torch.testing.assert_close(lean, module, atol=1e-4, rtol=1e-4)
    allowed = torch.zeros(2, n + 2, dtype=torch.bool)
    allowed[:, :n] = True
    allowed[torch.arange(2), n + torch.arange(2)] = True
    node_tokens = torch.randint(0, target.config.vocab_size, (2,))
    lean_nodes = drafter._run(lean[-2:], node_tokens, torch.full((2,), n + 1), allowed)
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.no_grad():
        module_nodes = head(module[-2:][None], drafter.parts.embed_tokens(node_tokens)[None], torch.full((1, 2), n + 1),
                            additive[None, None], cache)[0]
        want_logits = head.logits(module_nodes)
    torch.testing.assert_close(lean_nodes, module_nodes, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(drafter._logits(lean_nodes).float(), want_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("other, named", [
    (dict(hidden_size=64), "hidden size 64"),
    (dict(num_layers=6), "6 layers"),
    (dict(vocab_size=90), "90 output rows"),
])
def test_a_head_for_another_target_is_refused_with_both_sides_named(tmp_path, target, other, named):
    save_head(eagle3_head(target, draft_vocab=30), tmp_path / "head")
    again = load_head(tmp_path / "head", target)
    assert again.config.feature_layers == LAYERS
    with pytest.raises(IncompatibleDrafterError) as error:
        load_head(tmp_path / "head", tiny_llama(seed=1, **{"num_layers": 4, **other}))
    message = str(error.value)
    assert named in message
    assert "hidden size 32, 4 layers" in message and str(target.config.vocab_size) in message
