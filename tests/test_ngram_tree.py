"""Prompt lookup drafting trees (`branches` > 1): the first occurrence's continuation as the trunk, other
occurrences' continuations grafted on, exact under greedy decoding, and an index that rolls back exactly."""

from __future__ import annotations

import random

import pytest

from draftsmith.acceptance import SamplingConfig
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from tiny_models import hf_greedy, tiny_llama


def proposal(drafter: NgramDrafter, context: list[int], k: int):
    drafter.reset(context, SamplingConfig(), None)
    draft = drafter.propose(context, k)
    draft.check(budget=k)
    return draft


def test_the_trunk_is_the_chain_and_other_occurrences_branch_off():
    #          a  b  c  d   ...  a  b  x  y   ...  a  b  c  e  ...  a  b
    context = [1, 2, 3, 4, 9, 9, 1, 2, 5, 6, 8, 8, 1, 2, 3, 7, 8, 8, 1, 2]
    chain = proposal(NgramDrafter(max_n=2), context, 6)
    assert chain.is_chain and chain.tokens == [3, 4, 9, 9, 1, 2]  # the first occurrence's continuation
    tree = proposal(NgramDrafter(max_n=2, branches=3), context, 8)
    paths = {tuple(tree.tokens[n] for n in _path(tree, node)) for node in range(len(tree))}
    # the trunk keeps half the budget; each other occurrence adds up to 2 nodes where it parts from what is there
    assert paths == {(3,), (3, 4), (3, 4, 9), (3, 4, 9, 9), (3, 7), (3, 7, 8), (5,), (5, 6)}
    siblings = tree.children()
    assert all(len({tree.tokens[c] for c in kids}) == len(kids) for kids in siblings.values())
    assert proposal(NgramDrafter(max_n=2, branches=3), context, 1).tokens == [3]  # one node: the trunk's


def test_a_single_occurrence_stays_a_chain():
    context = [1, 2, 3, 4, 5, 1, 2]
    assert proposal(NgramDrafter(branches=4), context, 4).is_chain


@pytest.mark.parametrize("branches", [1, 4])
def test_the_index_rolls_back_to_what_a_fresh_index_holds(branches):
    """A cascade rewrites the context: the followers registered for rejected tokens must go, and only they."""
    rng = random.Random(branches)
    drafter = NgramDrafter(max_n=3, branches=branches)
    context = [rng.randrange(6) for _ in range(40)]
    drafter.reset(context, SamplingConfig(), None)
    for _ in range(30):
        drafter.propose(context, 4)
        keep = rng.randrange(1, len(context))
        context = context[:keep] + [rng.randrange(6) for _ in range(rng.randrange(1, 8))]
        drafter.propose(context, 4)
        fresh = NgramDrafter(max_n=3, branches=branches)
        fresh.propose(context, 4)
        assert drafter.followers == fresh.followers


def test_ngram_trees_are_exact():
    target = tiny_llama(seed=2)
    prompt = [5, 6, 7, 8, 9, 5, 6, 10, 11, 5, 6, 7, 12, 5, 6, 7, 8, 5, 6] * 2
    reference = hf_greedy(target, prompt, 40)
    for drafter in (NgramDrafter(branches=4), NgramDrafter(min_n=2, max_n=3, branches=2)):
        engine = SpecEngine(target, drafter)
        for k in (2, 16):
            assert engine.generate(prompt, GenerationConfig(max_new_tokens=40, k=k)).tokens == reference


def test_branches_must_be_positive():
    with pytest.raises(ConfigError, match="at least 1 branch, got branches=0"):
        NgramDrafter(branches=0)


def _path(draft, node: int) -> list[int]:
    parents, path = draft.parent_ids(), [node]
    while parents[path[0]] != -1:
        path.insert(0, parents[path[0]])
    return path
