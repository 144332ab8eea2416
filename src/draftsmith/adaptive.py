"""Choose the draft length per step from what verification costs on this machine and what the drafter has
recently had accepted.

A target forward over n tokens costs c(n), measured once per model/device/dtype (the calibration) and cached on
disk. With a per-token acceptance probability a, a draft of k tokens yields (1 - a^(k+1)) / (1 - a) tokens in
expectation, bonus included; the step costs c(k + 1) + k * d, where d is the drafter's cost per drafted token.
We pick the k that maximises tokens per second.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Hashable
from dataclasses import asdict, dataclass

import torch

from draftsmith.machine import cpu_key
from draftsmith.paths import cached_entry

CALIBRATION_SIZES = (1, 2, 4, 8, 12, 16, 24, 32)
CALIBRATION_CONTEXT = 200
COST_MODEL_VERSION = 5  # part of the cache key: bump when a backend's forward changes, so costs are re-measured
DRIFT = 2.0  # a forward observed this many times slower or faster than its calibrated cost: measure again
DRIFT_EVIDENCE = 16  # forwards of one size a request must have timed before its drift counts


@dataclass
class CostCurve:
    sizes: list[int]  # tokens fed in one forward
    seconds: list[float]  # wall time of that forward: the least of its rounds' medians
    noise: float = 0.0  # the rounds' spread, relative (median over sizes): how much the machine moved meanwhile

    def __call__(self, n: int) -> float:
        """Seconds for a forward over n tokens, interpolated linearly (extrapolated past the last size)."""
        pairs = list(zip(self.sizes, self.seconds))
        for (n0, s0), (n1, s1) in zip(pairs, pairs[1:]):
            if n <= n1:
                return s0 + (s1 - s0) * (max(n, n0) - n0) / (n1 - n0)
        (n0, s0), (n1, s1) = pairs[-2], pairs[-1]
        return s1 + (s1 - s0) * (n - n1) / (n1 - n0)


def calibration_key(model: torch.nn.Module, backend: str) -> str:
    """Model, backend, dtype, threads and the machine itself: a cache carried to another CPU (or GPU) is
    measured anew there, not read back."""
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha1(config.encode()).hexdigest()[:12]
    device = model.device
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_key()
    return (f"v{COST_MODEL_VERSION}-{digest}-{device}-{model.dtype}-{backend}-threads{torch.get_num_threads()}"
            f"-{machine}")


@torch.no_grad()
def measure_costs(lm, vocab_size: int, sizes=CALIBRATION_SIZES, repeats: int = 3, rounds: int = 3) -> CostCurve:
    """Time forwards of each size on top of a CALIBRATION_CONTEXT-token cache (the lm's state is reset): the
    sizes take turns over `rounds` rounds of `repeats` timings each, and each keeps the least of its rounds'
    medians, so a burst of load during one round cannot set the curve; the rounds' spread is kept as `noise`."""
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(vocab_size, (CALIBRATION_CONTEXT,), generator=generator).tolist()
    lm.reset(CALIBRATION_CONTEXT + max(sizes))
    lm.forward(context, last_only=True)
    feeds = {n: torch.randint(vocab_size, (n,), generator=generator).tolist() for n in sizes}
    medians: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            times = []
            for _ in range(repeats + 1):  # the first run warms up this shape
                synchronize(lm)
                start = time.perf_counter()
                lm.forward(feeds[n])
                synchronize(lm)  # CUDA runs asynchronously: time the work, not its launch
                times.append(time.perf_counter() - start)
                lm.truncate(CALIBRATION_CONTEXT)
            medians[n].append(statistics.median(times[1:]))
    seconds = [min(medians[n]) for n in sizes]
    # cost never falls with more tokens; noise can make it look so
    for i in range(1, len(seconds)):
        seconds[i] = max(seconds[i], seconds[i - 1])
    noise = statistics.median((max(m) - min(m)) / min(m) for m in medians.values() if min(m) > 0) if sizes else 0.0
    return CostCurve(list(sizes), seconds, noise)


def synchronize(lm) -> None:
    device = getattr(lm, "device", None) or lm.model.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drifted(costs: CostCurve, observed: dict[int, list[float]]) -> bool:
    """Whether forwards timed during a request (tokens fed -> seconds) say the curve is off by DRIFT or more:
    judged on the size timed most often, by its median, once it has DRIFT_EVIDENCE timings."""
    if not observed:
        return False
    size, times = max(observed.items(), key=lambda item: len(item[1]))
    if len(times) < DRIFT_EVIDENCE or costs(size) <= 0:
        return False
    ratio = statistics.median(times) / costs(size)
    return ratio > DRIFT or ratio < 1 / DRIFT


def calibrated_costs(model: torch.nn.Module, lm, backend: str, refresh: bool = False) -> CostCurve:
    """The cost curve of this model on this device and dtype, measured once and cached on disk (again with
    `refresh`: when a run saw it drift)."""
    measure = lambda: asdict(measure_costs(lm, model.config.vocab_size))  # noqa: E731 (looked up when called)
    return CostCurve(**cached_entry("calibration.json", calibration_key(model, backend), measure, refresh))


class DraftLength:
    """Per-step draft length from the cost curve and a running estimate of the acceptance probability.

    The estimate is a ratio of discounted sums, accepted tokens over trials (accepted tokens plus the one
    rejected token, if any): the maximum-likelihood estimate for acceptances that stop at the first rejection.
    Averaging each step's own ratio instead would read a true rate of 0.5 as about 0.3, as a step's ratio is
    at most accepted / (accepted + 1). The prior enters as `prior_trials` pseudo-trials at rate `prior`.

    A drafter that can tell its proposals apart before making them (the n-gram drafter: how long a context
    suffix it matched) names a `kind` per step, and each kind keeps its own estimate: a 4-token match is
    accepted far more often than a 1-token one, and one shared estimate drafts too long after weak matches and
    too short after strong ones, which matters where a second token costs much more than the first (llama.cpp).
    """

    def __init__(
        self, costs: CostCurve, max_k: int, prior: float = 0.6, memory: float = 0.9, prior_trials: float = 2.0,
        draft_cost: float | None = None,
    ):
        """`draft_cost`: seconds per drafted token, fixed (e.g. calibrated once, like `costs`); None learns it
        from the measured draft times, which makes the draft lengths, and so a seeded request's random draws,
        depend on the machine's load."""
        if not 0 <= prior <= 1:
            raise ValueError(f"prior must be a probability, got {prior}")
        self.costs, self.max_k, self.memory = costs, max_k, memory
        self.prior, self.prior_trials = prior, prior_trials
        # discounted sums per kind, [accepted, trials]: each step's counts weigh `memory` times less than the next
        self.counts: dict[Hashable, list[float]] = {}
        self.draft_seconds = self.drafted = 0.0  # discounted sums too: no start-up bias towards zero cost
        self.timed_steps = 0
        self.fixed_draft_cost = draft_cost

    def _counts(self, kind: Hashable) -> list[float]:
        return self.counts.setdefault(kind, [self.prior * self.prior_trials, self.prior_trials])

    def acceptance(self, kind: Hashable = None) -> float:
        """Estimated probability that the next drafted token of this kind is accepted, given the previous one was."""
        accepted, trials = self._counts(kind)
        return accepted / trials if trials > 0 else self.prior

    @property
    def draft_cost(self) -> float:
        """Seconds per drafted token (0 until a second step drafted something)."""
        if self.fixed_draft_cost is not None:
            return self.fixed_draft_cost
        return self.draft_seconds / self.drafted if self.drafted > 0 else 0.0

    def next_k(self, budget: int, kind: Hashable = None) -> int:
        a = min(self.acceptance(kind), 0.99)
        best_k, best_rate = 0, 1.0 / self.costs(1)
        for k in range(1, min(self.max_k, budget) + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (self.costs(k + 1) + k * self.draft_cost)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def update(self, proposed: int, accepted: int, draft_seconds: float, kind: Hashable = None) -> None:
        m, counts = self.memory, self._counts(kind)
        if proposed == 0:
            # nothing drafted, nothing observed: the evidence fades back towards the prior's pseudo-counts,
            # so that drafting gets tried again once the old, poor acceptances are forgotten
            counts[0] = m * counts[0] + (1 - m) * self.prior * self.prior_trials
            counts[1] = m * counts[1] + (1 - m) * self.prior_trials
            return
        # accepted tokens are successes; the first rejected one, if any, is the one failure of this step
        counts[0] = m * counts[0] + accepted
        counts[1] = m * counts[1] + accepted + (1 if accepted < proposed else 0)
        self.timed_steps += 1
        if self.timed_steps > 1:  # a request's first draft also feeds the prompt to the drafter: not a per-token cost
            self.draft_seconds = m * self.draft_seconds + draft_seconds
            self.drafted = m * self.drafted + proposed


def best_tree_size(values: torch.Tensor, costs: CostCurve, budget: int, draft_seconds: float = 0.0) -> int:
    """How many of the best nodes (values: their acceptance probabilities, sorted descending) to verify:
    maximise (1 + sum of the kept values) / (cost of verifying them + drafting)."""
    gains = 1 + torch.cumsum(values[:budget].double(), 0)
    rates = [float(g) / (costs(n + 2) + draft_seconds) for n, g in enumerate(gains)]
    best = max(range(len(rates)), key=rates.__getitem__, default=-1)
    if best < 0 or 1 / (costs(1) + draft_seconds) >= rates[best]:
        return 0
    return best + 1
