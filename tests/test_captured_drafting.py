"""Captured drafting (drafters/captured_tree.py): a feature head's tree and feedback as fixed-shape device work.
On CPU the captured bodies run eagerly at each replay (`run_eagerly`): the trees they propose are checked
against the eager drafter's, node for node, and the engine's output against the target's greedy decoding."""

from __future__ import annotations

import pytest
import torch

from draftsmith.backends.cuda_graphs import drafting_capture, run_eagerly
from draftsmith.drafters.base import Drafter
from draftsmith.drafters.captured_tree import FEEDBACK_BUCKETS, CapturedTree
from draftsmith.drafters.eagle import TreeConfig
from draftsmith.drafters.merged import TreeWithLookup
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from test_ctc import ctc
from test_heads import FLAT, PROMPTS, eagle
from tiny_models import hf_greedy, tiny_llama

NEW = 40


@pytest.fixture(scope="module")
def target():
    return tiny_llama(seed=4)


def captured(drafter, capture=run_eagerly):
    drafter.captured = CapturedTree(drafter, capture)
    return drafter


class Twins(Drafter):
    """Drives an eager and a captured drafter with the same feedback; every proposal must be the same tree."""

    name, needs_features, sizes_itself = "twins", True, True

    def __init__(self, eager, replayed):
        self.eager, self.replayed = eager, replayed
        self.proposals = 0

    @property
    def costs(self):
        return self.eager.costs

    @costs.setter
    def costs(self, curve) -> None:
        self.eager.costs = self.replayed.costs = curve

    def reset(self, *args) -> None:
        self.eager.reset(*args)
        self.replayed.reset(*args)

    def feedback(self, step) -> None:
        self.eager.feedback(step)
        self.replayed.feedback(step)
        assert torch.allclose(self.eager.root_feature, self.replayed.root_feature, rtol=1e-5, atol=1e-5)

    def propose(self, context, k):
        a, b = self.eager.propose(context, k), self.replayed.propose(context, k)
        assert (a.tokens, a.parents) == (b.tokens, b.parents), (len(context), k)
        assert a.confidence == pytest.approx(b.confidence, abs=1e-4)
        self.proposals += len(a) > 0
        return b


@pytest.mark.parametrize("tree", [dict(depth=4, top_k=3), dict(depth=5, top_k=1), dict(depth=1, top_k=4),
                                  dict(draft_vocab=40, depth=3, top_k=4)])
def test_captured_trees_are_the_eager_trees_and_exact(target, tree):
    twins = Twins(eagle(target, **tree), captured(eagle(target, **tree)))
    engine = SpecEngine(target, twins)
    for prompt in PROMPTS[:2]:
        for k in (1, 24):
            assert engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=k)).tokens == \
                hf_greedy(target, prompt, NEW)
    assert twins.proposals > 10


def test_the_captured_tree_is_one_transfer_of_fixed_shapes(target):
    drafter = captured(eagle(target, depth=4, top_k=3))
    SpecEngine(target, drafter).generate(PROMPTS[0], GenerationConfig(max_new_tokens=NEW, k=24))
    graphs = drafter.captured.graphs
    assert "tree" in graphs.graphs and graphs.graphs["tree"][0].tokens.shape == (4 * 3,)
    # the prompt's feedback runs eagerly (no bucket holds it); the steps' feedbacks replay by bucket
    assert {key[1] for key in graphs.graphs if key != "tree"} <= set(FEEDBACK_BUCKETS)  # (feedback, bucket, width)


def test_lookup_grafted_and_ctc_feedback_stay_exact_when_captured(target):
    prompt = [7, 8, 9, 10, 11, 12] * 4 + [7, 8]
    for drafter in (TreeWithLookup(captured(eagle(target, depth=3, top_k=2)), NgramDrafter(), max_chain=8),
                    captured(ctc(target, draft_vocab=40)), captured(ctc(target, feed=True, levels=2))):
        engine = SpecEngine(target, drafter)
        for p in (prompt, PROMPTS[0]):
            assert engine.generate(p, GenerationConfig(max_new_tokens=NEW, k=24)).tokens == hf_greedy(target, p, NEW)


def test_many_requests_keep_graphs_and_caches_bounded(target):
    """Request after request, the drafter captures each graph once and its cache stops growing once it holds
    the longest request: nothing per request accumulates."""
    drafter = captured(eagle(target, depth=3, top_k=3))
    engine = SpecEngine(target, drafter)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    sizes = []
    for i, prompt in enumerate(prompts):
        engine.generate(prompt, GenerationConfig(max_new_tokens=NEW, k=16))
        graphs = drafter.captured.graphs
        sizes.append((graphs.captures, len(graphs.graphs), drafter.layers.k_cache.shape[2]))
    assert sizes[-1] == sizes[len(PROMPTS) - 1]  # after one of each prompt, nothing new is captured or grown
    assert sizes[-1][0] == sizes[-1][1] <= len(FEEDBACK_BUCKETS) + 1  # each graph captured once


def test_what_a_captured_body_reads_outlives_its_capture(target):
    """A CUDA graph keeps only the addresses its body read: a replay that holds the body by a weak reference
    (as a graph holds Python objects: not at all) fails once a tensor only the body's closure held is freed."""
    import gc
    import weakref

    def by_address(body, pool=None):
        body = weakref.ref(body)
        return lambda: body()()

    drafter = captured(eagle(target, depth=3, top_k=2), capture=by_address)
    result = SpecEngine(target, drafter).generate(PROMPTS[0], GenerationConfig(max_new_tokens=NEW, k=16))
    gc.collect()
    assert result.tokens == hf_greedy(target, PROMPTS[0], NEW) and drafter.captured.graphs.captures >= 2


def test_a_failed_draft_capture_warns_once_and_drafts_eagerly(target):
    def broken(body, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    drafter = captured(eagle(target, depth=3, top_k=2), capture=broken)
    engine = SpecEngine(target, drafter)
    with pytest.warns(UserWarning, match="CUDA graph capture failed, running eager instead"):
        result = engine.generate(PROMPTS[0], GenerationConfig(max_new_tokens=NEW, k=16))
    assert result.tokens == hf_greedy(target, PROMPTS[0], NEW)
    assert drafter.captured.graphs.failed and drafter.captured.graphs.captures == 0


def test_drafting_graphs_default_to_cuda_and_gpu_trees_are_wider():
    assert drafting_capture(None, torch.device("cpu")) is None
    assert drafting_capture(None, torch.device("cuda")) is not None
    with pytest.raises(ConfigError, match="CUDA graphs need a CUDA device; the drafter is on cpu"):
        drafting_capture(True, torch.device("cpu"))
    cpu, gpu = TreeConfig.for_device(torch.device("cpu")), TreeConfig.for_device(torch.device("cuda"))
    assert gpu.depth * gpu.top_k > cpu.depth * cpu.top_k
    assert TreeConfig.for_device(torch.device("cuda"), top_k=2).top_k == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the capture itself needs CUDA")
def test_cuda_captured_drafting_is_exact_and_proposes_the_eager_trees():
    from draftsmith.drafters.eagle import EagleDrafter
    from draftsmith.heads import EagleHead, HeadConfig

    model = tiny_llama(seed=4).to("cuda")

    def drafter(graphs: bool) -> EagleDrafter:
        torch.manual_seed(0)
        head = EagleHead(HeadConfig.for_target("eagle", model)).eval().to("cuda")
        made = EagleDrafter(head, model, TreeConfig(depth=4, top_k=3), graphs=graphs)
        made.costs = FLAT
        return made

    twins = Twins(drafter(False), drafter(True))
    engine, plain = SpecEngine(model, twins), SpecEngine(model)
    for prompt in PROMPTS[:2]:
        config = GenerationConfig(max_new_tokens=NEW, k=24)
        assert engine.generate(prompt, config).tokens == plain.generate(prompt, config).tokens  # fp32
    assert twins.replayed.captured.graphs.captures >= 2 and not twins.replayed.captured.graphs.failed


def test_a_tree_sized_to_the_whole_budget_leaves_the_lookup_chain_its_room(target):
    """On a GPU the costs size a head's tree to the whole node budget; the grafted chain must still fit."""
    prompt = [7, 8, 9, 10, 11, 12] * 4 + [7, 8]
    merged = TreeWithLookup(eagle(target, depth=6, top_k=8), NgramDrafter(), max_chain=6)
    SpecEngine(target, merged).generate(prompt, GenerationConfig(max_new_tokens=1, k=16))  # the prefill's feedback
    draft = merged.propose(prompt, 16)
    assert len(draft) == 16 and merged.tree_nodes == 10  # FLAT costs: the tree takes all the room it is given
    chain, node = NgramDrafter().propose(prompt, 6).tokens, -1
    for token in chain:  # the whole chain is a root path of the draft
        node = next(i for i, (t, p) in enumerate(zip(draft.tokens, draft.parent_ids())) if t == token and p == node)
