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
from dataclasses import asdict, dataclass

import torch

from draftsmith.paths import cache_dir

CALIBRATION_SIZES = (1, 2, 4, 8, 12, 16, 24, 32)
CALIBRATION_CONTEXT = 200
COST_MODEL_VERSION = 3  # part of the cache key: bump when a backend's forward changes, so costs are re-measured


@dataclass
class CostCurve:
    sizes: list[int]  # tokens fed in one forward
    seconds: list[float]  # median wall time of that forward

    def __call__(self, n: int) -> float:
        """Seconds for a forward over n tokens, interpolated linearly (extrapolated past the last size)."""
        pairs = list(zip(self.sizes, self.seconds))
        for (n0, s0), (n1, s1) in zip(pairs, pairs[1:]):
            if n <= n1:
                return s0 + (s1 - s0) * (max(n, n0) - n0) / (n1 - n0)
        (n0, s0), (n1, s1) = pairs[-2], pairs[-1]
        return s1 + (s1 - s0) * (n - n1) / (n1 - n0)


def calibration_key(model: torch.nn.Module, backend: str) -> str:
    config = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    digest = hashlib.sha1(config.encode()).hexdigest()[:12]
    device = next(model.parameters()).device
    return f"v{COST_MODEL_VERSION}-{digest}-{device}-{model.dtype}-{backend}-threads{torch.get_num_threads()}"


@torch.no_grad()
def measure_costs(lm, vocab_size: int, sizes=CALIBRATION_SIZES, repeats: int = 5) -> CostCurve:
    """Time forwards of each size on top of a CALIBRATION_CONTEXT-token cache (the lm's state is reset)."""
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(vocab_size, (CALIBRATION_CONTEXT,), generator=generator).tolist()
    lm.reset(CALIBRATION_CONTEXT + max(sizes))
    lm.forward(context, last_only=True)
    seconds = []
    for n in sizes:
        tokens = torch.randint(vocab_size, (n,), generator=generator).tolist()
        times = []
        for _ in range(repeats + 1):  # the first run warms up this shape
            start = time.perf_counter()
            lm.forward(tokens)
            times.append(time.perf_counter() - start)
            lm.truncate(CALIBRATION_CONTEXT)
        seconds.append(statistics.median(times[1:]))
    # cost never falls with more tokens; noise can make it look so
    for i in range(1, len(seconds)):
        seconds[i] = max(seconds[i], seconds[i - 1])
    return CostCurve(list(sizes), seconds)


def calibrated_costs(model: torch.nn.Module, lm, backend: str, refresh: bool = False) -> CostCurve:
    """The cost curve of this model on this device and dtype, measured once and cached on disk."""
    path = cache_dir() / "calibration.json"
    key = calibration_key(model, backend)
    table = json.loads(path.read_text()) if path.is_file() else {}
    if key in table and not refresh:
        return CostCurve(**table[key])
    curve = measure_costs(lm, model.config.vocab_size)
    table[key] = asdict(curve)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)
    return curve


class DraftLength:
    """Per-step draft length from the cost curve and an exponential average of the acceptance probability."""

    def __init__(self, costs: CostCurve, max_k: int, prior: float = 0.6, memory: float = 0.8):
        self.costs, self.max_k, self.memory = costs, max_k, memory
        self.acceptance = prior  # probability that the next drafted token is accepted, given the previous was
        self.draft_cost = 0.0  # seconds per drafted token

    def next_k(self, budget: int) -> int:
        a = min(self.acceptance, 0.99)
        best_k, best_rate = 0, 1.0 / self.costs(1)
        for k in range(1, min(self.max_k, budget) + 1):
            rate = (1 - a ** (k + 1)) / (1 - a) / (self.costs(k + 1) + k * self.draft_cost)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def update(self, proposed: int, accepted: int, draft_seconds: float, prior: float = 0.6) -> None:
        if proposed == 0:  # nothing drafted: drift back towards the prior so drafting gets tried again
            self.acceptance = self.memory * self.acceptance + (1 - self.memory) * prior
            return
        # accepted tokens are successes; the first rejected one, if any, is the one failure of this step
        trials = accepted + (1 if accepted < proposed else 0)
        observed = accepted / trials
        self.acceptance = self.memory * self.acceptance + (1 - self.memory) * observed
        self.draft_cost = self.memory * self.draft_cost + (1 - self.memory) * draft_seconds / proposed
