"""Line (and block) completion cases from held-out files of a code corpus, and their metrics.

A case is the text of a file before a chosen line (the context) and that line (the target). In block mode
the target is a line that opens a block (ends with ":") together with its indented body; in rest mode the
context goes on into the line up to a cut after a word or symbol, and the target is the rest of that line (what
an editor's completion is asked for). Targets are drawn with a fixed seed from held-out files only, so a drafter
trained on the train split never saw them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from draftsmith.data.corpus import load_corpus

Mode = Literal["line", "block", "rest"]
WORD = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@dataclass(frozen=True)
class LineCaseConfig:
    num_cases: int = 200
    mode: Mode = "line"
    context_chars: int = 4000  # at most this many characters before the target, cut at a line start
    min_context_chars: int = 200  # skip targets too near the top of a file: nothing to go on
    min_target_chars: int = 8  # skip trivial targets ("pass", "else:", ")")
    max_block_lines: int = 16  # block mode: skip blocks longer than this
    min_rest_chars: int = 4  # rest mode: the cut leaves at least this many characters of the line
    seed: int = 0
    source: str | Path | None = None  # folder, .jsonl, or None for the Python standard library
    heldout_percent: float = 10.0


@dataclass(frozen=True)
class LineCase:
    case_id: str  # "document:line"
    document: str
    line: int  # 1-based number of the target's first line
    context: str  # ends with "\n" (rest mode: with the line's start): the model writes the target from there
    target: str  # without the trailing newline; compared stripped


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int) -> int:
    """Index just past the block opened by lines[start]: the deeper-indented lines after it (blank lines
    inside count, trailing blank lines do not)."""
    base, end = _indent(lines[start]), start + 1
    for i in range(start + 1, len(lines)):
        if lines[i].strip():
            if _indent(lines[i]) <= base:
                break
            end = i + 1
    return end


def _is_trivial(line: str, min_chars: int) -> bool:
    s = line.strip()
    return len(s) < min_chars or s.startswith("#") or not any(c.isalnum() for c in s)


def _targets(lines: list[str], offsets: list[int], config: LineCaseConfig) -> list[tuple[int, int]]:
    """(first line, end line) of every acceptable target in one document."""
    found = []
    for i, line in enumerate(lines):
        if offsets[i] < config.min_context_chars or _is_trivial(line, config.min_target_chars):
            continue
        if config.mode == "line" or (config.mode == "rest" and rest_cuts(line, config.min_rest_chars)):
            found.append((i, i + 1))
        elif line.rstrip().endswith(":"):
            end = _block_end(lines, i)
            if 1 < end - i <= config.max_block_lines:
                found.append((i, end))
    return found


def rest_cuts(line: str, min_rest: int) -> list[int]:
    """Where a rest-mode case may cut a line: after its indentation, or where a word or symbol run ends (never
    inside an identifier, never after a space: BPE tokenizers glue a space to the word after it), leaving
    min_rest characters or more."""
    start = _indent(line)
    cuts = [start] + [i for i in range(start + 1, len(line)) if line[i - 1] != " "
                      and ((line[i - 1] in WORD) != (line[i] in WORD) or line[i - 1] in "([{,.=:")]
    return [i for i in cuts if len(line[i:].strip()) >= min_rest]


def build_cases(config: LineCaseConfig = LineCaseConfig(), docs: list | None = None) -> list[LineCase]:
    """`config.num_cases` cases (fewer if the held-out files hold fewer), the same ones for the same seed.
    `docs`: cut the cases from these documents instead of the held-out split of `config.source`."""
    if docs is None:
        docs = load_corpus(config.source, split="heldout", heldout_percent=config.heldout_percent)
    split_docs, pool = [], []
    for d, doc in enumerate(docs):
        lines = doc.text.split("\n")  # not splitlines(): it also splits on form feeds, common in the stdlib
        offsets = [0]
        for line in lines[:-1]:
            offsets.append(offsets[-1] + len(line) + 1)
        split_docs.append((lines, offsets))
        pool += [(d, start, end) for start, end in _targets(lines, offsets, config)]

    rng = random.Random(config.seed)
    chosen = sorted(rng.sample(pool, min(config.num_cases, len(pool))))
    cases = []
    for d, start, end in chosen:
        text, (lines, offsets) = docs[d].text, split_docs[d]
        cut = offsets[start] - config.context_chars
        context_start = text.find("\n", cut - 1) + 1 if cut > 0 else 0  # the next line start after `cut`
        inside = rng.choice(rest_cuts(lines[start], config.min_rest_chars)) if config.mode == "rest" else 0
        cases.append(LineCase(
            case_id=f"{docs[d].name}:{start + 1}",
            document=docs[d].name,
            line=start + 1,
            context=text[context_start : offsets[start] + inside],
            target="\n".join(lines[start:end])[inside:],
        ))
    return cases


def cut_completion(generated: str, mode: Mode = "line") -> str:
    """The part of a generation that answers the case: its first non-blank line, or in block mode that
    line and the indented block under it; in rest mode, everything before the first line break."""
    lines = generated.split("\n")
    if mode == "rest":
        return lines[0]
    start = next((i for i, line in enumerate(lines) if line.strip()), None)
    if start is None:
        return ""
    end = start + 1 if mode == "line" else _block_end(lines, start)
    return "\n".join(lines[start:end])


def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest single-character insertions, deletions and substitutions from a to b."""
    p = 0  # a shared prefix or suffix never costs anything: drop them before the quadratic part
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    a, b = a[p:], b[p:]
    s = 0
    while s < min(len(a), len(b)) and a[-1 - s] == b[-1 - s]:
        s += 1
    a, b = a[: len(a) - s], b[: len(b) - s]
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def exact_match(prediction: str, target: str) -> bool:
    return prediction.strip() == target.strip()


def edit_similarity(prediction: str, target: str) -> float:
    """100 * (1 - levenshtein / length of the longer string), on stripped strings; 100 = identical."""
    a, b = prediction.strip(), target.strip()
    longest = max(len(a), len(b))
    return 100.0 if longest == 0 else 100.0 * (1 - levenshtein(a, b) / longest)
