"""The classifier's features at one position where the two models disagree: l = the large model's argmax token,
s = the small model's. One function computes them at collection (teacher-forced) and at decoding time.

57 features, grouped as in the design this follows:
- 32 from the hidden states: each model's last hidden state (the one its output head reads, before the final
  norm), scaled by the share of the four cross probabilities that favours that model's token, then projected to
  16 by a layer of the classifier itself (learned with it; classifier.py). Stored raw here.
- 25 scalars (SCALARS names them): the four cross probabilities p_l(l), p_s(s), p_l(s), p_s(l); the token type of
  l and s; lengths; frequencies of each candidate in the context; BM25 similarities of each candidate statement
  to the context's statements (rank_bm25); retrieval from the domain's corpus (CorpusIndex, built once).
A "statement" is a stripped non-blank line; the candidate statement is the current line (from its start, the
prompt's part included) with the candidate token's text appended; "l - s" is the difference of a measure between
the two candidates.
"""

from __future__ import annotations

import bisect
import keyword
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import torch
from rank_bm25 import BM25Okapi

from draftsmith.data.corpus import CodeDocument

HIDDEN_PROJECTION = 16  # per model, inside the classifier
SCALARS = (
    "p_l(l)", "p_s(s)", "p_l(s)", "p_s(l)",
    "type(l)", "type(s)",
    "tokens_in_line", "words_in_candidate", "words_in_last_statement",
    "id_frequency", "word_frequency", "substring_frequency", "word_frequency_decayed", "substring_frequency_decayed",
    "statement_ids_count(l)", "statement_ids_count(s)", "statements_containing", "after_last_statement",
    "bm25_decayed", "bm25_last_statement", "bm25_after_similar",
    "corpus_prefix_count", "corpus_after_last_statement", "corpus_after_similar_jaccard", "corpus_10th_jaccard",
)
FEATURES = 2 * HIDDEN_PROJECTION + len(SCALARS)  # 57
WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+|\S")
KEYWORDS = frozenset(keyword.kwlist + keyword.softkwlist)
TOKEN_TYPES = ("newline", "whitespace", "punctuation", "keyword", "identifier", "number", "other")
TOP = 10  # corpus statements compared by Jaccard


def words(text: str) -> list[str]:
    return WORD.findall(text)


def token_type(text: str) -> int:
    """An index into TOKEN_TYPES; EOS and other special tokens (empty text) are "other"."""
    stripped = text.strip()
    if "\n" in text:
        return 0
    if text and not stripped:
        return 1
    if stripped and all(not c.isalnum() and c != "_" for c in stripped):
        return 2
    if stripped in KEYWORDS:
        return 3
    if stripped.isidentifier():
        return 4
    if stripped.replace(".", "", 1).isdigit():
        return 5
    return 6


def decay(distance: int) -> float:
    """Weight of a context statement `distance` statements before the current line (Gaussian, width 2)."""
    return math.exp(-0.5 * (distance / 2) ** 2)


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


class CorpusIndex:
    """The domain's statements, indexed once: sorted for prefix counts, by their text for what follows a given
    statement, and by word (an inverted index) for Jaccard neighbours. No query scans the corpus."""

    def __init__(self, docs: list[CodeDocument], max_postings: int = 2000):
        self.statements: list[str] = []
        self.following: dict[str, list[str]] = defaultdict(list)
        for doc in docs:
            lines = [line.strip() for line in doc.text.split("\n") if line.strip()]
            self.statements += lines
            for first, second in zip(lines, lines[1:]):
                self.following[first].append(second)
        self.sorted = sorted(self.statements)
        self.word_sets = [set(words(s)) for s in self.statements]
        postings: dict[str, list[int]] = defaultdict(list)
        for i, ws in enumerate(self.word_sets):
            for w in ws:
                postings[w].append(i)
        self.postings = {w: np.asarray(rows, dtype=np.int64) for w, rows in postings.items()}
        self.sizes = np.asarray([len(ws) for ws in self.word_sets], dtype=np.int64)
        self.max_postings = max_postings

    def prefix_count(self, prefix: str) -> int:
        """Corpus statements that start with `prefix`."""
        lo = bisect.bisect_left(self.sorted, prefix)
        hi = bisect.bisect_left(self.sorted, prefix + "\U0010ffff")
        return hi - lo

    def after(self, statement: str, candidate: str) -> int:
        """Times `statement` is followed in the corpus by a statement that starts with `candidate`."""
        return sum(s.startswith(candidate) for s in self.following.get(statement, ()))

    def neighbours(self, query: set[str]) -> list[tuple[float, int]]:
        """(Jaccard, index) of the TOP statements most like `query`, found through the query's rarest words, best
        first (ties: the later statement first). Counted with numpy over the postings: scoring each candidate's
        word set in Python took most of a collab step's classifier time (docs/results/2026-11-27-collab.md)."""
        seen = np.zeros(len(self.statements), dtype=bool)
        shared = np.zeros(len(self.statements), dtype=np.int64)  # query words each statement holds
        found = [self.postings[w] for w in query if w in self.postings]
        for rows in sorted(found, key=len):
            seen[rows] = True
            if np.count_nonzero(seen) >= self.max_postings:
                break
        for rows in found:
            shared[rows] += 1
        candidates = np.flatnonzero(seen)
        inter = shared[candidates]
        scores = inter / (self.sizes[candidates] + len(query) - inter)
        best = np.lexsort((-candidates, -scores))[:TOP]
        return [(float(scores[j]), int(candidates[j])) for j in best]

    def after_similar(self, last: str, candidate: str) -> float:
        """Mean Jaccard between the candidate and the statements that follow the corpus statements most like the
        last context statement."""
        near = self._followed_neighbours(last)
        cand = set(words(candidate))
        return float(np.mean([jaccard(cand, self.word_sets[i + 1]) for i in near])) if near else 0.0

    @lru_cache(maxsize=64)  # a request asks about its one last statement at every disagreement
    def _followed_neighbours(self, last: str) -> list[int]:
        return [i for _, i in self.neighbours(set(words(last))) if i + 1 < len(self.statements)]

    def tenth_jaccard(self, candidate: str) -> float:
        near = self.neighbours(set(words(candidate)))
        return near[TOP - 1][0] if len(near) >= TOP else 0.0


@dataclass
class ContextIndex:
    """What a request's context offers, computed once per request: the statements before the current line (a
    line completion never leaves its line, so they stay fixed), their words, and a BM25 index over them."""

    statements: list[str]
    context_ids: list[int]

    @classmethod
    def of(cls, context_text: str, context_ids: list[int]) -> ContextIndex:
        before = context_text[: context_text.rfind("\n") + 1] if "\n" in context_text else ""
        return cls([line.strip() for line in before.split("\n") if line.strip()], list(context_ids))

    @cached_property
    def statement_words(self) -> list[list[str]]:
        return [words(s) for s in self.statements]

    @cached_property
    def all_words(self) -> list[str]:
        return [w for ws in self.statement_words for w in ws]

    @cached_property
    def bm25(self) -> BM25Okapi | None:
        docs = [ws or ["<blank>"] for ws in self.statement_words]
        return BM25Okapi(docs) if docs else None

    @cached_property
    def id_counts(self) -> Counter:
        return Counter(self.context_ids)

    @property
    def last(self) -> str:
        return self.statements[-1] if self.statements else ""

    @cached_property
    def similar_to_last(self) -> list[int]:
        """The three statements (last one excluded) most like the last statement, by BM25."""
        if self.bm25 is None or len(self.statements) < 2:
            return []
        scores = self.bm25.get_scores(self.statement_words[-1])[:-1]
        return [int(i) for i in np.argsort(-scores)[:3]]


@dataclass
class Position:
    """One decision: the candidates, both models' probability rows and hidden states, the current line."""

    large_token: int
    small_token: int
    large_probs: torch.Tensor  # [vocab] softmax of the large model's logits
    small_probs: torch.Tensor
    large_hidden: torch.Tensor  # [hidden_l]
    small_hidden: torch.Tensor  # [hidden_s]
    line_ids: list[int]  # the current line's token ids so far, prompt part included (statement id counts)
    line_text: str  # the current line's text so far
    tokens_in_line: int  # tokens generated in this line before this one (1-based position of the candidate)
    generated_ids: list[int] = field(default_factory=list)  # tokens generated so far in the request


class FeatureBuilder:
    """Turns a Position into (large hidden, small hidden, 25 scalars): the classifier's input."""

    def __init__(self, token_texts: list[str], corpus: CorpusIndex | None):
        self.token_texts, self.corpus = token_texts, corpus

    def scalars(self, pos: Position, context: ContextIndex) -> np.ndarray:
        l, s = pos.large_token, pos.small_token
        p_ll, p_ss = float(pos.large_probs[l]), float(pos.small_probs[s])
        p_ls, p_sl = float(pos.large_probs[s]), float(pos.small_probs[l])
        text = {t: self.token_texts[t] if t < len(self.token_texts) else "" for t in (l, s)}
        statement = {t: (pos.line_text + text[t]).strip() for t in (l, s)}
        word = {t: (words(pos.line_text + text[t]) or [""])[-1] for t in (l, s)}
        ids_now = context.context_ids + pos.generated_ids
        n_ids, n_words, n_statements = max(1, len(ids_now)), max(1, len(context.all_words)), max(1, len(context.statements))

        def diff(measure) -> float:
            return float(measure(l)) - float(measure(s))

        def decayed(t, test) -> float:
            n = len(context.statements)
            return sum(decay(n - i) * sum(test(w, word[t]) for w in ws) for i, ws in enumerate(context.statement_words))

        def statement_id_count(t) -> int:
            needle = pos.line_ids + [t]
            return sum(ids_now[i : i + len(needle)] == needle for i in range(len(ids_now) - len(needle) + 1))

        def after_last(t) -> int:
            st = context.statements
            return sum(st[i] == context.last and st[i + 1].startswith(statement[t]) for i in range(len(st) - 1))

        # each candidate statement's BM25 scores against the context's statements, computed once for the three
        bm25 = {t: context.bm25.get_scores(words(statement[t])) for t in (l, s)} if context.bm25 is not None else None

        def bm25_decayed(t) -> float:
            if bm25 is None:
                return 0.0
            n = len(bm25[t])
            return float(sum(decay(n - i) * sc for i, sc in enumerate(bm25[t])))

        def bm25_last(t) -> float:
            return float(bm25[t][-1]) if bm25 is not None else 0.0

        def bm25_after_similar(t) -> float:
            if not context.similar_to_last:
                return 0.0
            return float(sum(bm25[t][i + 1] for i in context.similar_to_last))

        corpus = self.corpus
        values = [
            p_ll, p_ss, p_ls, p_sl,
            token_type(text[l]), token_type(text[s]),
            pos.tokens_in_line, min(len(words(statement[l])), len(words(statement[s]))), len(words(context.last)),
            diff(lambda t: context.id_counts[t] + pos.generated_ids.count(t)) / n_ids,
            diff(lambda t: context.all_words.count(word[t]) if word[t] else 0) / n_words,
            diff(lambda t: sum(word[t] in w for w in context.all_words) if word[t] else 0) / n_words,
            diff(lambda t: decayed(t, lambda w, c: w == c) if word[t] else 0) / n_words,
            diff(lambda t: decayed(t, lambda w, c: c in w) if word[t] else 0) / n_words,
            statement_id_count(l), statement_id_count(s),
            diff(lambda t: sum(statement[t] in st for st in context.statements) if statement[t] else 0) / n_statements,
            diff(after_last),
            diff(bm25_decayed), diff(bm25_last), diff(bm25_after_similar),
            diff(lambda t: math.log1p(corpus.prefix_count(statement[t]))) if corpus and statement[l] and statement[s] else 0.0,
            diff(lambda t: math.log1p(corpus.after(context.last, statement[t]))) if corpus else 0.0,
            diff(lambda t: corpus.after_similar(context.last, statement[t])) if corpus else 0.0,
            diff(lambda t: corpus.tenth_jaccard(statement[t])) if corpus else 0.0,
        ]
        return np.asarray(values, dtype=np.float32)


def hidden_weights(scalars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The share of exp(p_l(l)), exp(p_s(s)), exp(p_l(s)), exp(p_s(l)) that favours each model's token: the large
    hidden state is scaled by (e^p_l(l) + e^p_s(l)) / sum, the small one by (e^p_s(s) + e^p_l(s)) / sum."""
    e = scalars[..., :4].exp()
    total = e.sum(-1, keepdim=True)
    return (e[..., 0:1] + e[..., 3:4]) / total, (e[..., 1:2] + e[..., 2:3]) / total


def token_texts(tokenizer) -> list[str]:
    """Every id's text as it reads in a decoded sequence (special tokens: empty)."""
    special = set(tokenizer.all_special_ids)
    return ["" if i in special else tokenizer.decode([i]) for i in range(len(tokenizer))]


class LineState:
    """The current line at a position of a request, from the prompt (text and ids) and the ids generated since:
    the same arithmetic at collection and at decoding time."""

    def __init__(self, prompt_text: str, prompt_ids: list[int], texts: list[str]):
        self.texts = texts
        self.prompt_line = prompt_text[prompt_text.rfind("\n") + 1 :]
        # the prompt's ids since its last line break (ids whose text holds one end a line)
        start = max((i + 1 for i, t in enumerate(prompt_ids) if t < len(texts) and "\n" in texts[t]), default=0)
        self.prompt_line_ids = prompt_ids[start:]

    def at(self, generated: list[int]) -> tuple[list[int], str, int]:
        """(line ids, line text, 1-based position of the next token in the generated part of the line)."""
        text = self.prompt_line + "".join(self.texts[t] if t < len(self.texts) else "" for t in generated)
        return self.prompt_line_ids + generated, text, len(generated) + 1
