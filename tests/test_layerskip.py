"""Self-speculation by layer skipping: exactness, holes in the cache, and the measurement `layerskip:auto` uses."""

from __future__ import annotations

import pytest
import torch

from draftsmith.acceptance import SamplingConfig
from draftsmith.drafters.layerskip import LayerSkipDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from draftsmith.errors import ConfigError
from draftsmith.layer_search import dense_contexts, expected_rate, first_draft_agreement
from draftsmith.sparse import FixedSkip, SparseStep
from draftsmith.adaptive import CostCurve
from draftsmith.target_runner import TargetRunner
from test_sampling import ALPHA, PROMPT, VOCAB, assert_test_has_power, chi_square_pvalue, exact_joint, sampled_joint
from tiny_models import hf_greedy, tiny_llama

PROMPTS = [[5, 17, 33, 9, 2], [40, 41, 42, 43, 40, 41], [7] * 9, [3, 60, 61, 3, 60]]


@pytest.fixture(scope="module")
def target():
    return tiny_llama(num_layers=6, hidden_size=64, init_std=0.08, seed=3)


@pytest.mark.parametrize("skipped", [{1}, {1, 2, 4}])
def test_layerskip_greedy_output_is_the_targets(target, skipped):
    drafter = LayerSkipDrafter(FixedSkip(6, frozenset(skipped)))
    engine = SpecEngine(target, drafter)
    proposed = accepted = 0
    for prompt in PROMPTS:
        out = engine.generate(prompt, GenerationConfig(max_new_tokens=24, k=4, stop_on_eos=False))
        assert out.tokens == hf_greedy(target, prompt, 24)
        proposed += out.stats.proposed
        accepted += out.stats.accepted
    assert 0 < accepted < proposed  # the sparse draft is right often, not always
    assert drafter.statistics()["executed_ratio"] == pytest.approx(1 - len(skipped) / 6)


def test_layerskip_sampling_keeps_the_targets_distribution():
    target = tiny_llama(vocab_size=VOCAB, num_layers=4, seed=11, init_std=0.3)
    cfg = SamplingConfig(temperature=1.0)
    expected = exact_joint(target, PROMPT, cfg)
    engine = SpecEngine(target, LayerSkipDrafter(FixedSkip(4, frozenset({1, 2}))))
    counts, stats = sampled_joint(engine, PROMPT, cfg, n=1500, k=3)
    assert 0 < stats.accepted < stats.proposed
    assert chi_square_pvalue(counts, expected) > ALPHA
    uniform = torch.full_like(torch.tensor(expected), 1 / expected.size).numpy()
    assert_test_has_power(expected, uniform, 1500)


class SkipFirstToken:
    """Skips `layer` for the first token it sees, runs everything else."""

    def __init__(self, num_layers: int, layer: int):
        self.num_layers, self.layer, self.seen = num_layers, layer, 0

    def executes(self, layer: int, x: torch.Tensor) -> bool:
        if layer == 0:
            self.seen += 1
        return not (layer == self.layer and self.seen == 1)


def second_token_logits(runner: TargetRunner, policy, poison: float) -> torch.Tensor:
    """Draft two tokens; between them, overwrite the first token's layer-2 slot with `poison`."""
    runner.prefill([5, 17, 33, 9, 2])
    start = runner.length
    step = SparseStep(runner.lm, policy)
    step.begin(start + 4)
    step(2, start)
    runner.lm.k_cache[2, :, start] = poison
    runner.lm.v_cache[2, :, start] = poison
    return step(40, start + 1)


def test_a_skipped_layer_state_is_never_attended(target):
    """The first draft token skips layer 2, so its slot there holds no state of its own: whatever it holds, the
    next token's logits are the same. (Power: where the first token ran layer 2, the slot is attended.)"""
    runner = TargetRunner(target)
    skipped = [second_token_logits(runner, SkipFirstToken(6, layer=2), poison) for poison in (1e3, -1e3)]
    assert torch.isfinite(skipped[0]).all() and torch.equal(skipped[0], skipped[1])
    ran = [second_token_logits(runner, FixedSkip(6, frozenset()), poison) for poison in (1e3, -1e3)]
    assert not torch.allclose(ran[0], ran[1])


def test_batched_agreement_is_what_one_token_drafts_measure(target):
    """`layerskip:auto` scores all positions at once; that must equal drafting each position alone over the
    dense cache, as the drafter does. Skipping nothing agrees everywhere."""
    prompt = [5, 17, 33, 9, 2, 40, 41]
    ids = prompt + hf_greedy(target, prompt, 12)
    runner = TargetRunner(target)
    contexts = dense_contexts(runner.lm, [(ids, len(prompt))])
    skipped = {1, 3}
    hits = 0
    for position in range(len(prompt) - 1, len(ids) - 1):
        runner.prefill(ids[: position + 1])
        step = SparseStep(runner.lm, FixedSkip(6, frozenset(skipped)))
        step.begin(position + 2)
        hits += int(step(ids[position], position).argmax()) == ids[position + 1]
    assert first_draft_agreement(runner.lm, contexts, skipped) == pytest.approx(hits / (len(ids) - len(prompt)))
    assert first_draft_agreement(runner.lm, contexts, set()) == 1.0
    assert first_draft_agreement(runner.lm, contexts, set(range(5))) < 1.0


def test_expected_rate_follows_agreement_and_costs():
    flat = CostCurve([1, 2, 4, 8, 16], [1.0, 1.0, 1.0, 1.0, 1.0])  # verifying more tokens costs nothing extra
    rate, k = expected_rate(0.9, 0.1, flat, max_k=8)
    assert k > 1 and rate > 1.0  # a good, cheap draft pays, with long chains
    rate, k = expected_rate(0.05, 0.5, flat, max_k=8)
    assert k == 1 and rate < 1.0  # a poor, costly one does not


def test_bad_skip_sets_are_refused(target):
    with pytest.raises(ConfigError, match="do not exist"):
        FixedSkip(6, frozenset({6}))
    with pytest.raises(ConfigError, match="at least one layer"):
        FixedSkip(6, frozenset(range(6)))
    with pytest.raises(ConfigError, match="for 4 layers"):
        SpecEngine(target, LayerSkipDrafter(FixedSkip(4, frozenset({1}))))
