"""Speculative sampling must keep the target's distribution exactly, whatever the drafter proposes."""

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from draftsmith.acceptance import SamplingConfig, accept_sampling, processed_probs
from draftsmith.adaptive import CostCurve
from draftsmith.draft import ROOT, Draft
from draftsmith.drafters.model import ModelDrafter
from draftsmith.drafters.ngram import NgramDrafter
import draftsmith.engine as engine_module
from draftsmith.engine import GenerationConfig, SpecEngine, Stats
from scripted_drafters import SampledTreeDrafter
from tiny_models import noisy_copy, tiny_llama

VOCAB = 6
ALPHA = 1e-3  # a correct sampler fails one test in a thousand; a wrong one fails them all (see the power checks)


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit, pooling cells whose expected count is under 5. A draw in a cell of
    probability zero (a token top-k or top-p removed) refutes the fit outright: pooling would hide it."""
    if counts[probs <= 0].sum() > 0:
        return 0.0
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


def hf_warpers(cfg: SamplingConfig) -> LogitsProcessorList:
    """What HF generate applies for these settings, in its order: temperature, top-k, top-p."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(cfg.temperature)])
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1:
        warpers.append(TopPLogitsWarper(cfg.top_p))
    return warpers


def exact_joint(model, prompt: list[int], cfg: SamplingConfig) -> np.ndarray:
    """P(x1, x2) of the target's own sampling, enumerated exactly, with transformers' processors (the
    reference must not share the project's processed_probs, or a shared mistake would pass)."""
    warpers = hf_warpers(cfg)

    def next_token_probs(ids: list[int]) -> torch.Tensor:
        ids_tensor = torch.tensor([ids])
        return warpers(ids_tensor, model(ids_tensor).logits[:, -1].double()).softmax(-1)[0]

    with torch.no_grad():
        first = next_token_probs(prompt)
        joint = np.zeros((VOCAB, VOCAB))
        for x1 in range(VOCAB):
            joint[x1] = (first[x1] * next_token_probs(prompt + [x1])).numpy()
    return joint.ravel()


def total_variation(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def assert_test_has_power(expected: np.ndarray, wrong: np.ndarray, n: int) -> None:
    """A sampler whose output followed `wrong` would fail the chi-square test with n draws."""
    assert total_variation(expected, wrong) > 0.1
    counts = np.random.default_rng(0).multinomial(n, wrong)
    assert chi_square_pvalue(counts, expected) < 1e-6


def sampled_joint(
    engine: SpecEngine, prompt: list[int], cfg: SamplingConfig, n: int, k: int, max_new_tokens: int = 4
) -> tuple[np.ndarray, Stats]:
    """Counts of the first two generated tokens over n seeded requests, and the summed stats."""
    counts, total = np.zeros(VOCAB * VOCAB), Stats()
    for seed in range(n):
        sampling = SamplingConfig(cfg.temperature, cfg.top_k, cfg.top_p, seed=seed)
        out = engine.generate(prompt, GenerationConfig(max_new_tokens=max_new_tokens, k=k, sampling=sampling,
                                                       stop_on_eos=False))
        counts[out.tokens[0] * VOCAB + out.tokens[1]] += 1
        total.target_steps += out.stats.target_steps
        total.proposed += out.stats.proposed
        total.accepted += out.stats.accepted
    return counts, total


PROMPT = [2, 3, 2, 3, 2]  # repetitive, so the n-gram drafter proposes too
# on PROMPT these settings remove 35% of the joint's mass, and each filter alone matters (see the power test)
TOP_K_TOP_P = SamplingConfig(temperature=1.5, top_k=4, top_p=0.8)

CASES = {
    "bad-model-drafter": (lambda: ModelDrafter(tiny_llama(vocab_size=VOCAB, seed=5, init_std=0.3)),
                          SamplingConfig(temperature=1.0)),
    "bad-model-top-k-top-p": (lambda: ModelDrafter(tiny_llama(vocab_size=VOCAB, seed=6, init_std=0.3)),
                              TOP_K_TOP_P),
    "ngram-deterministic": (lambda: NgramDrafter(min_n=1, max_n=2), SamplingConfig(temperature=1.3)),
}


@pytest.mark.parametrize("case", CASES)
def test_speculative_sampling_matches_target_distribution(small_target, case):
    make_drafter, cfg = CASES[case]
    expected = exact_joint(small_target, PROMPT, cfg)
    counts, _ = sampled_joint(SpecEngine(small_target, make_drafter()), PROMPT, cfg, n=1500, k=3)
    assert chi_square_pvalue(counts, expected) > ALPHA


def test_the_distribution_test_has_power(small_target):
    """Sanity: the drafter's own distribution is far from the target's, so a rule that just accepted
    drafts would fail the test above."""
    cfg = CASES["bad-model-drafter"][1]
    drafter_model = tiny_llama(vocab_size=VOCAB, seed=5, init_std=0.3)
    target_joint, drafter_joint = exact_joint(small_target, PROMPT, cfg), exact_joint(drafter_model, PROMPT, cfg)
    assert total_variation(target_joint, drafter_joint) > 0.2
    assert_test_has_power(target_joint, drafter_joint, 1500)


def test_the_top_k_top_p_test_has_power(small_target):
    """An engine ignoring top-k, top-p, or both, would fail the top-k / top-p case: most of what it would
    sample differently falls in cells the reference gives probability zero."""
    cfg = TOP_K_TOP_P
    expected = exact_joint(small_target, PROMPT, cfg)
    for ignored in ({"top_k": 0}, {"top_p": 1.0}, {"top_k": 0, "top_p": 1.0}):
        wrong = exact_joint(small_target, PROMPT, dataclasses.replace(cfg, **ignored))
        assert wrong[expected == 0].sum() > 0.15, ignored  # mass on pairs the reference never draws
        assert_test_has_power(expected, wrong, 1500)


def test_processed_probs_agree_with_transformers_processors():
    """The project's processing against transformers', on many random logit vectors."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 50, generator=generator, dtype=torch.float64) * 3
    for cfg in (SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.0, top_k=5),
                SamplingConfig(temperature=1.3, top_p=0.6), TOP_K_TOP_P):
        reference = hf_warpers(cfg)(torch.zeros(200, 1, dtype=torch.long), logits.clone()).softmax(-1)
        assert torch.allclose(processed_probs(logits, cfg).double(), reference, atol=1e-6), cfg


def drafter_joint(q: torch.Tensor, last: int) -> np.ndarray:
    """P(x1, x2) if the first drafted node of each level were always kept: x1 ~ q[last], x2 ~ q[x1]."""
    return (q[last][:, None] * q).double().numpy().ravel()


def test_sampled_tree_with_duplicate_siblings_matches_target_distribution(small_target):
    """Three levels, siblings drawn i.i.d. from a q far from p, often the same token twice: recursive
    rejection must keep p at every level, and the bonus token after the deepest accepted node too."""
    cfg = SamplingConfig(temperature=1.0)
    drafter = SampledTreeDrafter(VOCAB, widths=(3, 2, 2), seed=4)
    expected = exact_joint(small_target, PROMPT, cfg)
    counts, stats = sampled_joint(SpecEngine(small_target, drafter), PROMPT, cfg, n=1200, k=32)
    assert drafter.duplicate_siblings > 100  # the case under test really happens
    assert 0 < stats.accepted < stats.proposed  # drafts partly accepted: rejections and acceptances both
    assert chi_square_pvalue(counts, expected) > ALPHA
    assert_test_has_power(expected, drafter_joint(drafter.q, PROMPT[-1]), 1200)


def test_bonus_token_after_a_fully_accepted_draft(small_target):
    """The target drafting for itself with the same settings: q = p, so every draft is accepted and the
    second token is always the bonus token, drawn from the target's distribution after the draft."""
    cfg = SamplingConfig(temperature=1.0)
    engine = SpecEngine(small_target, ModelDrafter(small_target))
    counts, stats = sampled_joint(engine, PROMPT, cfg, n=1200, k=1, max_new_tokens=2)
    assert stats.target_steps == 1200 and stats.accepted >= 0.999 * stats.proposed  # one step: draft + bonus
    expected = exact_joint(small_target, PROMPT, cfg)
    assert chi_square_pvalue(counts, expected) > ALPHA
    # power: a bonus token drawn from the root's row again (the distribution before the draft) would fail
    first = expected.reshape(VOCAB, VOCAB).sum(1)
    assert_test_has_power(expected, np.outer(first, first).ravel(), 1200)


def test_k1_matches_target_distribution(small_target):
    """One draft token a step, from a model drafter far from the target."""
    cfg = SamplingConfig(temperature=1.0)
    drafter_model = tiny_llama(vocab_size=VOCAB, seed=5, init_std=0.3)
    counts, stats = sampled_joint(SpecEngine(small_target, ModelDrafter(drafter_model)), PROMPT, cfg, n=1200,
                                  k=1, max_new_tokens=3)
    assert 0 < stats.accepted < stats.proposed
    expected = exact_joint(small_target, PROMPT, cfg)
    assert chi_square_pvalue(counts, expected) > ALPHA
    assert_test_has_power(expected, exact_joint(drafter_model, PROMPT, cfg), 1200)


def test_seeded_sampling_is_reproducible(small_target):
    engine = SpecEngine(small_target, ModelDrafter(tiny_llama(vocab_size=VOCAB, seed=5)))
    runs = [engine.generate([2, 3], GenerationConfig(max_new_tokens=30, k=3, stop_on_eos=False,
                                                     sampling=SamplingConfig(temperature=1.0, seed=s))).tokens
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


class FakeClock:
    """Stands in for the engine's `time` module: every reading advances by `tick` seconds, so the drafter's
    measured cost is the same from run to run however loaded the machine is."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def perf_counter(self) -> float:
        self.now += self.tick
        return self.now


def adaptive_sampling_engine(costs: CostCurve) -> SpecEngine:
    target = tiny_llama(seed=1)
    engine = SpecEngine(target, ModelDrafter(noisy_copy(target, 0.3)))
    engine.runner.costs = lambda: costs  # a fixed curve, not one measured on this machine
    return engine


def adaptive_request(engine: SpecEngine, prompt: list[int], seed: int, k: int = 6) -> list[int]:
    config = GenerationConfig(max_new_tokens=40, k=k, adaptive=True, stop_on_eos=False,
                              sampling=SamplingConfig(temperature=0.8, top_p=0.95, seed=seed))
    return engine.generate(prompt, config).tokens


def test_seeded_request_is_reproducible_after_other_traffic(monkeypatch):
    """Same request, same seed, same tokens, whatever ran in between: adaptive draft lengths and the model
    drafter's cache are per request. (Passes if the adaptive state is fresh per request; fails if it is
    carried over from the requests in between.)"""
    monkeypatch.setattr(engine_module, "time", FakeClock(tick=1e-3))
    # verification costs far more than drafting: drafting pays, and its length follows acceptance
    engine = adaptive_sampling_engine(CostCurve([1, 2, 4, 8], [10.0, 10.5, 11.5, 14.0]))
    prompt = [20, 21, 22, 23, 20, 21]
    first = adaptive_request(engine, prompt, seed=5)
    for other_prompt, other_seed, other_k in (([30, 31] * 10, 6, 6), ([40], 11, 2), (prompt + first, 5, 4)):
        adaptive_request(engine, other_prompt, other_seed, other_k)
    assert adaptive_request(engine, prompt, seed=5) == first


def test_seeded_adaptive_request_does_not_depend_on_timing(monkeypatch):
    """The same seeded request, once while drafting looks cheap and once while it looks slow (a loaded
    machine), must give the same tokens."""
    engine = adaptive_sampling_engine(CostCurve([1, 2, 4, 8], [0.010, 0.0105, 0.0115, 0.014]))
    prompt = [20, 21, 22, 23, 20, 21]
    runs = []
    for tick in (1e-5, 5e-3):  # the engine reads the clock twice around each draft
        monkeypatch.setattr(engine_module, "time", FakeClock(tick))
        runs.append(adaptive_request(engine, prompt, seed=5))
    assert runs[0] == runs[1]
