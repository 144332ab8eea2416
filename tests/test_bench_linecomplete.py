"""Line-completion cases: deterministic, held-out only, exact contexts; EM / ES arithmetic."""

import functools
import random

import pytest

from draftsmith.bench.linecomplete import (
    LineCaseConfig,
    build_cases,
    cut_completion,
    edit_similarity,
    exact_match,
    levenshtein,
)
from draftsmith.data.corpus import is_heldout

FUNC = '''def f{i}(values, scale=2):
    """Scale and filter value number {i}."""
    result = []
    for value in values:
        # skip the negative ones

        if value >= 0:
            result.append(value * scale + {i})
    return sorted(result, reverse=True)


'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for n in range(30):
        (root / f"module_{n}.py").write_text("".join(FUNC.format(i=100 * n + i) for i in range(6)))
    return root


def config(corpus, **kw):
    return LineCaseConfig(source=corpus, heldout_percent=30.0, num_cases=25, context_chars=300, **kw)


def test_cases_are_deterministic_and_depend_on_the_seed(corpus):
    assert build_cases(config(corpus)) == build_cases(config(corpus))
    assert build_cases(config(corpus)) != build_cases(config(corpus, seed=1))


def test_cases_come_only_from_heldout_files(corpus):
    names = [p.name for p in corpus.iterdir()]
    heldout = {n for n in names if is_heldout(n, 30.0)}
    assert 0 < len(heldout) < len(names)  # the split really leaves files out
    cases = build_cases(config(corpus))
    assert len(cases) == 25
    assert {c.document for c in cases} <= heldout


def test_context_is_the_file_prefix_and_target_the_next_nontrivial_line(corpus):
    for case in build_cases(config(corpus)):
        text = (corpus / case.document).read_text()
        lines = text.split("\n")
        before = "\n".join(lines[: case.line - 1]) + "\n"
        assert before.endswith(case.context) and 0 < len(case.context) <= 300
        assert case.context == before or before[-len(case.context) - 1] == "\n"  # starts at a line start
        assert case.target == lines[case.line - 1]
        stripped = case.target.strip()
        assert len(stripped) >= 8 and not stripped.startswith("#")


def test_block_mode_targets_a_header_and_its_body(corpus):
    cases = build_cases(config(corpus, mode="block"))
    assert cases
    for case in cases:
        first, *body = case.target.split("\n")
        assert first.rstrip().endswith(":") and body
        indent = len(first) - len(first.lstrip())
        assert all(len(b) - len(b.lstrip()) > indent for b in body if b.strip())
    loop = next(c for c in cases if c.target.strip().startswith("for value"))
    assert loop.target.count("\n") == 4  # comment, blank line and the if block belong to the loop


def test_default_corpus_is_the_heldout_stdlib():
    cases = build_cases(LineCaseConfig(num_cases=10))
    assert len(cases) == 10 and all(is_heldout(c.document, 10.0) for c in cases)


def test_cut_completion():
    generated = "\n    return x + 1\n\ndef g():\n    pass\n"
    assert cut_completion(generated) == "    return x + 1"
    assert cut_completion("    if x:\n        y = 1\n\n        z = 2\n    w = 3\n", mode="block") == (
        "    if x:\n        y = 1\n\n        z = 2")
    assert cut_completion("\n\n") == ""


def test_levenshtein_and_metrics_by_hand():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("flaw", "lawn") == 2
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3 and levenshtein("same", "same") == 0
    assert levenshtein("abcdef", "azced") == 3
    assert exact_match("  return x  ", "return x") and not exact_match("return y", "return x")
    assert edit_similarity("return x", "return x") == 100.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(100 * (1 - 3 / 7))
    assert edit_similarity("   abcd", "abce\n") == pytest.approx(75.0)  # compared stripped
    assert edit_similarity("", "") == 100.0 and edit_similarity("", "abc") == 0.0


def test_levenshtein_matches_the_recursive_definition():
    def reference(a: str, b: str) -> int:
        @functools.cache
        def d(i: int, j: int) -> int:
            if i == 0 or j == 0:
                return i + j
            return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))
        return d(len(a), len(b))

    rng = random.Random(0)
    for _ in range(200):
        a = "".join(rng.choices("abc ", k=rng.randint(0, 9)))
        b = "".join(rng.choices("abc ", k=rng.randint(0, 9)))
        assert levenshtein(a, b) == reference(a, b)
