"""The cost calibration: measured in rounds that a burst of load cannot set, and measured again when a request's
own timed forwards say the cached curve is far off."""

from __future__ import annotations

import pytest

import draftsmith.adaptive as adaptive
from draftsmith.adaptive import DRIFT, DRIFT_EVIDENCE, CostCurve, drifted, measure_costs
from draftsmith.engine import GenerationConfig, SpecEngine
from tiny_models import tiny_llama


class ScriptedLM:
    """A forward whose duration is scripted on a fake clock: `slow_round` runs every forward 10x slower."""

    def __init__(self, clock: list[float], slow_round: int | None):
        self.clock, self.slow_round, self.calls = clock, slow_round, 0
        self.device = type("D", (), {"type": "cpu"})()

    def reset(self, capacity: int = 0) -> None:
        pass

    def truncate(self, length: int) -> None:
        pass

    def forward(self, ids, last_only: bool = False):
        if not last_only:  # the calibration's timed forwards: 3 sizes x 4 (a warm-up and 3 repeats) per round
            self.calls += 1
            cost = 1e-3 * len(ids)
            self.clock[0] += cost * (10 if (self.calls - 1) // 12 == self.slow_round else 1)


def test_a_burst_during_one_round_does_not_set_the_curve(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(adaptive.time, "perf_counter", lambda: clock[0])
    steady = measure_costs(ScriptedLM(clock, None), 100, sizes=(1, 2, 4))
    burst = measure_costs(ScriptedLM(clock, slow_round=1), 100, sizes=(1, 2, 4))
    assert steady.seconds == pytest.approx([1e-3, 2e-3, 4e-3]) and steady.noise == pytest.approx(0.0)
    assert burst.seconds == pytest.approx(steady.seconds)  # the round that ran 10x slower is not the curve
    assert burst.noise == pytest.approx(9.0)  # but it shows as the rounds' spread


def test_drift_is_judged_on_enough_forwards_of_one_size():
    curve = CostCurve([1, 8], [1e-3, 2e-3])
    assert not drifted(curve, {1: [1.5e-3] * DRIFT_EVIDENCE})
    assert drifted(curve, {1: [1e-3 * DRIFT * 1.5] * DRIFT_EVIDENCE})
    assert drifted(curve, {1: [1e-3 / DRIFT / 1.5] * DRIFT_EVIDENCE})
    assert not drifted(curve, {1: [1.0] * (DRIFT_EVIDENCE - 1)})  # too little evidence
    assert not drifted(curve, {})


def test_a_curve_far_from_what_a_request_timed_is_measured_again():
    target = tiny_llama(seed=1)
    engine = SpecEngine(target)
    wrong = CostCurve([1, 32], [1e-12, 2e-12])  # as if measured on a machine a million times faster
    engine.runner._costs = wrong
    prompt = [5, 6, 7, 8, 9]
    first = engine.generate(prompt, GenerationConfig(max_new_tokens=2 * DRIFT_EVIDENCE, k=0))
    measured = engine.runner._costs
    assert measured is not wrong and measured.seconds[0] > 1e-9  # measured again, on this machine
    assert engine.generate(prompt, GenerationConfig(max_new_tokens=2 * DRIFT_EVIDENCE, k=0)).tokens == first.tokens
    from draftsmith.target_runner import backend_key

    assert adaptive.calibrated_costs(target, engine.runner.lm, backend_key(engine.runner.lm, target)) == measured
