"""HumanEval loading, truncation and pass@1 through the sandbox, on real problems; the instruct form (chat
template prompt, code extracted from the reply) with a tokenizer built in code."""

import pytest

from draftsmith.bench.humaneval import (
    check_completion,
    check_instruct,
    extract_code,
    instruct_program,
    load_problems,
    program,
    truncate_completion,
)
from draftsmith.bench.sandbox import SandboxConfig
from draftsmith.errors import ConfigError


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


# --- instruct form ---------------------------------------------------------------------------------------------

ADD = "def add(x: int, y: int):\n    return x + y\n"


def test_extract_code_takes_a_fenced_python_block():
    reply = f"Sure! Here is the function:\n\n```python\n{ADD}```\n\nIt adds the two numbers."
    assert extract_code(reply) == ADD


def test_extract_code_takes_the_first_of_several_blocks_and_skips_non_python_ones():
    reply = (f"Run it with:\n```bash\npython add.py\n```\nThe code:\n```Python\n{ADD}```\n"
             "Usage:\n```python\nprint(add(1, 2))\n```\n")
    assert extract_code(reply) == ADD
    bare = f"```\n{ADD}```\nand a test:\n```python\nassert add(1, 2) == 3\n```"
    assert extract_code(bare) == ADD  # an untagged fence counts as code


def test_extract_code_without_a_fence_is_the_whole_reply():
    assert extract_code(ADD) == ADD
    assert extract_code("    return x + y\n") == "    return x + y\n"  # a body, as the raw form gets


def test_extract_code_takes_an_unterminated_block_at_the_end_of_a_cut_reply():
    assert extract_code(f"Here you go:\n```python\n{ADD}    # more to come") == ADD + "    # more to come"


def test_extract_code_removes_the_indentation_of_a_fence_inside_a_list():
    reply = "1. The function:\n   ```python\n   def add(x, y):\n       return x + y\n   ```\n"
    assert extract_code(reply) == "def add(x, y):\n    return x + y\n"


CORRECT_0 = """I will compare every pair of numbers.

```python
def has_close_elements(numbers: List[float], threshold: float) -> bool:
    for i, a in enumerate(numbers):
        for b in numbers[i + 1:]:
            if abs(a - b) < threshold:
                return True
    return False
```

The function returns True as soon as two numbers are closer than the threshold."""


def test_a_correct_reply_passes_in_the_sandbox_and_a_wrong_one_fails(problems):
    p = problems["HumanEval/0"]
    code = extract_code(CORRECT_0)
    assert instruct_program(p, code).startswith("from typing import List")  # the prompt's import: List resolves
    result = check_instruct(p, code)
    assert result.passed, result.message
    wrong = CORRECT_0.replace("< threshold", "> threshold")
    assert not check_instruct(p, extract_code(wrong), SandboxConfig(timeout_s=5.0)).passed
    prose = "To solve this, compare each pair of numbers and return True when two are close."
    assert not check_instruct(p, extract_code(prose), SandboxConfig(timeout_s=5.0)).passed


def test_a_reply_with_only_the_body_is_tested_after_the_prompt(problems):
    p = problems["HumanEval/53"]
    assert instruct_program(p, "    return x + y\n") == program(p, "    return x + y\n")
    assert check_instruct(p, extract_code("```python\n    return x + y\n```")).passed


def test_a_reply_calling_the_prompts_helper_gets_it(problems):
    p = problems["HumanEval/38"]  # decode_cyclic: the prompt defines encode_cyclic before it
    reply = "```python\ndef decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n```"
    assert check_instruct(p, extract_code(reply)).passed


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def bos_char_tokenizer(chat_template: str | None):
    """The character tokenizer with a BOS (<eos> doubles as one) that raw text gets, and maybe a template."""
    from tokenizers.processors import TemplateProcessing

    from tiny_models import char_tokenizer

    tok = char_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", 1)])
    tok.bos_token = "<eos>"
    tok.chat_template = chat_template
    return tok


def test_instruct_prompt_goes_through_the_chat_template_with_one_bos(problems):
    from draftsmith.bench.workloads import load_tasks, prompt_ids, prompt_text

    tasks = load_tasks("humaneval-instruct", 2)
    assert [t.task_id for t in tasks] == ["HumanEval/0", "HumanEval/1"] and all(t.chat for t in tasks)
    p = problems["HumanEval/0"]
    tok = bos_char_tokenizer(CHAT_TEMPLATE)
    text = prompt_text(tasks[0], tok)
    assert text.startswith("<eos><user>Complete the Python function") and text.endswith("\n<assistant>")
    assert f"```python\n{p.prompt.strip()}\n```" in text
    ids = prompt_ids(tasks[0], tok)
    assert ids[0] == 1 and ids[1] != 1  # the template's BOS, not a second one from the tokenizer
    assert ids == tok(text, add_special_tokens=False).input_ids
    raw, = load_tasks("humaneval", 1)  # the raw form is unchanged: the bare prompt, the tokenizer's BOS
    assert raw.prompt == p.prompt and not raw.chat and prompt_ids(raw, tok) == tok(p.prompt).input_ids


def test_instruct_without_a_chat_template_is_a_clear_error():
    from draftsmith.bench.workloads import load_tasks, prompt_ids

    task, = load_tasks("humaneval-instruct", 1)
    with pytest.raises(ConfigError, match="'humaneval-instruct' needs a tokenizer with a chat template"):
        prompt_ids(task, bos_char_tokenizer(None))


def test_instruct_records_score_the_extracted_code(problems):
    from draftsmith.bench.runner import Call, Output, make_records
    from draftsmith.bench.workloads import load_tasks

    task, = load_tasks("humaneval-instruct", 1)
    calls = [Call("plain", task.task_id, 0, Output([1, 2], 0.1, 2), None)]
    record, = make_records(calls, [task], lambda ids: CORRECT_0)
    assert record.passed is True and record.completion == extract_code(CORRECT_0)


def test_the_workload_is_listed_by_config_and_cli():
    from typer.testing import CliRunner

    from draftsmith.bench.config import BenchConfig
    from draftsmith.cli.main import app

    assert BenchConfig(workload="humaneval-instruct").workload == "humaneval-instruct"
    with pytest.raises(ConfigError, match="humaneval, humaneval-instruct, lines, blocks"):
        BenchConfig(workload="humaneval-chat")
    result = CliRunner().invoke(app, ["bench", "--help"], env={"COLUMNS": "300", "TERM": "dumb"})
    assert result.exit_code == 0 and "humaneval | humaneval-instruct | lines | blocks" in result.output


def test_help_shows_the_llamacpp_extra_verbatim():
    """typer renders help as rich markup, where an unescaped '[llamacpp]' is a style tag and vanished."""
    from typer.testing import CliRunner

    from draftsmith.cli.main import app

    for command in ("bench", "generate"):
        result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERM": "dumb"})
        assert result.exit_code == 0 and "pip install 'draftsmith[llamacpp]'" in result.output, command


def test_bench_runs_the_instruct_workload_on_a_tiny_chat_model(tmp_path):
    from draftsmith.bench.config import BenchConfig
    from draftsmith.bench.runner import run_bench
    from draftsmith.models import LoadedModel
    from tiny_models import tiny_llama

    config = BenchConfig(target="tiny", workload="humaneval-instruct", methods=["plain"], limit=2,
                         max_new_tokens=4, out=str(tmp_path / "out"), allow_unsandboxed=True)
    with pytest.raises(ConfigError, match="chat template"):  # before any method is built
        run_bench(config, target=LoadedModel(tiny_llama(seed=1), bos_char_tokenizer(None), "tiny"))
    result = run_bench(config, target=LoadedModel(tiny_llama(seed=1), bos_char_tokenizer(CHAT_TEMPLATE), "tiny"))
    assert result.metadata["workload"] == "humaneval-instruct" and "Instruct form" in result.notes
    assert [r.passed for r in result.records] == [False, False]  # random weights write no passing code
