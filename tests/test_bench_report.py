"""Report arithmetic on a crafted example, computed by hand, and the files it writes."""

import json
import math
import random
import statistics

import pytest

from draftsmith.bench.report import PromptRecord, markdown_table, summarize, write_report


@pytest.fixture
def records():
    R = PromptRecord
    return [
        # baseline: HF generate, 1 s and 3 s
        R("hf", "p0", 10, 1.0, 10, output_tokens=[1, 2, 3]),
        R("hf", "p1", 10, 3.0, 10, output_tokens=[4, 5, 6]),
        # our plain loop: 0.18 s per step
        R("plain", "p0", 10, 1.8, 10, verify_seconds=1.8, output_tokens=[1, 2, 3]),
        R("plain", "p1", 10, 1.8, 10, verify_seconds=1.8, output_tokens=[4, 5, 6]),
        # a drafter: fast on p0, slow on p1 (aggregate and per-prompt speedups differ)
        R("ngram", "p0", 10, 0.25, 4, proposed=12, accepted=6, draft_seconds=0.05, verify_seconds=0.15,
          output_tokens=[1, 2, 3], passed=True, exact_match=True, edit_similarity=100.0, peak_memory_mb=50),
        R("ngram", "p1", 10, 2.75, 6, proposed=8, accepted=2, draft_seconds=0.25, verify_seconds=2.0,
          output_tokens=[4, 9, 6], passed=False, exact_match=False, edit_similarity=60.0, peak_memory_mb=70),
    ]


def test_speedups_tau_acceptance_by_hand(records):
    s = {m.method: m for m in summarize(records, baseline="hf", plain="plain")}
    ngram = s["ngram"]
    assert ngram.speedup == pytest.approx((1.0 + 3.0) / (0.25 + 2.75))  # 1.333: ratio of totals
    assert ngram.speedup_per_prompt == pytest.approx((1.0 / 0.25 + 3.0 / 2.75) / 2)  # 2.545: mean of ratios
    assert ngram.speedup != pytest.approx(ngram.speedup_per_prompt)
    assert ngram.tokens_per_s == pytest.approx(20 / 3.0)
    assert ngram.tau == pytest.approx(20 / 10) and s["plain"].tau == 1.0
    assert ngram.acceptance == pytest.approx(8 / 20) and s["plain"].acceptance is None
    assert ngram.draft_share == pytest.approx(0.3 / 3.0) and ngram.verify_share == pytest.approx(2.15 / 3.0)
    assert s["hf"].draft_share is None  # HF does not split its time
    assert s["hf"].speedup == 1.0 and s["plain"].speedup == pytest.approx(4.0 / 3.6)


def test_bound_and_efficiency_by_hand(records):
    ngram = next(m for m in summarize(records, baseline="hf", plain="plain") if m.method == "ngram")
    t_plain_step = 3.6 / 20
    step = (0.3 + 2.15) / 10
    bound = 2.0 * t_plain_step / step
    assert ngram.bound == pytest.approx(bound)
    assert ngram.efficiency == pytest.approx((3.6 / 3.0) / bound)  # speedup over plain / bound


def test_exactness_quality_and_memory(records):
    s = {m.method: m for m in summarize(records, baseline="hf", plain="plain")}
    ngram = s["ngram"]
    assert ngram.exactness == 0.5 and ngram.mismatches == ["p1"] and ngram.first_divergence == {"p1": 1}
    assert s["hf"].exactness == 1.0 and s["plain"].exactness is None  # plain is the reference
    assert ngram.pass_at_1 == 0.5 and ngram.exact_match == 0.5 and ngram.edit_similarity == 80.0
    assert ngram.peak_memory_mb == 70 and s["hf"].pass_at_1 is None
    records[-1].exact = True  # the runner's own verdict wins
    assert next(m for m in summarize(records, "hf", "plain") if m.method == "ngram").exactness == 1.0


def test_speedup_uses_only_shared_prompts(records):
    records.append(PromptRecord("ngram", "p2", 10, 100.0, 10))  # the baseline never ran p2
    ngram = next(m for m in summarize(records, "hf", "plain") if m.method == "ngram")
    assert ngram.speedup == pytest.approx(4.0 / 3.0) and ngram.prompts == 3


def test_report_files_are_written(records, tmp_path):
    summaries = summarize(records, baseline="hf", plain="plain")
    paths = write_report(tmp_path / "out", records, summaries, {"model": "tiny"})
    assert set(paths) == {"json", "markdown", "speedup", "tau", "tokens_per_s"}
    data = json.loads(paths["json"].read_text())
    assert data["metadata"]["model"] == "tiny" and len(data["records"]) == 6
    assert [s["method"] for s in data["summaries"]] == ["hf", "plain", "ngram"]
    assert data["summaries"][2]["speedup"] == pytest.approx(4 / 3)
    md = paths["markdown"].read_text()
    assert md == markdown_table(summaries) and "| ngram | 2 | 6.7 | 1.33x | 2.55x | 2.00 | 40.0% |" in md
    for name in ("speedup", "tau", "tokens_per_s"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _paired(ratios: list[float], base_seconds: list[float]) -> list[PromptRecord]:
    """Records of a baseline and a method that runs each prompt `ratio` times faster."""
    return ([PromptRecord("base", f"p{i}", 10, s, 10) for i, s in enumerate(base_seconds)]
            + [PromptRecord("m", f"p{i}", 10, s / r, 10) for i, (s, r) in enumerate(zip(base_seconds, ratios))])


def test_speedup_interval_is_a_t_interval_of_the_log_ratios():
    from scipy import stats

    ratios = [1.1, 1.3, 1.2, 1.25]
    m = next(s for s in summarize(_paired(ratios, [1.0, 2.0, 3.0, 4.0]), baseline="base") if s.method == "m")
    logs = [math.log(r) for r in ratios]
    low, high = stats.t.interval(0.95, len(logs) - 1, loc=statistics.mean(logs), scale=stats.sem(logs))
    assert m.speedup_interval == pytest.approx([math.exp(low), math.exp(high)])
    constant = next(s for s in summarize(_paired([1.5] * 3, [1.0, 5.0, 2.0]), "base") if s.method == "m")
    assert constant.speedup_interval == pytest.approx([1.5, 1.5])  # no spread between prompts: no doubt
    two_prompts = summarize(_paired([1.5] * 2, [1.0, 2.0]), "base")
    assert next(s for s in two_prompts if s.method == "m").speedup_interval is None
    assert "| m | 4 |" in markdown_table(summarize(_paired(ratios, [1.0] * 4), "base"))
    assert f"{math.exp(low):.3f}-{math.exp(high):.3f}x" in markdown_table(summarize(_paired(ratios, [1.0] * 4), "base"))


def test_speedup_interval_covers_the_true_ratio_95_percent_and_tells_2_percent_apart():
    """Simulated paired runs (30 prompts, lognormal noise per call): the interval holds the true speedup in
    about 95% of runs, and at 2% noise it excludes 1 for a true 2% gain in nearly every run."""
    rng = random.Random(0)

    def intervals(true_ratio: float, noise: float, runs: int = 400) -> list[list[float]]:
        out = []
        for _ in range(runs):
            base = [rng.uniform(0.5, 3.0) for _ in range(30)]
            ratios = [true_ratio * math.exp(rng.gauss(0, noise)) for _ in base]
            out.append(next(s for s in summarize(_paired(ratios, base), "base") if s.method == "m").speedup_interval)
        return out

    covered = sum(low <= 1.05 <= high for low, high in intervals(1.05, 0.1))
    assert 0.91 * 400 <= covered <= 0.99 * 400
    assert sum(low > 1.0 for low, _ in intervals(1.02, 0.02)) >= 0.95 * 400
