"""Feature-head drafters (EAGLE-style, Medusa): exact greedy output against HF generate on both backends, with
chains and trees, rejected and accepted drafts, EOS inside a tree and the token budget; the sampling test over
trees; training (the loss falls, resume is exact); folders round-trip."""

from __future__ import annotations

import pytest
import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.adaptive import CostCurve, best_tree_size
from draftsmith.backends.protocol import BackendConfig
from draftsmith.draft import Draft, DraftError
from draftsmith.drafters.base import Drafter
from draftsmith.drafters.eagle import EagleDrafter, TreeConfig
from draftsmith.drafters.medusa import MedusaDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import IncompatibleDrafterError
from draftsmith.heads import EagleHead, HeadConfig, MedusaHeads, load_head, save_head
from tiny_models import hf_greedy, tiny_llama

FLAT = CostCurve([1, 64], [1.0, 1.0])  # verification costs the same for any size: trees take the whole budget
PROMPTS = [[5, 17, 33, 8, 21, 40, 9], [60, 2, 2, 71, 14], [3]]
NEW = 40


def eagle(target, seed: int = 0, draft_vocab: int = 0, **tree) -> EagleDrafter:
    torch.manual_seed(seed)
    head = EagleHead(HeadConfig.for_target("eagle", target, draft_vocab=draft_vocab)).eval()
    if draft_vocab:
        head.draft_to_target.copy_(torch.randperm(target.config.vocab_size)[:draft_vocab].sort().values)
    drafter = EagleDrafter(head, target, TreeConfig(**tree))
    drafter.costs = FLAT
    return drafter


def medusa(target, seed: int = 0, paths=None) -> MedusaDrafter:
    torch.manual_seed(seed)
    heads = MedusaHeads(HeadConfig.for_target("medusa", target, medusa_heads=3)).eval()
    for block in heads.blocks:  # random, not identity: heads that disagree with the target
        torch.nn.init.normal_(block.weight, std=0.3)
    return MedusaDrafter(heads, target, paths)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4)


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("make", [
    lambda t: eagle(t, depth=4, top_k=3),  # a tree
    lambda t: eagle(t, depth=5, top_k=1),  # a chain-shaped tree
    lambda t: eagle(t, draft_vocab=40, depth=3, top_k=4),  # reduced draft vocabulary
    lambda t: medusa(t),
    lambda t: medusa(t, paths=[[0], [1], [2], [0, 0], [1, 0], [0, 0, 0], [0, 1]]),
])
def test_head_drafters_are_exact(target, lean, make):
    engine = SpecEngine(target, make(target), backend=BackendConfig(lean=lean))
    for prompt in PROMPTS[:2]:
        for k in (1, 24):
            result = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=k))
            assert result.tokens == hf_greedy(target, prompt, NEW), (prompt, k)
            assert result.stats.target_steps <= NEW


def test_a_head_that_learned_the_target_gets_accepted_and_stays_exact(target):
    """A Medusa head whose first block is trained on this target's own features gets drafts accepted, so
    the accepted-path and bonus-token cases run, not only rejections."""
    drafter = medusa(target, paths=[[0], [1], [2], [3]])
    drafter.heads.blocks[0].weight.data.zero_()
    drafter.heads.blocks[0].bias.data.zero_()
    # identity block: head 0 predicts the distribution at the feature's own position, i.e. the root's token;
    # the first level then holds the target's top tokens for the root, its next token among them
    shifted = _OneAheadMedusa(drafter, target)
    engine = SpecEngine(target, shifted)
    prompt = PROMPTS[0]
    result = engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=4))
    assert result.tokens == hf_greedy(target, prompt, NEW)
    assert result.stats.accepted > NEW // 4  # most steps accept a node


class _OneAheadMedusa(Drafter):
    """Wraps a Medusa drafter so that its tree is built from the ROOT's true next-token distribution (computed
    with the target itself, as a test oracle): first-level nodes are the target's top-4 for the next token."""

    name, needs_features = "oracle-medusa", True

    def __init__(self, drafter: MedusaDrafter, target):
        self.drafter, self.target = drafter, target

    def reset(self, *args) -> None:
        self.drafter.reset(*args)

    def feedback(self, step) -> None:
        self.drafter.feedback(step)

    def propose(self, context, k):
        with torch.no_grad():
            logits = self.target(torch.tensor([context])).logits[0, -1]
        ranked = logits.topk(4).indices.tolist()
        tokens = ranked[1:2] + ranked[:1] + ranked[2:4]  # the right token second: a skipped node first
        return Draft(tokens=tokens[:k], parents=[-1] * min(k, 4))


def test_eos_inside_a_tree_ends_generation_like_generate(target):
    reference = hf_greedy(target, PROMPTS[0], NEW)
    eos = reference[12]
    model = tiny_llama(seed=4, eos_token_id=eos)
    expected = hf_greedy(model, PROMPTS[0], NEW)
    assert expected[-1] == eos and len(expected) < NEW
    for drafter in (eagle(model, depth=4, top_k=3), medusa(model)):
        result = SpecEngine(model, drafter).generate(PROMPTS[0], GenerationConfig(max_new_tokens=NEW, k=12))
        assert result.tokens == expected and result.finish_reason == "eos"


def test_sampling_over_eagle_trees_keeps_the_target_distribution(target):
    """Chi-square on the first two sampled tokens: the tree's deterministic nodes (point-mass q) and recursive
    rejection over siblings must leave the target's joint distribution unchanged."""
    from scipy.stats import chisquare

    prompt, samples = PROMPTS[1], 3000
    sampling = dict(temperature=1.0, top_k=6)
    engine = SpecEngine(target, eagle(target, depth=3, top_k=3))
    counts: dict[tuple[int, int], int] = {}
    for seed in range(samples):
        out = engine.generate(prompt, GenerationConfig(max_new_tokens=2, k=8, sampling=SamplingConfig(seed=seed, **sampling)))
        counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
    expected = _two_token_distribution(target, prompt, SamplingConfig(**sampling))
    pairs = sorted(expected, key=expected.get, reverse=True)
    assert set(counts) <= set(expected)  # nothing outside top-k ever comes out
    keep = [p for p in pairs if expected[p] * samples >= 5]
    observed = [counts.get(p, 0) for p in keep] + [samples - sum(counts.get(p, 0) for p in keep)]
    probs = [expected[p] for p in keep] + [1 - sum(expected[p] for p in keep)]
    assert chisquare(observed, [p * samples for p in probs]).pvalue > 1e-3


def _two_token_distribution(model, prompt, sampling) -> dict[tuple[int, int], float]:
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper

    warp = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature), TopKLogitsWarper(sampling.top_k)])

    def dist(ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[:, -1]
        return warp(torch.tensor([ids]), logits).softmax(-1)[0]

    first = dist(prompt)
    out = {}
    for a in first.nonzero().flatten().tolist():
        second = dist(prompt + [a])
        for b in second.nonzero().flatten().tolist():
            out[(a, b)] = float(first[a] * second[b])
    return out


def test_tree_size_follows_the_cost_curve():
    values = torch.tensor([0.9, 0.8, 0.5, 0.2, 0.1, 0.05])
    flat = CostCurve([1, 64], [1.0, 1.0])
    steep = CostCurve([1, 2, 64], [1.0, 2.0, 64.0])
    assert best_tree_size(values, flat, budget=6) == 6
    assert best_tree_size(values, flat, budget=3) == 3
    assert best_tree_size(values, steep, budget=6) == 0  # two tokens cost twice one: 1.9 expected < 2
    assert best_tree_size(torch.tensor([0.99, 0.98]), steep, budget=6) == 0
    knee = CostCurve([1, 4, 8, 64], [1.0, 1.0, 3.0, 30.0])
    assert best_tree_size(values, knee, budget=6) == 3  # free up to 4 tokens fed, dear after


def test_draft_validates_itself():
    with pytest.raises(DraftError, match="parents must come before"):
        Draft(tokens=[1, 2], parents=[1, -1]).check()
    with pytest.raises(DraftError, match="budget"):
        Draft(tokens=[1, 2, 3]).check(budget=2)
    with pytest.raises(DraftError, match="distributions"):
        Draft(tokens=[1, 2], probs=torch.ones(3, 10)).check()


def test_head_folders_round_trip_and_refuse_other_targets(tmp_path, target):
    drafter = eagle(target, draft_vocab=30)
    save_head(drafter.head, tmp_path / "head")
    again = load_head(tmp_path / "head", target)
    for name, tensor in drafter.head.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    other = tiny_llama(seed=1, hidden_size=64)
    with pytest.raises(IncompatibleDrafterError, match="hidden size 32"):
        load_head(tmp_path / "head", other)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_head_computes_what_the_trained_module_computes(dtype):
    """Exactness cannot catch a broken drafter (verification repairs every draft), so the decode-time head (lean
    layers over its own cache, products in the fastest format) is checked against the module training runs: a
    chain of committed pairs, then a tree level whose nodes see the cache, one ancestor and themselves."""
    from transformers import DynamicCache

    target = tiny_llama(seed=4).to(dtype)  # its own copy: casting the shared one would round its weights
    head = eagle(target).head.to(dtype)
    drafter = EagleDrafter(head, target)
    torch.manual_seed(1)
    n, hidden = 6, target.config.hidden_size
    features, tokens = torch.randn(n, hidden, dtype=dtype), torch.randint(0, target.config.vocab_size, (n,))
    chain = torch.ones(n, n, dtype=torch.bool).tril()
    lean = drafter._run(features, tokens, torch.arange(1, n + 1), chain)
    cache = DynamicCache()
    with torch.no_grad():
        module = head(features[None], drafter.parts.embed_tokens(tokens)[None], torch.arange(1, n + 1)[None],
                      None, cache)[0]
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    # a bf16 head whose products take float32 (fp16, bf16-fused formats) keeps its hidden rows in float32
    tolerance["check_dtype"] = False
    torch.testing.assert_close(lean, module, **tolerance)
    # a level of 3 nodes: nodes 0 and 1 have the committed pair 5 as parent, node 2 also sees node 0's row
    allowed = torch.zeros(3, n + 3, dtype=torch.bool)
    allowed[:, :n] = True
    allowed[torch.arange(3), n + torch.arange(3)] = True
    allowed[2, n] = True
    node_features = torch.randn(3, hidden, dtype=dtype)
    node_tokens = torch.randint(0, target.config.vocab_size, (3,))
    lean_nodes = drafter._run(node_features, node_tokens, torch.full((3,), n + 1), allowed)
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    with torch.no_grad():
        module_nodes = head(node_features[None], drafter.parts.embed_tokens(node_tokens)[None],
                            torch.full((1, 3), n + 1), additive[None, None], cache)[0]
    torch.testing.assert_close(lean_nodes, module_nodes, **tolerance)
    torch.testing.assert_close(drafter._logits(lean_nodes).float(),
                               drafter.parts.logits(module_nodes).float(), **tolerance)


def test_each_tree_node_attends_to_its_own_ancestors_only(target):
    """The masks the drafter builds level by level: a node sees the committed pairs, exactly one row of each
    earlier level, that row being its parent's (whose output is the node's input feature) and, above it, the
    rows its parent sees, and itself. Exactness cannot catch a wrong mask (only proposals change)."""
    drafter = eagle(target, depth=4, top_k=3)
    calls, drafting = [], [False]
    real_run, real_propose = drafter._run, drafter.propose

    def recording_run(features, tokens, positions, allowed):
        out = real_run(features, tokens, positions, allowed)
        if drafting[0]:
            calls.append((features.clone(), allowed.clone(), out.clone()))
        return out

    def recording_propose(context, k):
        calls.clear()
        drafting[0] = True
        try:
            return real_propose(context, k)
        finally:
            drafting[0] = False
            checks.append(list(calls))

    checks = []
    drafter._run, drafter.propose = recording_run, recording_propose
    SpecEngine(target, drafter).generate(PROMPTS[0], GenerationConfig(max_new_tokens=12, k=16))
    assert checks and all(len(levels) == 3 for levels in checks if levels)
    for levels in checks:
        if not levels:
            continue
        base = levels[0][1].shape[1] - levels[0][1].shape[0]  # the committed pairs, before the first level's rows
        sees: dict[int, set[int]] = {}  # cache row of a drafted node -> the drafted rows it sees (itself included)
        outputs: dict[int, torch.Tensor] = {}
        for features, allowed, out in levels:
            start = allowed.shape[1] - allowed.shape[0]
            assert allowed[:, :base].all()
            for i in range(allowed.shape[0]):
                visible = set(torch.nonzero(allowed[i, base:]).flatten().add(base).tolist())
                assert start + i in visible
                earlier = visible - {start + i}
                if start == base:
                    assert not earlier  # the first level's nodes are the root's children
                    continue
                parent = max(earlier)
                assert sees[parent] == earlier  # the parent row, and exactly what it sees
                assert torch.equal(features[i], outputs[parent])  # that row is the node's parent
            for i in range(allowed.shape[0]):
                sees[start + i] = set(torch.nonzero(allowed[i, base:]).flatten().add(base).tolist())
                outputs[start + i] = out[i]


def test_the_lookup_chain_grafted_on_a_tree_is_exact_and_accepted(target):
    """eagle+ngram: the n-gram chain joins the head's tree where they agree and branches off where they do not,
    siblings stay distinct, the node budget holds, and greedy output stays the target's."""
    from draftsmith.drafters.merged import TreeWithLookup
    from draftsmith.drafters.ngram import NgramDrafter

    prompt = [7, 8, 9, 10, 11, 12] * 4 + [7, 8]
    merged = TreeWithLookup(eagle(target, depth=2, top_k=2), NgramDrafter(), max_chain=6)
    merged.reset(prompt, SamplingConfig(), None)
    merged.tree.root_feature = torch.zeros(target.config.hidden_size)  # as after a prefill's feedback
    merged.tree.costs = FLAT
    draft = merged.propose(prompt, 32)
    draft.check(32)
    tree_nodes = merged.tree_nodes
    chain = NgramDrafter().propose(prompt, 6).tokens
    assert chain == [9, 10, 11, 12, 7, 8]
    path, node = [], -1  # the chain is a root path of the merged draft
    for token in chain:
        node = next(i for i, (t, p) in enumerate(zip(draft.tokens, draft.parent_ids())) if t == token and p == node)
        path.append(node)
    assert len(draft) == tree_nodes + sum(1 for i in path if i >= tree_nodes)  # shared nodes are not repeated
    siblings = draft.children()
    assert all(len({draft.tokens[c] for c in kids}) == len(kids) for kids in siblings.values())
    for k in (3, 32):  # a budget smaller than the tree cuts the chain, never the contract
        assert len(merged.propose(prompt, k)) <= k
    engine = SpecEngine(target, TreeWithLookup(eagle(target, depth=3, top_k=2), NgramDrafter(), max_chain=8))
    for p in (prompt, PROMPTS[0]):
        result = engine.generate(p, GenerationConfig(max_new_tokens=NEW, k=24))
        assert result.tokens == hf_greedy(target, p, NEW)


def test_a_target_cast_for_a_benchmark_finds_its_models_shipped_heads():
    from draftsmith.artifacts import shipped_head_folder

    # `make demo` on a CPU with fast bf16 runs `eagle:lookup=8@bf16`, whose target is named smollm2@bfloat16
    assert shipped_head_folder("smollm2@bfloat16", "eagle") == shipped_head_folder("smollm2", "eagle")
    assert shipped_head_folder("smollm2", "eagle").is_dir()


def test_auto_picks_prompt_lookup_the_fastest_drafter_measured(target):
    from draftsmith.drafters.registry import build_drafter
    from draftsmith.drafters.ngram import NgramDrafter
    from draftsmith.models import LoadedModel

    for name in ("smollm2", "tiny"):  # a head ships for smollm2: auto does not take it (docs/drafters/ngram.md)
        assert isinstance(build_drafter("auto", LoadedModel(target, None, name)), NgramDrafter)