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
from draftsmith.bench.method import Method, Output, sync
from draftsmith.bench.report import PromptRecord, _exactness
from draftsmith.bench.workloads import Task, task_source
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


@task_source("collab")
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
    from draftsmith.artifacts import shipped_head_folder

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
    from draftsmith.collab.rule import line_end_ids
    from draftsmith.engine import GenerationConfig

    engines = {d: collab_engine(spec, target, d) for d in domains}
    k = int(spec.options.get("k", DEFAULT_K.get("model", 4))) if spec.kind not in ("plain", "small") else 0
    config = GenerationConfig(max_new_tokens=max_new_tokens, k=k, end_ids=line_end_ids(target.tokenizer))
    current = {"domain": domains[0]}

    def generate(ids: list[int]) -> Output:
        engine = engines[current["domain"]]
        sync(target.device)
        start = time.perf_counter()
        result = engine.generate(ids, config)
        sync(target.device)
        seconds = time.perf_counter() - start
        # the small model alone never calls the large one; the others call it once more for the prefill
        large_calls = 0 if spec.kind == "small" else result.stats.target_steps + 1
        return Output(result.tokens, seconds, large_calls, result.stats)

    return Method(spec.name, generate, select=lambda task_id: current.update(domain=task_domain(task_id)))


def domain_table(records: list[PromptRecord], methods: list[str], reference: str = "plain") -> dict[str, Any]:
    """Per domain (in run order, then overall) and per method (in the order given): exact match (%), edit similarity,
    ms per line, large-model calls per line, the share of lines equal to large greedy's (`reference`), the share of the small
    model's drafted tokens the rule kept, and where a classifier was asked, disagreements per line and the
    share of them at which it kept the small token."""
    groups: dict[str, dict[str, list[PromptRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        groups[task_domain(r.prompt_id)][r.method].append(r)
        groups["overall"][r.method].append(r)
    groups["overall"] = groups.pop("overall")  # last
    rows: dict[str, Any] = {}
    for domain, by_method in groups.items():
        for method in (m for m in methods if m in by_method):  # each prompt rotates the order methods run in
            recs = by_method[method]
            n = len(recs)
            asked = sum((r.drafter_stats or {}).get("classifier_asked", 0) for r in recs)
            proposed = sum(r.proposed for r in recs)
            same = _exactness(recs, by_method.get(reference, []))[0] if method != reference else None
            rows.setdefault(domain, {})[method] = {
                "lines": n, "exact_match": 100 * sum(bool(r.exact_match) for r in recs) / n,
                "edit_similarity": sum(r.edit_similarity or 0 for r in recs) / n,
                "ms_per_line": 1000 * sum(r.seconds for r in recs) / n,
                "large_calls_per_line": sum(r.target_steps for r in recs) / n,
                "same_as_large": 100 * same if same is not None else None,
                "small_kept": sum(r.accepted for r in recs) / proposed if proposed else None,
                "disagreements_per_line": asked / n if asked else None,
                "classifier_kept": (sum((r.drafter_stats or {}).get("classifier_kept_small", 0) for r in recs) / asked
                                    if asked else None),
            }
    return rows


def folder_diagnostics(specs: list[MethodSpec], target: LoadedModel, domains: list[str]) -> dict[str, Any]:
    """Why a rule does what it does, per domain and collab folder the run used, from what the folder's own
    commands recorded on the classifier split (never the test files): teacher-forced argmax accuracy of both
    models on the answers, the share of one-right disagreements where the small model was the right one, and
    the classifier's validation scores (accuracy, AUC, precision of 'small is right', how often it says so)."""
    out: dict[str, Any] = {}
    for domain in domains:
        for folder in dict.fromkeys(collab_folder(s.arg, target, domain) for s in specs if s.kind != "plain"):
            features, classifier = (_read_json(folder / name) for name in ("features.json", "classifier.json"))
            validation = classifier.get("validation", {})
            out.setdefault(domain, {})[_shown(folder)] = {
                "large_accuracy": features.get("large_accuracy"), "small_accuracy": features.get("small_accuracy"),
                "small_right_share": features.get("small_right_share"),
                "classifier_accuracy": validation.get("accuracy"), "classifier_auc": validation.get("auc"),
                "classifier_precision": validation.get("precision"),
                "classifier_predicted_small": validation.get("predicted_small"),
            }
    return out


def _shown(folder: Path) -> str:
    """A folder as the report names it: relative to the working directory when inside it."""
    resolved = folder.resolve()
    return str(resolved.relative_to(Path.cwd())) if resolved.is_relative_to(Path.cwd()) else str(folder)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# (column title, key, format) of the two tables; an absent value (not measured for that method) is left blank
LINE_COLUMNS = [("lines", "lines", "d"), ("EM %", "exact_match", ".1f"), ("ES", "edit_similarity", ".1f"),
                ("ms/line", "ms_per_line", ".0f"), ("large calls/line", "large_calls_per_line", ".2f"),
                ("= large greedy %", "same_as_large", ".0f"), ("small tokens kept", "small_kept", ".1%"),
                ("disagreements/line", "disagreements_per_line", ".2f"), ("classifier kept", "classifier_kept", ".0%")]
FOLDER_COLUMNS = [("large acc", "large_accuracy", ".1%"), ("small acc", "small_accuracy", ".1%"),
                  ("small right", "small_right_share", ".1%"), ("clf acc", "classifier_accuracy", ".1%"),
                  ("clf AUC", "classifier_auc", ".2f"), ("clf precision", "classifier_precision", ".2f"),
                  ("clf says small", "classifier_predicted_small", ".1%")]


def _markdown(first: tuple[str, str], nested: dict[str, dict[str, dict[str, Any]]], columns) -> list[str]:
    titles = [*first, *(title for title, _, _ in columns)]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for outer, inner in nested.items():
        for name, values in inner.items():
            cells = ["" if values.get(key) is None else format(values[key], form) for _, key, form in columns]
            lines.append("| " + " | ".join([outer, name, *cells]) + " |")
    return lines


def domain_markdown(table: dict[str, Any], diagnostics: dict[str, Any] | None = None) -> str:
    lines = _markdown(("domain", "method"), table, LINE_COLUMNS)
    if diagnostics:
        lines += ["", "Collab folders, on their classifier split: teacher-forced argmax accuracy on the answers, the share "
                  "of one-right disagreements where the small model was right, and the classifier's validation scores.",
                  "", *_markdown(("domain", "folder"), diagnostics, FOLDER_COLUMNS)]
    return "\n".join(lines)


def write_domain_report(out: Path, table: dict[str, Any], diagnostics: dict[str, Any] | None = None) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {"collab_json": out / "collab.json", "collab_markdown": out / "collab.md", "collab_plot": out / "collab.png"}
    paths["collab_json"].write_text(json.dumps({"lines": table, "folders": diagnostics or {}}, indent=1) + "\n")
    paths["collab_markdown"].write_text(domain_markdown(table, diagnostics) + "\n")
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
