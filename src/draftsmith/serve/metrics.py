"""Server metrics in the Prometheus text format (written by hand: a few counters and histograms)."""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import Counter

from draftsmith.engine import Stats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# engine statistics summed into counters: (Stats attribute, metric name, help)
STAT_COUNTERS = (
    ("prompt_tokens", "prompt_tokens_total", "Prompt tokens prefilled."),
    ("new_tokens", "generated_tokens_total", "Tokens generated (EOS included)."),
    ("target_steps", "target_steps_total", "Target forwards after prefill; generated / steps = tau."),
    ("proposed", "draft_tokens_proposed_total", "Draft tokens proposed to the target."),
    ("accepted", "draft_tokens_accepted_total", "Draft tokens the target accepted."),
    ("draft_s", "draft_seconds_total", "Seconds spent drafting."),
    ("verify_s", "verify_seconds_total", "Seconds spent in target forwards, acceptance and cache commits."),
)
HISTOGRAMS = {
    "request_latency_seconds": "From queueing to the last token, for completed requests.",
    "queue_wait_seconds": "From queueing to the start of generation.",
    "time_to_first_token_seconds": "From queueing to the first streamed text.",
}


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts = buckets, [0] * (len(buckets) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {cumulative}"]


class Metrics:
    """Thread-safe: the engine worker records, the event loop records rejections and renders."""

    PREFIX = "draftsmith_"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # outcome -> count
        self.stats: Counter[str] = Counter()
        self.histograms = {name: Histogram() for name in HISTOGRAMS}

    def count(self, outcome: str) -> None:
        """outcome: completed | cancelled | failed | rejected (queue full) | invalid (4xx)."""
        with self._lock:
            self.requests[outcome] += 1

    def observe(self, histogram: str, seconds: float) -> None:
        with self._lock:
            self.histograms[histogram].observe(seconds)

    def add_stats(self, stats: Stats) -> None:
        with self._lock:
            for attr, name, _ in STAT_COUNTERS:
                self.stats[name] += getattr(stats, attr)

    def render(self, gauges: dict[str, tuple[float, str]]) -> str:
        """The exposition text; `gauges` maps name -> (value, help) for values sampled now."""
        p, lines = self.PREFIX, []

        def header(name: str, kind: str, text: str) -> None:
            lines.extend((f"# HELP {p}{name} {text}", f"# TYPE {p}{name} {kind}"))

        with self._lock:
            header("requests_total", "counter", "Generation requests by outcome.")
            lines.extend(f'{p}requests_total{{outcome="{o}"}} {n}' for o, n in sorted(self.requests.items()))
            for _, name, text in STAT_COUNTERS:
                header(name, "counter", text)
                lines.append(f"{p}{name} {self.stats[name]}")
            for name, text in HISTOGRAMS.items():
                header(name, "histogram", text)
                lines.extend(self.histograms[name].lines(p + name))
        for name, (value, text) in gauges.items():
            header(name, "gauge", text)
            lines.append(f"{p}{name} {value}")
        return "\n".join(lines) + "\n"
