"""MaG, CS-Drafting's statistical bottom drafter: the longest suffix match in the prompt and the generated tokens
(prompt lookup), then, past what the match copies, a bigram chain: each token's most frequent successor in a
code corpus, read from a table built once with the target's tokenizer (`draftsmith train bigram`).

The table is two int32 vectors in a safetensors file (successor and its count per token id), tagged with the
tokenizer's vocabulary size and fingerprint, so a table built for another tokenizer is refused, not misread.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from draftsmith.acceptance import SamplingConfig
from draftsmith.data.corpus import CodeDocument
from draftsmith.draft import Draft
from draftsmith.drafters.base import Drafter
from draftsmith.drafters.ngram import NgramDrafter
from draftsmith.errors import ConfigError
from draftsmith.progress import counted

NO_SUCCESSOR = -1  # a token never followed by anything in the corpus


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary (token strings and ids): equal only for tokenizers that split alike."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha1("\n".join(f"{i}\t{t}" for t, i in vocab).encode()).hexdigest()[:16]


@dataclass
class BigramTable:
    successor: torch.Tensor  # [vocab] int32: each token's most frequent successor, NO_SUCCESSOR if none
    count: torch.Tensor  # [vocab] int32: how often that successor followed it
    fingerprint: str  # of the tokenizer the table was built with

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"successor": self.successor, "count": self.count}, str(path),
                  metadata={"vocab_size": str(len(self.successor)), "tokenizer": self.fingerprint})
        return path

    @classmethod
    def load(cls, path: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> BigramTable:
        """Read a table; with `tokenizer`, refuse one built for another vocabulary."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"bigram table not found: {path} (build one with `draftsmith train bigram`)")
        try:
            with safe_open(str(path), "pt") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"{path} is not a bigram table (safetensors): {e}") from e
        if set(tensors) != {"successor", "count"} or "tokenizer" not in metadata:
            raise ConfigError(f"{path} is not a bigram table: it needs 'successor' and 'count' and a tokenizer tag")
        table = cls(tensors["successor"], tensors["count"], metadata["tokenizer"])
        if tokenizer is not None:
            if len(table.successor) != len(tokenizer):
                raise ConfigError(f"{path} was built for a vocabulary of {len(table.successor)} tokens, the target's "
                                  f"tokenizer has {len(tokenizer)}: build one for this target with `draftsmith train bigram`")
            if table.fingerprint != tokenizer_fingerprint(tokenizer):
                raise ConfigError(f"{path} was built with another tokenizer (same size, other tokens): build one "
                                  "for this target with `draftsmith train bigram`")
        return table


def build_bigram(tokenizer: PreTrainedTokenizerBase, docs: list[CodeDocument], progress: bool = True,
                 batch: int = 64, sequences: list[list[int]] = ()) -> BigramTable:
    """Count every adjacent token pair of the documents (each tokenized alone, no special tokens) and of the
    token `sequences` (e.g. the target's own on-policy writing), and keep each token's most frequent successor
    (ties: the smallest id)."""
    vocab = len(tokenizer)
    pairs = [np.asarray(ids[:-1], dtype=np.int64) * vocab + np.asarray(ids[1:], dtype=np.int64) for ids in sequences]
    with counted("bigram counts", disable=not progress) as bar:
        task = bar.add_task("documents", total=len(docs))
        for start in range(0, len(docs), batch):
            chunk = docs[start : start + batch]
            for ids in tokenizer([d.text for d in chunk], add_special_tokens=False, verbose=False).input_ids:
                ids = np.asarray(ids, dtype=np.int64)
                pairs.append(ids[:-1] * vocab + ids[1:])
            bar.update(task, advance=len(chunk))
    codes, counts = np.unique(np.concatenate(pairs) if pairs else np.zeros(0, np.int64), return_counts=True)
    first, second = codes // vocab, codes % vocab
    # per first token, the pair with the highest count, the smallest successor among equals
    order = np.lexsort((-second, counts, first))
    last_of_group = np.r_[first[order][1:] != first[order][:-1], True]
    best = order[last_of_group]
    successor = np.full(vocab, NO_SUCCESSOR, dtype=np.int32)
    count = np.zeros(vocab, dtype=np.int32)
    successor[first[best]], count[first[best]] = second[best], counts[best]
    return BigramTable(torch.from_numpy(successor), torch.from_numpy(count), tokenizer_fingerprint(tokenizer))


class MagDrafter(Drafter):
    """Prompt lookup for as much as the longest suffix match copies, then the bigram chain up to k tokens."""

    name = "mag"

    def __init__(self, table: BigramTable, min_n: int = 2, max_n: int = 4):
        # a match of one token says little the corpus-wide bigram does not say better: matches start at two
        self.lookup = NgramDrafter(min_n, max_n)
        self.successor = table.successor.tolist()  # list indexing: the chain is a few Python lookups per token

    def cost_per_token(self) -> float:
        return 0.0

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator) -> None:
        self.lookup.reset(prompt_ids, sampling, generator)

    def propose(self, context: list[int], k: int) -> Draft:
        tokens = self.lookup.propose(context, k).tokens if k > 0 else []
        last = tokens[-1] if tokens else context[-1]
        while len(tokens) < k and 0 <= last < len(self.successor) and self.successor[last] != NO_SUCCESSOR:
            last = self.successor[last]
            tokens.append(last)
        return Draft(tokens=tokens)
