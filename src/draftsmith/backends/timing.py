"""Choosing between ways of running by timing them side by side, once per machine, with a margin."""

from __future__ import annotations

import time

import torch

from draftsmith.machine import cpu_key
from draftsmith.paths import cached_entry

CLEAR_MARGIN = 0.05  # a format must be this much faster than the preferred one to displace it


def fastest(runs: dict, rounds: int = 7, repeats: int = 3, timing: dict | None = None):
    """The key of the fastest of `runs` (warmed-up callables, in order of preference). They take turns over
    several rounds and each keeps its best round, so a burst of load on a shared machine during one's turn
    cannot decide the choice; and the fastest is kept only if it beats every candidate preferred to it by
    CLEAR_MARGIN, else the most preferred candidate within that margin is: two formats level within the noise
    do not flip between two machines or two measurements. `timing` (a dict) receives the best times (ms) and
    the margin by which the choice beat the runner-up (negative: it was kept by preference, not speed)."""
    best = {key: float("inf") for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            best[key] = min(best[key], time.perf_counter() - start)
    quickest = min(best.values())
    choice = next(key for key in runs if best[key] <= quickest * (1 + CLEAR_MARGIN))
    others = [t for key, t in best.items() if key != choice]
    if timing is not None:
        timing["ms"] = {str(getattr(key, "name", key)): round(t * 1e3 / repeats, 4) for key, t in best.items()}
        timing["margin"] = round(min(others) / best[choice] - 1, 4) if others else None
    return choice



def measured_once(key: str, measure) -> str:
    """The answer `measure()` gave on this machine (CPU model and instruction sets), torch and thread count,
    measured the first time and kept on disk: timing again at every load could choose differently between two
    loads, and so round differently."""
    machine = f"{cpu_key()}-{torch.__version__}-{key}-threads{torch.get_num_threads()}"
    return cached_entry("weight_formats.json", machine, measure)


def cached_choice(entry: str | dict) -> str:
    """A cached format choice: its name (entries written before margins were recorded are the bare name)."""
    return entry if isinstance(entry, str) else entry["choice"]
