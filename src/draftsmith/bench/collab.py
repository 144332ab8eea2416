"""The `collab[:DOMAINS]` workload: line completion inside code bases, the large model against a fine-tuned small
one and the rules between them, per domain.

Tasks are cases cut inside lines of each domain's `test` files (collab.domains); every method stops at the end
of the line. Methods (each needs the domain's collab folder: DIR, else the one shipped for the target, else
runs/collab/DOMAIN): `plain` (large greedy), `small[:DIR]` (the fine-tuned small model alone), `small-draft[:DIR]`
(lossless speculative decoding, the small model drafting), `bild[:DIR][:fallback=0.5,rollback=2]` and
`collab[:DIR][:threshold=0.5]` (the classifier's rule). Large-model calls per line count the prefill too.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from draftsmith.bench.config import DEFAULT_K, MethodSpec
from draftsmith.bench.report import PromptRecord
from draftsmith.bench.workloads import Task
from draftsmith.collab.domains import DEFAULT_DOMAINS, completion_cases, resolve_domain
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel

COLLAB_METHODS = ("plain", "small", "small-draft", "bild", "collab")
DEFAULT_COLLAB_METHODS = ("plain", "small", "small-draft:k=4", "bild:k=4", "collab:k=4")
CONTEXT_CHARS = 1000  # as the classifier's collected cases


def workload_domains(workload: str) -> list[str]:
    """`collab` (the default domains) or `collab:D1,D2` (names, packages, folders or .jsonl files)."""
    _, _, listed = workload.partition(":")
    return [d for d in listed.split(",") if d] or list(DEFAULT_DOMAINS)


def collab_tasks(workload: str, limit: int) -> list[Task]:
    """`limit` cases per domain, task ids DOMAIN/FILE:LINE."""
    tasks = []
    for name in workload_domains(workload):
        domain = resolve_domain(name)
        for case in completion_cases(domain, "test", limit, context_chars=CONTEXT_CHARS):
            tasks.append(Task(f"{domain.name}/{case.case_id}", case.context, case=case, mode="rest"))
    return tasks


def task_domain(task_id: str) -> str:
    return task_id.split("/", 1)[0]


def collab_folder(spec_arg: str | None, target: LoadedModel, domain: str) -> Path:
    from draftsmith.drafters import shipped_head_folder

    if spec_arg:
        return Path(spec_arg)
    shipped = shipped_head_folder(target.name, "collab") / domain
    return shipped if shipped.is_dir() else Path("runs/collab") / domain


def collab_engine(spec: MethodSpec, target: LoadedModel, domain: str):
    """The engine of one collab method for one domain."""
    from draftsmith.collab.finetune import load_small
    from draftsmith.collab.rule import BildRule, collab_drafter_and_rule
    from draftsmith.drafters.model import ModelDrafter
    from draftsmith.engine import SpecEngine
    from draftsmith.models import logit_rows

    folder = collab_folder(spec.arg, target, domain)
    options = spec.options
    if spec.kind == "plain":
        return SpecEngine(target.model)
    if spec.kind == "small":
        return SpecEngine(load_small(folder, target))
    if spec.kind == "small-draft":
        return SpecEngine(target.model, ModelDrafter(load_small(folder, target), vocab_size=logit_rows(target.model)))
    if spec.kind == "bild":
        drafter = ModelDrafter(load_small(folder, target), vocab_size=logit_rows(target.model),
                               confidence=options.get("fallback", 0.5))
        return SpecEngine(target.model, drafter, rule=BildRule(options.get("rollback", 2.0)))
    if spec.kind == "collab":
        drafter, rule = collab_drafter_and_rule(folder, target, options.get("threshold", 0.5))
        return SpecEngine(target.model, drafter, rule=rule)
    raise ConfigError(f"method '{spec.name}' does not run on the collab workload: use {', '.join(COLLAB_METHODS)}")


def collab_method(spec: MethodSpec, target: LoadedModel, domains: list[str], max_new_tokens: int):
    """A bench Method whose engine follows the task's domain (`select` is told the task id before each call)."""
    from draftsmith.bench.runner import Method, Output, _sync
    from draftsmith.collab.rule import line_end_ids
    from draftsmith.engine import GenerationConfig

    engines = {d: collab_engine(spec, target, d) for d in domains}
    k = int(spec.options.get("k", DEFAULT_K.get("model", 4))) if spec.kind not in ("plain", "small") else 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, k=k, end_ids=line_end_ids(target.tokenizer))
    current = {"domain": domains[0]}

    def generate(ids: list[int]) -> Output:
        engine = engines[current["domain"]]
        _sync(target.device)
        start = time.perf_counter()
        result = engine.generate(ids, config)
        _sync(target.device)
        seconds = time.perf_counter() - start
        # the small model alone never calls the large one; the others call it once more for the prefill
        large_calls = 0 if spec.kind == "small" else result.stats.target_steps + 1
        return Output(result.tokens, seconds, large_calls, result.stats)

    return Method(spec.name, generate, select=lambda task_id: current.update(domain=task_domain(task_id)))


def domain_table(records: list[PromptRecord]) -> dict[str, Any]:
    """Per domain and overall, per method: exact match (%), edit similarity, ms per line, large-model calls per
    line, and the classifier's share of kept small tokens where it was asked."""
    groups: dict[tuple[str, str], list[PromptRecord]] = defaultdict(list)
    for r in records:
        groups[task_domain(r.prompt_id), r.method].append(r)
        groups["overall", r.method].append(r)
    rows = {}
    for (domain, method), recs in groups.items():
        n = len(recs)
        asked = sum((r.drafter_stats or {}).get("classifier_asked", 0) for r in recs)
        rows.setdefault(domain, {})[method] = {
            "lines": n, "exact_match": 100 * sum(bool(r.exact_match) for r in recs) / n,
            "edit_similarity": sum(r.edit_similarity or 0 for r in recs) / n,
            "ms_per_line": 1000 * sum(r.seconds for r in recs) / n,
            "large_calls_per_line": sum(r.target_steps for r in recs) / n,
            "classifier_kept": (sum((r.drafter_stats or {}).get("classifier_kept_small", 0) for r in recs) / asked
                                if asked else None),
        }
    return rows


def domain_markdown(table: dict[str, Any]) -> str:
    lines = ["| domain | method | lines | EM % | ES | ms/line | large calls/line | classifier kept |",
             "|---|---|---|---|---|---|---|---|"]
    for domain, methods in table.items():
        for method, m in methods.items():
            kept = f"{m['classifier_kept']:.0%}" if m["classifier_kept"] is not None else ""
            lines.append(f"| {domain} | {method} | {m['lines']} | {m['exact_match']:.1f} | {m['edit_similarity']:.1f} "
                         f"| {m['ms_per_line']:.0f} | {m['large_calls_per_line']:.2f} | {kept} |")
    return "\n".join(lines)


def write_domain_report(out: Path, table: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {"collab_json": out / "collab.json", "collab_markdown": out / "collab.md", "collab_plot": out / "collab.png"}
    paths["collab_json"].write_text(json.dumps(table, indent=1) + "\n")
    paths["collab_markdown"].write_text(domain_markdown(table) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, m in table.get("overall", {}).items():
        ax.scatter(m["large_calls_per_line"], m["exact_match"], s=60)
        ax.annotate(method, (m["large_calls_per_line"], m["exact_match"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("large-model calls per line")
    ax.set_ylabel("exact match (%)")
    ax.set_title("Line completion, all domains: quality against large-model calls")
    fig.tight_layout()
    fig.savefig(paths["collab_plot"], dpi=120)
    plt.close(fig)
    return paths
