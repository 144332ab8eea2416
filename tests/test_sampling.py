"""Speculative sampling must keep the target's distribution exactly, whatever the drafter proposes."""

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from draftsmith.acceptance import SamplingConfig, accept_sampling, processed_probs
from draftsmith.draft import ROOT, Draft
from draftsmith.drafters.model import ModelDrafter
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from tiny_models import tiny_llama

VOCAB = 6
ALPHA = 1e-3  # a correct sampler fails one test in a thousand; a wrong one fails them all (see the power checks)


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit, pooling cells whose expected count is under 5."""
    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return chisquare(counts[keep], expected[keep] * counts[keep].sum() / expected[keep].sum()).pvalue


def test_acceptance_rule_keeps_p_for_a_sampled_chain_node():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05], [1 / 6] * 6])
    q = torch.tensor([0.05, 0.05, 0.1, 0.2, 0.3, 0.3])  # a bad drafter: mass where p has little
    counts = np.zeros(VOCAB)
    for _ in range(20_000):
        x = int(torch.multinomial(q, 1, generator=g))
        path, bonus = accept_sampling(Draft(tokens=[x], probs=q[None]), p, g)
        counts[x if path else bonus] += 1
    assert chi_square_pvalue(counts, p[0].numpy()) > ALPHA


def test_acceptance_rule_keeps_p_for_deterministic_tree_siblings():
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.1, 0.4, 0.2, 0.2, 0.05, 0.05]] + [[1 / 6] * 6] * 3)
    draft = Draft(tokens=[3, 0, 5], parents=[ROOT, ROOT, ROOT])  # three guesses for the same position
    counts = np.zeros(VOCAB)
    for _ in range(20_000):
        path, bonus = accept_sampling(draft, p, g)
        counts[draft.tokens[path[0]] if path else bonus] += 1
    assert chi_square_pvalue(counts, p[0].numpy()) > ALPHA


def test_processed_probs_temperature_top_k_top_p():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert torch.allclose(processed_probs(logits, SamplingConfig(temperature=1.0)), logits.softmax(-1))
    assert torch.allclose(processed_probs(logits, SamplingConfig(temperature=2.0)), (logits / 2).softmax(-1))
    top2 = processed_probs(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert (top2[2:] == 0).all() and torch.allclose(top2[:2], logits[:2].softmax(-1))
    full = logits.softmax(-1)  # [0.636, 0.234, 0.086, ...]: top_p=0.8 keeps the first two tokens
    nucleus = processed_probs(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    assert (nucleus[2:] == 0).all() and torch.allclose(nucleus[:2], full[:2] / full[:2].sum())


# ---- end to end: the joint distribution of the first generated tokens -------------------------------------


@pytest.fixture(scope="module")
def small_target():
    return tiny_llama(vocab_size=VOCAB, seed=11, init_std=0.3)


def exact_joint(model, prompt: list[int], cfg: SamplingConfig) -> np.ndarray:
    """P(x1, x2) of the target's own sampling, enumerated exactly."""
    with torch.no_grad():
        first = processed_probs(model(torch.tensor([prompt])).logits[0, -1], cfg)
        joint = np.zeros((VOCAB, VOCAB))
        for x1 in range(VOCAB):
            second = processed_probs(model(torch.tensor([prompt + [x1]])).logits[0, -1], cfg)
            joint[x1] = (first[x1] * second).numpy()
    return joint.ravel()


def sampled_joint(engine: SpecEngine, prompt: list[int], cfg: SamplingConfig, n: int, k: int) -> np.ndarray:
    counts = np.zeros(VOCAB * VOCAB)
    for seed in range(n):
        sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p, seed=seed)
        out = engine.generate(prompt, GenerationConfig(max_new_tokens=4, k=k, sampling=sampling, stop_on_eos=False))
        counts[out.tokens[0] * VOCAB + out.tokens[1]] += 1
    return counts


CASES = {
    "bad-model-drafter": (lambda: ModelDrafter(tiny_llama(vocab_size=VOCAB, seed=5, init_std=0.3)),
                          SamplingConfig(temperature=1.0)),
    "bad-model-top-k-top-p": (lambda: ModelDrafter(tiny_llama(vocab_size=VOCAB, seed=6, init_std=0.3)),
                              SamplingConfig(temperature=0.8, top_k=4, top_p=0.9)),
    "ngram-deterministic": (lambda: NgramDrafter(min_n=1, max_n=2), SamplingConfig(temperature=1.3)),
}


@pytest.mark.parametrize("case", CASES)
def test_speculative_sampling_matches_target_distribution(small_target, case):
    make_drafter, cfg = CASES[case]
    prompt = [2, 3, 2, 3, 2]  # repetitive, so the n-gram drafter proposes too
    expected = exact_joint(small_target, prompt, cfg)
    counts = sampled_joint(SpecEngine(small_target, make_drafter()), prompt, cfg, n=1500, k=3)
    assert chi_square_pvalue(counts, expected) > ALPHA


def test_the_distribution_test_has_power(small_target):
    """Sanity: the drafter's own distribution is far from the target's, so a rule that just accepted
    drafts would fail the test above."""
    cfg = CASES["bad-model-drafter"][1]
    drafter_model = tiny_llama(vocab_size=VOCAB, seed=5, init_std=0.3)
    prompt = [2, 3, 2, 3, 2]
    target_joint, drafter_joint = exact_joint(small_target, prompt, cfg), exact_joint(drafter_model, prompt, cfg)
    assert 0.5 * np.abs(target_joint - drafter_joint).sum() > 0.2
    counts = np.random.default_rng(0).multinomial(1500, drafter_joint)
    assert chi_square_pvalue(counts, target_joint) < ALPHA


def test_seeded_sampling_is_reproducible(small_target):
    engine = SpecEngine(small_target, ModelDrafter(tiny_llama(vocab_size=VOCAB, seed=5)))
    runs = [engine.generate([2, 3], GenerationConfig(max_new_tokens=30, k=3, stop_on_eos=False,
                                                     sampling=SamplingConfig(temperature=1.0, seed=s))).tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
