"""Per-method summaries of benchmark records, exactly as the design notes (METRICS.md) define them; JSON,
Markdown and PNG plots.

The runner produces one PromptRecord per (method, prompt); everything reported is computed here from those
records, so a report can always be recomputed from its own JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import draftsmith
from draftsmith.errors import ConfigError


@dataclass
class PromptRecord:
    method: str
    prompt_id: str
    new_tokens: int  # generated tokens, stop token included, prompt excluded
    seconds: float  # wall time of the generation, prefill included
    target_steps: int  # target forward passes after prefill
    proposed: int = 0  # draft tokens proposed (trees: on the chosen depth)
    accepted: int = 0
    draft_nodes: int = 0  # nodes verified, every branch of a tree included
    accepted_lengths: list[int] | None = None  # [n]: target steps that accepted n draft tokens
    drafter_stats: dict[str, float] | None = None  # the drafter's own statistics (CTC: blank rate, ...)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    peak_memory_mb: float | None = None
    output_tokens: list[int] | None = None  # to check exactness against the reference method
    exact: bool | None = None  # or the runner's own verdict, which wins over output_tokens
    passed: bool | None = None  # HumanEval
    sandbox: str | None = None  # HumanEval: isolation of its test run ("unshare+setpriv", "bwrap", "none")
    exact_match: bool | None = None  # line completion
    edit_similarity: float | None = None
    completion: str | None = None  # the scored part of the generated text
    position: int | None = None  # where the method ran in this prompt's interleaved order (0 = first)


@dataclass
class MethodSummary:
    method: str
    prompts: int
    new_tokens: int
    seconds: float
    tokens_per_s: float | None
    target_steps: int
    tau: float | None  # generated tokens / target steps (plain decoding: 1)
    acceptance: float | None  # accepted / proposed draft tokens
    nodes_per_step: float | None  # draft nodes verified per target step (a tree's every branch)
    draft_share: float | None  # fractions of the generation time spent drafting and verifying
    verify_share: float | None
    draft_ms_per_step: float | None  # measured cost of drafting / verifying, per target step
    verify_ms_per_step: float | None
    speedup: float | None  # vs the baseline: total time / total time over the shared prompts
    speedup_per_prompt: float | None  # vs the baseline: mean of per-prompt time ratios
    # vs the baseline: 95% interval of the per-prompt speedup's geometric mean (paired, prompts as samples)
    speedup_interval: list[float] | None
    speedup_same_dtype: float | None  # vs HF greedy in the method's own dtype (when the run has it)
    bound: float | None  # tau * t_plain_step / (t_draft_step + t_verify_step)
    efficiency: float | None  # speedup over the plain method / bound
    exactness: float | None  # fraction of prompts whose tokens equal the reference method's
    mismatches: list[str] = field(default_factory=list)
    first_divergence: dict[str, int] = field(default_factory=dict)  # prompt id -> first differing token
    pass_at_1: float | None = None
    exact_match: float | None = None
    edit_similarity: float | None = None
    peak_memory_mb: float | None = None
    # [d-1]: share of target steps that accepted at least d draft tokens
    acceptance_by_depth: list[float] | None = None
    drafter_stats: dict[str, float] | None = None  # the drafter's statistics, averaged over steps


def acceptance_by_depth(recs: list[PromptRecord], depths: int = 6) -> list[float] | None:
    """[d-1]: the share of target steps that accepted at least d draft tokens, d = 1..depths."""
    histogram: list[int] = []
    for r in recs:
        for n, count in enumerate(r.accepted_lengths or []):
            histogram += [0] * (n + 1 - len(histogram))
            histogram[n] += count
    steps = sum(histogram)
    if not steps or len(histogram) < 2:
        return None
    return [sum(histogram[d:]) / steps for d in range(1, depths + 1)]


def mean_drafter_stats(recs: list[PromptRecord]) -> dict[str, float] | None:
    """Each drafter statistic averaged over the method's target steps (prompts weighted by their steps)."""
    weighted: dict[str, float] = {}
    steps = 0
    for r in recs:
        if r.drafter_stats:
            steps += r.target_steps
            for name, value in r.drafter_stats.items():
                weighted[name] = weighted.get(name, 0.0) + value * r.target_steps
    return {name: value / steps for name, value in weighted.items()} if steps else None


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _mean(values: Iterable[float | bool | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _seconds_by_prompt(records: list[PromptRecord]) -> dict[str, float]:
    out: dict[str, float] = {}
    for r in records:  # repeats of one prompt add up
        out[r.prompt_id] = out.get(r.prompt_id, 0.0) + r.seconds
    return out


def speedups(method: list[PromptRecord], baseline: list[PromptRecord]) -> tuple[float | None, float | None]:
    """(aggregate, per-prompt mean) speedup of `method` over `baseline` on the prompts both ran."""
    m, b = _seconds_by_prompt(method), _seconds_by_prompt(baseline)
    shared = [p for p in b if p in m]
    if not shared:
        return None, None
    aggregate = _ratio(sum(b[p] for p in shared), sum(m[p] for p in shared))
    return aggregate, _mean(_ratio(b[p], m[p]) for p in shared)


def speedup_interval(method: list[PromptRecord], baseline: list[PromptRecord]) -> list[float] | None:
    """95% confidence interval [low, high] of the geometric mean of per-prompt speedups over `baseline` (a t
    interval on the log ratios: each prompt ran both methods side by side, so the machine's drift between
    prompts cancels). Whether a difference of a percent is real or noise: an interval holding 1 does not tell
    the two apart. None below 3 shared prompts."""
    from scipy.stats import t as student_t

    m, b = _seconds_by_prompt(method), _seconds_by_prompt(baseline)
    logs = [math.log(b[p] / m[p]) for p in b if p in m and b[p] > 0 and m[p] > 0]
    if len(logs) < 3:
        return None
    mean = sum(logs) / len(logs)
    spread = math.sqrt(sum((x - mean) ** 2 for x in logs) / (len(logs) - 1) / len(logs))
    half = student_t.ppf(0.975, len(logs) - 1) * spread
    return [math.exp(mean - half), math.exp(mean + half)]


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _exactness(
    records: list[PromptRecord], reference: list[PromptRecord]
) -> tuple[float | None, list[str], dict[str, int]]:
    """(fraction exact, mismatching prompt ids, first differing token per mismatch) vs the reference."""
    ref_tokens = {r.prompt_id: r.output_tokens for r in reference if r.output_tokens is not None}
    verdicts, mismatches, divergence = [], [], {}
    for r in records:
        ref = ref_tokens.get(r.prompt_id)
        same = r.exact
        if same is None and r.output_tokens is not None and ref is not None:
            same = r.output_tokens == ref
        if same is None:
            continue
        verdicts.append(same)
        if not same and r.prompt_id not in mismatches:
            mismatches.append(r.prompt_id)
            if r.output_tokens is not None and ref is not None:
                divergence[r.prompt_id] = _first_divergence(r.output_tokens, ref)
    return _mean(verdicts), mismatches, divergence


def summarize(
    records: list[PromptRecord], baseline: str, plain: str | None = None, reference: str | None = None,
    same_dtype_baseline: dict[str, str] | None = None,
) -> list[MethodSummary]:
    """One summary per method, in order of first appearance.

    baseline: the method speedups are measured against (HF greedy). plain: our plain decoding, whose
    seconds per target step set the bound (default: the baseline). reference: the method whose tokens
    define exactness (default: plain). same_dtype_baseline: method -> HF greedy in that method's dtype, which
    also becomes its exactness reference (a bf16 method is exact against bf16 greedy, not fp32 greedy).
    """
    plain = plain or baseline
    reference = reference or plain
    same_dtype_baseline = same_dtype_baseline or {}
    by_method: dict[str, list[PromptRecord]] = {}
    for r in records:
        by_method.setdefault(r.method, []).append(r)
    t_plain_step = None
    if plain in by_method:
        t_plain_step = _ratio(sum(r.seconds for r in by_method[plain]), sum(r.target_steps for r in by_method[plain]))

    summaries = []
    for method, recs in by_method.items():
        new_tokens, seconds = sum(r.new_tokens for r in recs), sum(r.seconds for r in recs)
        steps, proposed = sum(r.target_steps for r in recs), sum(r.proposed for r in recs)
        draft_s, verify_s = sum(r.draft_seconds for r in recs), sum(r.verify_seconds for r in recs)
        timed_split = draft_s + verify_s > 0  # HF generate does not report where its time goes
        tau = _ratio(new_tokens, steps)
        speedup, speedup_per_prompt = speedups(recs, by_method.get(baseline, []))
        step_cost = _ratio(draft_s + verify_s, steps)  # drafting + verifying, per target step
        bound = tau * t_plain_step / step_cost if tau and t_plain_step and step_cost else None
        vs_plain = speedups(recs, by_method.get(plain, []))[0]  # the bound counts in plain steps
        peer = same_dtype_baseline.get(method)
        method_reference = peer or reference
        exactness, mismatches, divergence = (None, [], {})
        if method != method_reference:
            exactness, mismatches, divergence = _exactness(recs, by_method.get(method_reference, []))
        memories = [r.peak_memory_mb for r in recs if r.peak_memory_mb is not None]
        summaries.append(MethodSummary(
            method=method,
            prompts=len({r.prompt_id for r in recs}),
            new_tokens=new_tokens,
            seconds=seconds,
            tokens_per_s=_ratio(new_tokens, seconds),
            target_steps=steps,
            tau=tau,
            acceptance=_ratio(sum(r.accepted for r in recs), proposed),
            nodes_per_step=_ratio(sum(r.draft_nodes for r in recs), steps) if timed_split else None,
            draft_share=_ratio(draft_s, seconds) if timed_split else None,
            verify_share=_ratio(verify_s, seconds) if timed_split else None,
            draft_ms_per_step=_ratio(1000 * draft_s, steps) if timed_split else None,
            verify_ms_per_step=_ratio(1000 * verify_s, steps) if timed_split else None,
            speedup=speedup,
            speedup_per_prompt=speedup_per_prompt,
            speedup_interval=speedup_interval(recs, by_method[baseline]) if method != baseline and baseline in by_method
            else None,
            speedup_same_dtype=speedups(recs, by_method[peer])[0] if peer in by_method else None,
            bound=bound,
            efficiency=_ratio(vs_plain, bound) if vs_plain is not None and bound else None,
            exactness=exactness,
            mismatches=mismatches,
            first_divergence=divergence,
            pass_at_1=_mean(r.passed for r in recs),
            exact_match=_mean(r.exact_match for r in recs),
            edit_similarity=_mean(r.edit_similarity for r in recs),
            peak_memory_mb=max(memories) if memories else None,
            acceptance_by_depth=acceptance_by_depth(recs),
            drafter_stats=mean_drafter_stats(recs),
        ))
    return summaries


# (header, attribute, format) of the Markdown table; columns with no value for any method are left out.
COLUMNS = [
    ("method", "method", "{}"), ("prompts", "prompts", "{}"), ("tok/s", "tokens_per_s", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"), ("speedup (mean/prompt)", "speedup_per_prompt", "{:.2f}x"),
    ("speedup 95% CI", "speedup_interval", "{:.3f}-{:.3f}x"),
    ("vs HF greedy same dtype", "speedup_same_dtype", "{:.2f}x"),
    ("tau", "tau", "{:.2f}"), ("acceptance", "acceptance", "{:.1%}"),
    ("steps accepting >= 1/2/3/4/5/6", "acceptance_by_depth", "{:.0%}"), ("nodes/step", "nodes_per_step", "{:.1f}"),
    ("draft", "draft_share", "{:.0%}"),
    ("verify", "verify_share", "{:.0%}"), ("draft ms/step", "draft_ms_per_step", "{:.1f}"),
    ("verify ms/step", "verify_ms_per_step", "{:.1f}"), ("bound", "bound", "{:.2f}x"),
    ("efficiency", "efficiency", "{:.0%}"),
    ("exact", "exactness", "{:.1%}"), ("pass@1", "pass_at_1", "{:.1%}"), ("EM", "exact_match", "{:.1%}"),
    ("ES", "edit_similarity", "{:.1f}"), ("peak MB", "peak_memory_mb", "{:.0f}"),
]


def _cell(value: Any, fmt: str) -> str:
    """A table cell: a list fills one format with all its items (an interval), or each item its own, '/'-joined."""
    if value is None:
        return "-"
    if not isinstance(value, list):
        return fmt.format(value)
    return fmt.format(*value) if fmt.count("{") == len(value) else "/".join(map(fmt.format, value))


def markdown_table(summaries: list[MethodSummary]) -> str:
    cols = [c for c in COLUMNS if any(getattr(s, c[1]) is not None for s in summaries)]
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for s in summaries:
        cells = [_cell(getattr(s, a), fmt) for _, a, fmt in cols]
        lines.append("| " + " | ".join(cells) + " |")
    for s in summaries:
        if s.drafter_stats:
            shown = ", ".join(f"{name} {value:.3g}" for name, value in s.drafter_stats.items())
            lines.append(f"\n{s.method}: {shown}")
    for s in summaries:
        if s.mismatches:
            lines.append(f"\n{s.method}: output differs from the reference on {', '.join(s.mismatches)}")
    return "\n".join(lines) + "\n"


def _plots(out_dir: Path, records: list[PromptRecord], summaries: list[MethodSummary]) -> dict[str, Path]:
    from matplotlib.figure import Figure  # no pyplot: renders with Agg, touches no global backend state

    methods = [s.method for s in summaries]
    paths = {name: out_dir / f"{name}.png" for name in ("speedup", "tau", "tokens_per_s")}

    fig = Figure(figsize=(max(4, 1.2 * len(methods)), 3.5), layout="constrained")
    ax = fig.subplots()
    xs = range(len(methods))
    ax.bar([x - 0.2 for x in xs], [s.speedup or 0 for s in summaries], 0.4, label="aggregate")
    ax.bar([x + 0.2 for x in xs], [s.speedup_per_prompt or 0 for s in summaries], 0.4, label="mean per prompt")
    intervals = [(x + 0.2, *s.speedup_interval) for x, s in zip(xs, summaries) if s.speedup_interval]
    if intervals:  # the interval's centre in log space is the per-prompt geometric mean
        at, lows, highs = zip(*intervals)
        centres = [math.sqrt(low * high) for low, high in zip(lows, highs)]
        ax.errorbar(at, centres, fmt="k.", capsize=3, label="geometric mean per prompt, 95% interval",
                    yerr=[[c - low for c, low in zip(centres, lows)], [high - c for c, high in zip(centres, highs)]])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs), methods, rotation=30, ha="right")
    ax.set_ylabel("speedup vs baseline")
    ax.legend()
    fig.savefig(paths["speedup"], dpi=120)

    fig = Figure(figsize=(max(4, 1.2 * len(methods)), 3.5), layout="constrained")
    ax = fig.subplots()
    taus = [[r.new_tokens / r.target_steps for r in records if r.method == m and r.target_steps] for m in methods]
    ax.boxplot([t or [0.0] for t in taus], tick_labels=methods)
    ax.tick_params(axis="x", labelrotation=30)
    ax.set_ylabel("tau per prompt (tokens / target step)")
    fig.savefig(paths["tau"], dpi=120)

    fig = Figure(figsize=(7, 3.5), layout="constrained")
    ax = fig.subplots()
    prompt_ids = list(dict.fromkeys(r.prompt_id for r in records))
    for m in methods:
        tps = {r.prompt_id: r.new_tokens / r.seconds for r in records if r.method == m and r.seconds > 0}
        ax.plot(range(len(prompt_ids)), [tps.get(p, float("nan")) for p in prompt_ids], marker=".", label=m)
    ax.set_xlabel("prompt")
    ax.set_ylabel("tokens / s")
    ax.legend()
    fig.savefig(paths["tokens_per_s"], dpi=120)
    return paths


def write_report(
    out_dir: str | Path,
    records: list[PromptRecord],
    summaries: list[MethodSummary],
    metadata: dict[str, Any] | None = None,
    notes: str = "",
) -> dict[str, Path]:
    """Write report.json (metadata, summaries, every record), report.md (the table, then `notes`) and three
    PNG plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    payload = {
        "metadata": {"draftsmith_version": draftsmith.__version__, **(metadata or {})},
        "summaries": [asdict(s) for s in summaries],
        "records": [asdict(r) for r in records],
    }
    paths["json"].write_text(json.dumps(payload, indent=1, default=str) + "\n")
    paths["markdown"].write_text(markdown_table(summaries) + (f"\n{notes}\n" if notes else ""))
    return paths | _plots(out_dir, records, summaries)


def load_report(folder: str | Path) -> tuple[list[PromptRecord], dict[str, Any]]:
    """The records and metadata of a report.json that `write_report` wrote (fields a later version added
    take their defaults)."""
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise ConfigError(f"no benchmark report at {path} (a folder `draftsmith bench --out` wrote)")
    data = json.loads(path.read_text())
    known = {f.name for f in fields(PromptRecord)}
    return [PromptRecord(**{k: v for k, v in r.items() if k in known}) for r in data["records"]], data["metadata"]
