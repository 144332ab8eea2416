"""Benchmark workloads: the prompts a run decodes, and how each generated text is scored.

HumanEval tasks are scored by pass@1 in the sandbox, in two forms: `humaneval` decodes the bare prompt and
tests the function body that follows it; `humaneval-instruct` (for chat models) puts a request to complete the
function through the tokenizer's chat template and tests the code of the reply (see bench/humaneval.py).
Line/block completion tasks are scored by exact match and edit similarity against the held-out line. A task
with neither (a plain prompt) is timed only.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from draftsmith.bench.humaneval import (
    Problem,
    check_completion,
    check_instruct,
    extract_code,
    instruct_message,
    load_problems,
    truncate_completion,
)
from draftsmith.bench.linecomplete import LineCase, LineCaseConfig, build_cases, cut_completion
from draftsmith.bench.linecomplete import edit_similarity as _edit_similarity
from draftsmith.bench.sandbox import SandboxConfig
from draftsmith.bench.linecomplete import exact_match as _exact_match
from draftsmith.errors import ConfigError

INSTRUCT = "humaneval-instruct"
HELDOUT = "stdlib"  # held-out prompts written from the standard library's docstrings (bench/heldout.py): timed only
WORKLOADS = ("humaneval", INSTRUCT, "lines", "blocks", "collab[:DOMAINS]", HELDOUT)


@dataclass(frozen=True)
class Task:
    task_id: str
    prompt: str
    problem: Problem | None = None  # HumanEval: scored by pass@1
    case: LineCase | None = None  # line completion: scored by EM / ES
    mode: str = "line"  # line completion: "line", "block" or "rest" (the rest of a line cut inside: collab)
    chat: bool = False  # prompt is a user message for the chat template; the reply's code block is scored


# workloads defined elsewhere register how to load their tasks: kind -> (workload spec, limit) -> tasks
TASK_SOURCES: dict[str, Callable[[str, int], list[Task]]] = {}


def task_source(kind: str):
    """Register a workload kind's task loader (bench/collab.py registers `collab`)."""
    def register(load: Callable[[str, int], list[Task]]) -> Callable[[str, int], list[Task]]:
        TASK_SOURCES[kind] = load
        return load
    return register


def load_tasks(workload: str, limit: int) -> list[Task]:
    """The first `limit` HumanEval problems (raw or instruct form), or `limit` line ("lines") / block ("blocks")
    completion cases."""
    if workload == "humaneval":
        return [Task(p.task_id, p.prompt, problem=p) for p in load_problems(limit)]
    if workload == INSTRUCT:
        return [Task(p.task_id, instruct_message(p), problem=p, chat=True) for p in load_problems(limit)]
    if workload in ("lines", "blocks"):
        mode = "line" if workload == "lines" else "block"
        cases = build_cases(LineCaseConfig(num_cases=limit, mode=mode))
        return [Task(c.case_id, c.context, case=c, mode=mode) for c in cases]
    if workload == HELDOUT:
        from draftsmith.bench.heldout import PROMPTS

        return [Task(f"stdlib/{i}", prompt) for i, prompt in enumerate(PROMPTS[:limit])]
    source = TASK_SOURCES.get(workload.partition(":")[0])
    if source is not None:
        return source(workload, limit)
    raise ConfigError(f"unknown workload '{workload}': use {', '.join(WORKLOADS)}")


def prompt_text(task: Task, tokenizer: Any) -> str:
    """The text the model sees: the prompt itself, or a chat task's message through the chat template."""
    if not task.chat:
        return task.prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"the workload '{INSTRUCT}' needs a tokenizer with a chat template, and this model's "
                          "has none: use --workload humaneval (the bare prompts) for a base model")
    return tokenizer.apply_chat_template([{"role": "user", "content": task.prompt}], tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(task: Task, tokenizer: Any) -> list[int]:
    """The prompt's token ids; a templated prompt already holds its BOS, so the tokenizer adds none."""
    from draftsmith.models import encode_prompt  # torch loads only when a run starts, not for `--help`

    return encode_prompt(tokenizer, prompt_text(task, tokenizer), templated=task.chat)


@dataclass(frozen=True)
class Score:
    passed: bool | None = None
    exact_match: bool | None = None
    edit_similarity: float | None = None
    sandbox: str | None = None  # HumanEval: the isolation its tests ran under ("unshare+setpriv", "bwrap", "none")


def completion(task: Task, generated: str) -> str:
    """The part of a generated text that answers the task (what is scored)."""
    if task.problem is not None and task.chat:
        return extract_code(generated)
    if task.problem is not None:
        return truncate_completion(generated)
    if task.case is not None:
        return cut_completion(generated, task.mode)
    return generated


def score(task: Task, answer: str, run_tests: bool = True, sandbox: SandboxConfig = SandboxConfig()) -> Score:
    """Score a completion; HumanEval tests run in a separate sandboxed process (only when run_tests)."""
    if task.problem is not None:
        if not run_tests:
            return Score()
        check = check_instruct if task.chat else check_completion
        result = check(task.problem, answer, sandbox)
        return Score(passed=result.passed, sandbox=result.isolation)
    if task.case is not None:
        return Score(exact_match=_exact_match(answer, task.case.target),
                     edit_similarity=_edit_similarity(answer, task.case.target))
    return Score()
