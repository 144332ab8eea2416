"""Adaptive draft length: chosen from measured costs and acceptance, never beyond the budget, never changing
greedy outputs."""

import random
import statistics

import pytest

import draftsmith.adaptive as adaptive
from draftsmith.adaptive import CostCurve, DraftLength
from draftsmith.drafters.base import Drafter
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


def simulated_steps(length: DraftLength, a: float, k: int, steps: int, rng: random.Random) -> list[float]:
    """Feed `length` steps whose drafted tokens are each accepted with probability a until the first
    rejection (a geometric count, truncated at k); return the estimate after every step."""
    estimates = []
    for _ in range(steps):
        accepted = 0
        while accepted < k and rng.random() < a:
            accepted += 1
        length.update(proposed=k, accepted=accepted, draft_seconds=0.0)
        estimates.append(length.acceptance())
    return estimates


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("a", [0.3, 0.5, 0.7, 0.9])
def test_acceptance_estimate_is_unbiased(a, k):
    """Averaging per-step ratios accepted / (accepted + 1) read 0.5 as 0.32 and 0.7 as 0.50; the ratio of
    sums converges to the true rate, from any prior."""
    rng = random.Random(f"{a}-{k}")
    for prior in (0.1, 0.9):
        estimates = simulated_steps(DraftLength(FLAT, max_k=k, prior=prior), a, k, steps=3000, rng=rng)
        assert statistics.fmean(estimates[50:]) == pytest.approx(a, abs=0.05)  # no bias over time
    # with a long memory the estimate itself settles close to the rate
    slow = DraftLength(FLAT, max_k=k, prior=0.5, memory=0.995)
    assert simulated_steps(slow, a, k, steps=3000, rng=rng)[-1] == pytest.approx(a, abs=0.05)


def test_estimate_without_drafts_returns_to_the_configured_prior():
    for prior in (0.2, 0.6, 0.85):
        length = DraftLength(STEEP, max_k=8, prior=prior)
        assert length.acceptance() == pytest.approx(prior)
        for _ in range(20):
            length.update(proposed=8, accepted=8, draft_seconds=0.001)  # a run of full acceptances
        assert length.acceptance() > 0.95
        for _ in range(100):
            length.update(proposed=0, accepted=0, draft_seconds=0.0)  # nothing drafted: back to the prior
        assert length.acceptance() == pytest.approx(prior, abs=0.01)


def test_draft_length_grows_with_acceptance_on_a_fixed_cost_curve():
    for costs in (FLAT, STEEP):
        chosen = [DraftLength(costs, max_k=16, prior=a).next_k(budget=16) for a in (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)]
        assert chosen == sorted(chosen) and chosen[0] < chosen[-1], (costs, chosen)


def test_draft_cost_is_learnt_without_start_up_bias_and_shortens_drafts():
    length = DraftLength(FLAT, max_k=16, prior=0.9)
    assert length.next_k(16) == 16
    length.update(proposed=4, accepted=4, draft_seconds=1.0)  # the first step's time includes the drafter's prefill
    assert length.draft_cost == 0.0 and length.next_k(16) == 16
    length.update(proposed=4, accepted=4, draft_seconds=4 * 0.01)  # drafting a token costs a whole target step
    assert length.draft_cost == pytest.approx(0.01)  # no start-up bias towards free drafting
    assert length.next_k(16) < 16


def test_a_fixed_draft_cost_ignores_measured_times():
    """With the drafter's cost given, the draft lengths depend on acceptances alone, not on timings."""
    choices = []
    for seconds in (1e-6, 1.0):
        length = DraftLength(FLAT, max_k=16, prior=0.9, draft_cost=0.0005)
        for accepted in (3, 8, 1, 8):
            length.update(proposed=8, accepted=accepted, draft_seconds=seconds)
        assert length.draft_cost == 0.0005
        choices.append(length.next_k(16))
    assert choices[0] == choices[1]


class RecordingDrafter(Drafter):
    """Wraps a drafter and records, for every call, the tokens generated so far, the length asked for and the
    length returned."""

    def __init__(self, inner):
        self.inner, self.name, self.calls, self.prompt_len = inner, inner.name, [], 0

    def reset(self, prompt_ids, *args):
        self.prompt_len = len(prompt_ids)
        self.inner.reset(prompt_ids, *args)

    def propose(self, context, k):
        draft = self.inner.propose(context, k)
        self.calls.append((len(context) - self.prompt_len, k, len(draft)))
        return draft


def adaptive_engine(target, drafter, tok, costs: CostCurve) -> SpecEngine:
    engine = SpecEngine(target, drafter, tok)
    engine.runner.costs = lambda: costs  # this test's cost curve, not the one measured on this machine
    return engine


@pytest.mark.parametrize("costs", [FLAT, STEEP], ids=["flat", "steep"])
def test_adaptive_engine_is_exact_and_within_budget(costs):
    tok, target = char_tokenizer(), tiny_llama(seed=1)
    new = 30
    for inner in (NgramDrafter(), ModelDrafter(noisy_copy(target, 0.3))):
        drafter = RecordingDrafter(inner)
        engine = adaptive_engine(target, drafter, tok, costs)
        for prompt in ("def add(a, b):\n    return a + b\n\ndef add(", "abcabcabc"):
            ids = tok(prompt).input_ids
            result = engine.generate(ids, GenerationConfig(max_new_tokens=new, k=6, adaptive=True))
            assert result.tokens == hf_greedy(target, ids, new)
        assert drafter.calls
        # at most max_k, and never more than the tokens still to generate (the bonus token is always one)
        assert all(k <= min(6, new - done - 1) and n <= k for done, k, n in drafter.calls)


def test_adaptive_engine_drafts_less_when_verification_costs_more():
    """The engine's choice follows the cost curve: with a drafter that is seldom right, drafting pays on a
    flat curve (a few more tokens verify for free) and not on a steep one. The curves are scaled up (10 s a
    step) so that the tiny drafter's real, noisy time per token is negligible beside them."""
    tok, target = char_tokenizer(), tiny_llama(seed=1)
    ids = tok("for i in range(10):\n    print(i)\n").input_ids
    drafted = {}
    for name, curve in (("flat", FLAT), ("steep", STEEP)):
        costs = CostCurve(curve.sizes, [1000 * s for s in curve.seconds])
        drafter = RecordingDrafter(ModelDrafter(tiny_llama(seed=99)))
        engine = adaptive_engine(target, drafter, tok, costs)
        result = engine.generate(ids, GenerationConfig(max_new_tokens=40, k=6, adaptive=True))
        assert result.tokens == hf_greedy(target, ids, 40)
        drafted[name] = sum(k for _, k, _ in drafter.calls)
    assert drafted["flat"] > 2 * drafted["steep"], drafted


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


def test_each_draft_kind_keeps_its_own_acceptance_estimate():
    """A strong match and a weak one are estimated apart: after long accepted drafts of one kind and rejected
    drafts of another, the first drafts long and the second not at all, and an unseen kind starts at the prior."""
    length = DraftLength(STEEP, max_k=16, prior=0.6)
    for _ in range(30):
        length.update(proposed=8, accepted=8, draft_seconds=0.0, kind=4)
        length.update(proposed=8, accepted=0, draft_seconds=0.0, kind=1)
    assert length.acceptance(4) > 0.95 and length.acceptance(1) < 0.05
    assert length.next_k(16, kind=4) == 16 and length.next_k(16, kind=1) == 0
    assert length.acceptance(2) == pytest.approx(0.6)
    assert length.acceptance() == pytest.approx(0.6)  # steps without a kind share one estimate of their own


def test_ngram_kind_is_the_length_of_the_match_it_copies():
    drafter = NgramDrafter(min_n=1, max_n=4)
    drafter.reset([], None, None)
    context = [5, 6, 7, 8, 9, 5, 6, 7, 8]
    assert drafter.draft_kind(context) == 4 and drafter.propose(context, 2).tokens == [9, 5]
    assert drafter.draft_kind(context + [3]) == 0 and not drafter.propose(context + [3], 2).tokens
    assert drafter.draft_kind([1, 2, 1]) == 1  # rolled back to another context: re-indexed, a 1-token match


def test_adaptive_engine_sizes_drafts_per_ngram_match_length():
    """The engine asks the n-gram drafter for its kind each step and keeps one estimate per match length:
    output stays greedy-exact, and the estimates the engine built are keyed by those lengths."""
    tok, target = char_tokenizer(), tiny_llama(seed=1)
    engine = adaptive_engine(target, NgramDrafter(), tok, STEEP)
    built = []
    make = engine.adaptive_length
    engine.adaptive_length = lambda max_k: built.append(make(max_k)) or built[-1]
    ids = tok("def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a").input_ids
    result = engine.generate(ids, GenerationConfig(max_new_tokens=30, k=8, adaptive=True))
    assert result.tokens == hf_greedy(target, ids, 30)
    kinds = set(built[0].counts)
    assert kinds and kinds <= {0, 1, 2, 3, 4} and kinds & {1, 2, 3, 4}, kinds


def test_a_calibration_from_another_machine_is_measured_anew(tmp_path, monkeypatch):
    """The cache may travel with a home folder to another CPU (an AVX2-only VM under the same model name):
    its costs are not read back there."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = tiny_llama(seed=1)
    SpecEngine(target, NgramDrafter()).runner.costs()
    measured = []
    monkeypatch.setattr(adaptive, "measure_costs", lambda *args, **kwargs: measured.append(1) or FLAT)
    SpecEngine(target, NgramDrafter()).runner.costs()
    assert not measured  # the same machine reads its cache
    monkeypatch.setattr(adaptive, "cpu_key", lambda: "another CPU-0123abcd")
    assert SpecEngine(target, NgramDrafter()).runner.costs() == FLAT and measured == [1]


def test_cache_tables_keep_entries_other_processes_wrote_meanwhile(tmp_path, monkeypatch):
    """Two processes measuring different keys at once: the second writer re-reads the table before renaming
    its own file over it, so neither entry is lost and no temporary file is left."""
    from draftsmith.paths import cached_entry

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def measure_while_another_process_writes():
        assert cached_entry("table.json", "theirs", lambda: 2) == 2  # lands while we measure
        return 1

    assert cached_entry("table.json", "ours", measure_while_another_process_writes) == 1
    assert cached_entry("table.json", "ours", lambda: 99) == 1 and cached_entry("table.json", "theirs", lambda: 99) == 2
    assert cached_entry("table.json", "ours", lambda: 3, refresh=True) == 3
    assert [p.name for p in (tmp_path / "draftsmith").iterdir()] == ["table.json"]
