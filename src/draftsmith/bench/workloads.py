"""Benchmark workloads: the prompts a run decodes, and how each generated text is scored.

HumanEval tasks are scored by pass@1 in the sandbox; line/block completion tasks by exact match and edit
similarity against the held-out line. A task with neither (a plain prompt) is timed only.
"""

from __future__ import annotations

from dataclasses import dataclass

from draftsmith.bench.humaneval import Problem, check_completion, load_problems, truncate_completion
from draftsmith.bench.linecomplete import LineCase, LineCaseConfig, build_cases, cut_completion
from draftsmith.bench.linecomplete import edit_similarity as _edit_similarity
from draftsmith.bench.sandbox import SandboxConfig
from draftsmith.bench.linecomplete import exact_match as _exact_match
from draftsmith.errors import ConfigError

WORKLOADS = ("humaneval", "lines", "blocks")


@dataclass(frozen=True)
class Task:
    task_id: str
    prompt: str
    problem: Problem | None = None  # HumanEval: scored by pass@1
    case: LineCase | None = None  # line completion: scored by EM / ES
    mode: str = "line"  # line completion: "line" or "block"


def load_tasks(workload: str, limit: int) -> list[Task]:
    """The first `limit` HumanEval problems, or `limit` line ("lines") / block ("blocks") completion cases."""
    if workload == "humaneval":
        return [Task(p.task_id, p.prompt, problem=p) for p in load_problems(limit)]
    if workload in ("lines", "blocks"):
        mode = "line" if workload == "lines" else "block"
        cases = build_cases(LineCaseConfig(num_cases=limit, mode=mode))
        return [Task(c.case_id, c.context, case=c, mode=mode) for c in cases]
    raise ConfigError(f"unknown workload '{workload}': use {', '.join(WORKLOADS)}")


@dataclass(frozen=True)
class Score:
    passed: bool | None = None
    exact_match: bool | None = None
    edit_similarity: float | None = None
    sandbox: str | None = None  # HumanEval: the isolation its tests ran under ("unshare+setpriv", "bwrap", "none")


def completion(task: Task, generated: str) -> str:
    """The part of a generated text that answers the task (what is scored)."""
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
        result = check_completion(task.problem, answer, sandbox)
        return Score(passed=result.passed, sandbox=result.isolation)
    if task.case is not None:
        return Score(exact_match=_exact_match(answer, task.case.target),
                     edit_similarity=_edit_similarity(answer, task.case.target))
    return Score()
