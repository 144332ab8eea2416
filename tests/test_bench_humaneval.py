"""HumanEval loading, truncation and pass@1 through the sandbox, on real problems."""

import pytest

from draftsmith.bench.humaneval import check_completion, load_problems, program, truncate_completion
from draftsmith.bench.sandbox import SandboxConfig


@pytest.fixture(scope="module")
def problems():
    return {p.task_id: p for p in load_problems()}


def test_all_164_problems_load_in_order(problems):
    ids = list(problems)
    assert len(ids) == 164 and ids[0] == "HumanEval/0" and ids[-1] == "HumanEval/163"
    p = problems["HumanEval/0"]
    assert p.entry_point == "has_close_elements" and "def check(candidate)" in p.test


@pytest.mark.parametrize("task_id", ["HumanEval/0", "HumanEval/2", "HumanEval/53"])
def test_canonical_solution_passes(problems, task_id):
    p = problems[task_id]
    result = check_completion(p, truncate_completion(p.canonical_solution))
    assert result.passed, result.message


@pytest.mark.parametrize("completion", ["    return None\n", "    return 1 +\n", "    while True:\n        pass\n"])
def test_wrong_completions_fail(problems, completion):
    result = check_completion(problems["HumanEval/53"], completion, SandboxConfig(timeout_s=1.0))  # add(x, y)
    assert not result.passed
    assert result.status == ("timeout" if "while" in completion else "failed")


def test_truncation_keeps_the_body_and_drops_what_follows(problems):
    p = problems["HumanEval/53"]
    body = "    # add them\n    return x + y\n"
    raw = body + "\n\ndef main():\n    print(add(1, 2))\n\nif __name__ == '__main__':\n    main()\n"
    assert truncate_completion(raw) == body + "\n"
    assert truncate_completion(body + "\n# tests\nassert add(1, 1) == 3\n") == body
    indented = "    if x:\n        print(x)\n    # done\n"  # inside the body: not a stop
    assert truncate_completion(indented + "print(add(2, 3))\n") == indented.rstrip("\n")
    assert check_completion(p, truncate_completion(raw)).passed


def test_program_ends_with_the_check_call(problems):
    p = problems["HumanEval/0"]
    text = program(p, p.canonical_solution)
    assert text.startswith(p.prompt + p.canonical_solution) and text.rstrip().endswith("check(has_close_elements)")
