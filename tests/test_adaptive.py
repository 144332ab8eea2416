"""Adaptive draft length: chosen from measured costs and acceptance, never beyond the budget, never changing
greedy outputs."""

import pytest

import draftsmith.adaptive as adaptive
from draftsmith.adaptive import CostCurve, DraftLength
from draftsmith.drafters.model import ModelDrafter
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.engine import GenerationConfig, SpecEngine
from tiny_models import char_tokenizer, hf_greedy, noisy_copy, tiny_llama

FLAT = CostCurve([1, 2, 4, 8, 16, 32], [0.010, 0.0101, 0.0102, 0.0105, 0.011, 0.013])  # bf16-like
STEEP = CostCurve([1, 2, 4, 8, 16, 32], [0.010, 0.015, 0.020, 0.030, 0.050, 0.090])


def test_cost_curve_interpolates_and_extrapolates():
    assert STEEP(4) == pytest.approx(0.020)
    assert STEEP(3) == pytest.approx(0.0175)
    assert STEEP(12) == pytest.approx(0.040)
    assert STEEP(40) == pytest.approx(0.090 + 0.040 * 8 / 16)


def test_choice_follows_costs_and_acceptance():
    cheap_and_good = DraftLength(FLAT, max_k=16, prior=0.9)
    assert cheap_and_good.next_k(budget=16) == 16
    assert cheap_and_good.next_k(budget=5) == 5  # never beyond the budget
    steep_and_bad = DraftLength(STEEP, max_k=16, prior=0.2)
    assert steep_and_bad.next_k(budget=16) == 0  # drafting would only cost time
    middle = DraftLength(STEEP, max_k=16, prior=0.8).next_k(budget=16)
    assert 1 <= middle < 16


def test_acceptance_estimate_tracks_outcomes():
    length = DraftLength(FLAT, max_k=8, prior=0.5, memory=0.5)
    length.update(proposed=8, accepted=8, draft_seconds=0.0)
    assert length.acceptance == pytest.approx(0.75)
    length.update(proposed=8, accepted=0, draft_seconds=0.0)
    assert length.acceptance == pytest.approx(0.375)
    for _ in range(30):
        length.update(proposed=0, accepted=0, draft_seconds=0.0)  # nothing drafted: back towards the prior
    assert length.acceptance == pytest.approx(0.6, abs=0.01)


class RecordingDrafter:
    """Wraps a drafter and records every budget it was given and every draft length it returned."""

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, []

    def reset(self, *args):
        self.inner.reset(*args)

    def propose(self, context, k):
        draft = self.inner.propose(context, k)
        self.calls.append((k, len(draft)))
        return draft


@pytest.mark.parametrize("costs", [FLAT, STEEP], ids=["flat", "steep"])
def test_adaptive_engine_is_exact_and_within_budget(costs):
    tok, target = char_tokenizer(), tiny_llama(seed=1)
    for inner in (NgramDrafter(), ModelDrafter(noisy_copy(target, 0.3))):
        drafter = RecordingDrafter(inner)
        engine = SpecEngine(target, drafter, tok)
        engine.draft_length = DraftLength(costs, max_k=6)
        for prompt in ("def add(a, b):\n    return a + b\n\ndef add(", "abcabcabc"):
            ids = tok(prompt).input_ids
            result = engine.generate(ids, GenerationConfig(max_new_tokens=30, k=6, adaptive=True))
            assert result.tokens == hf_greedy(target, ids, 30)
        assert all(0 < k <= 6 and n <= k for k, n in drafter.calls)


def test_calibration_is_measured_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = tiny_llama(seed=1)
    first = SpecEngine(target, NgramDrafter()).runner.costs()
    assert (tmp_path / "draftsmith" / "calibration.json").is_file()
    assert first.sizes == list(adaptive.CALIBRATION_SIZES)
    assert all(b >= a > 0 for a, b in zip(first.seconds, first.seconds[1:]))

    def no_measuring(*args, **kwargs):
        raise AssertionError("the cached calibration should have been used")

    monkeypatch.setattr(adaptive, "measure_costs", no_measuring)
    assert SpecEngine(target, NgramDrafter()).runner.costs() == first
