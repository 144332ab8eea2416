"""Weight-format choices that one noisy timing cannot decide: interleaved rounds, a clear margin over the preferred
candidate or the preference order, the margin kept in the cache, and `draftsmith doctor` to show and reset it."""

import json

import pytest
import torch
from typer.testing import CliRunner

import draftsmith.backends.timing as timing
from draftsmith.backends.format_choice import preferred_first
from draftsmith.backends.formats import WeightFormat
from draftsmith.backends.timing import CLEAR_MARGIN, fastest
from draftsmith.cli.main import app


class FakeClock:
    """perf_counter for `fastest`: each run advances it by its candidate's cost (a burst adds to one turn)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def run(self, costs: list[float]):
        costs = iter(costs)
        return lambda: setattr(self, "now", self.now + next(costs))


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_a_win_within_the_margin_keeps_the_preferred_candidate(clock):
    level = 1.0 - CLEAR_MARGIN / 2  # the second candidate is a little faster in every round: within the noise
    runs = {"preferred": clock.run([1.0] * 5), "other": clock.run([level] * 5)}
    timing = {}
    assert fastest(runs, rounds=5, repeats=1, timing=timing) == "preferred"
    assert timing["margin"] < 0 and timing["ms"] == {"preferred": 1000.0, "other": level * 1000}


def test_a_clear_win_is_kept_and_a_burst_of_load_in_one_round_decides_nothing(clock):
    # the preferred candidate's first turn fell in a burst of load (5x); each keeps its best round
    runs = {"preferred": clock.run([5.0, 1.0, 1.0]), "other": clock.run([0.7, 0.7, 0.7])}
    timing = {}
    assert fastest(runs, rounds=3, repeats=1, timing=timing) == "other"
    assert timing["margin"] == pytest.approx(1 / 0.7 - 1, abs=1e-3)
    burst = {"preferred": clock.run([1.0, 1.0, 1.0]), "other": clock.run([1.0, 3.0, 1.0])}
    assert fastest(burst, rounds=3, repeats=1) == "preferred"


def test_the_fused_kernels_formats_come_first_in_the_preference_order():
    names = ["stored", "transposed", "onednn", "fp16", "bf16-amx", "bf16-fused"]
    assert [f.name for f in preferred_first([WeightFormat(n) for n in names])] == [
        "bf16-fused", "bf16-amx", "fp16", "onednn", "transposed", "stored"]


def test_a_bf16_weight_is_timed_in_the_amx_format_exactly_where_this_cpu_runs_it():
    from draftsmith.backends.formats import amx_available, candidate_formats

    names = [f.name for f in candidate_formats(torch.randn(64, 32).bfloat16(), fp16=False, fused=True)]
    assert ("bf16-amx" in names) == amx_available(torch.device("cpu"), True)
    assert "bf16-amx" not in [f.name for f in candidate_formats(torch.randn(64, 32), fp16=False, fused=True)]


def test_doctor_shows_each_choice_with_its_margin_and_resets_them(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    table = tmp_path / "draftsmith" / "weight_formats.json"
    table.parent.mkdir(parents=True)
    table.write_text(json.dumps({"cpu-step-bf16": {"choice": "bf16-fused", "margin": 0.081,
                                                   "ms": {"bf16-fused": 7.7, "fp16": 8.3}},
                                 "cpu-old": "fp16"}))
    shown = CliRunner().invoke(app, ["doctor"], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "bf16-fused: won by +8.1%" in shown.output and "fp16 8.3 ms" in shown.output
    assert "no margin recorded" in shown.output and "nothing measured yet" in shown.output
    reset = CliRunner().invoke(app, ["doctor", "--reset"])
    assert reset.exit_code == 0 and "removed" in reset.output and not table.exists()
