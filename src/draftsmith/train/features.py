"""Training data for feature heads: token sequences with the target's last-layer features, computed ONCE into
safetensors shards and reused by every head trained on the same target (EAGLE-style, Medusa, CTC).

Two sources, mixed by `self_distill`:
- teacher-forced code: chunks of the corpus (the installed Python sources by default, or `--corpus`);
- self-distillation: the target's own greedy continuations of prompts cut from that code, generated in batches,
  since on a CPU a batch of sequences costs little more per step than one. A head learns what the target
  WRITES, which is what it must predict at decode time. Prompts either end at a line break anywhere
  (`prompts="windows"`) or right after a function's docstring (`prompts="functions"`): the form of a request to
  write a function body, the code assistants' workload.
Never HumanEval: the benchmark measures it.

Shards are written one at a time with a manifest of what is done, so an interrupted run resumes at the next shard.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from draftsmith.cached_lm import last_hidden_states
from draftsmith.data.corpus import CodeDocument, documented_functions, load_corpus
from draftsmith.data.shards import ShardFolder
from draftsmith.errors import ConfigError
from draftsmith.progress import counted

PROMPT_KINDS = ("windows", "functions")


@dataclass
class FeatureDataConfig:
    corpus: str | None = None  # folder or .jsonl; None: the installed Python standard library
    heldout_percent: float = 10.0
    sequences: int = 768  # training sequences in all
    heldout_sequences: int = 64
    seq_len: int = 160  # tokens per sequence
    self_distill: float = 0.5  # share of sequences that are the target's own continuations
    prompt_tokens: int = 64  # prompt length of a self-distillation sequence (the rest is generated)
    prompts: Literal["windows", "functions"] = "windows"  # where self-distillation prompts end (see above)
    shard_size: int = 64  # sequences per shard (and per generation batch: larger on a GPU)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.self_distill <= 1:
            raise ConfigError(f"self_distill is a share in [0, 1], got {self.self_distill}")
        if not 8 <= self.prompt_tokens < self.seq_len:
            raise ConfigError(f"prompt_tokens must be in [8, seq_len), got {self.prompt_tokens} (seq_len {self.seq_len})")
        if self.prompts not in PROMPT_KINDS:
            raise ConfigError(f"prompts must be one of {', '.join(PROMPT_KINDS)}, got {self.prompts!r}")
        if self.sequences < self.shard_size or self.shard_size < 1:
            raise ConfigError(f"need at least one shard: sequences ({self.sequences}) >= shard_size ({self.shard_size}) >= 1")


def _token_stream(docs: list[CodeDocument], tokenizer: PreTrainedTokenizerBase, rng: random.Random):
    """Endless shuffled passes over the documents' tokens."""
    order = list(range(len(docs)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield tokenizer(docs[i].text, add_special_tokens=False).input_ids


def _windows(docs, tokenizer, length: int, rng: random.Random):
    """Random windows of `length` tokens that start at a line start (prompts look like code a user stops at)."""
    newline = set(tokenizer("\n", add_special_tokens=False).input_ids)
    for ids in _token_stream(docs, tokenizer, rng):
        if len(ids) <= length:
            continue
        starts = [i + 1 for i, t in enumerate(ids[: len(ids) - length]) if t in newline] or [0]
        for _ in range(max(1, len(ids) // (4 * length))):
            start = rng.choice(starts)
            yield ids[start : start + length]


def docstring_ends(text: str) -> list[int]:
    """Character offsets just past the line that closes each function's docstring (where a request to write
    the body ends); none for a file Python cannot parse."""
    line_ends = [m.end() for m in re.finditer("\n", text)]
    return sorted(line_ends[node.body[0].end_lineno - 1] for node in documented_functions(text)[1]
                  if node.body[0].end_lineno <= len(line_ends))


def _function_prompts(docs, tokenizer, length: int, rng: random.Random) -> Iterator[list[int]]:
    """Prompts of `length` tokens ending right after a function's docstring (the code before it as context);
    functions with a body to write only, and too little code before them: skipped."""
    order = list(range(len(docs)))
    while True:
        rng.shuffle(order)
        found = False
        for i in order:
            text = docs[i].text
            ends = docstring_ends(text)
            for end in rng.sample(ends, k=min(len(ends), 4)):
                ids = tokenizer(text[max(0, end - 8 * length) : end], add_special_tokens=False).input_ids
                if len(ids) >= length:
                    found = True
                    yield ids[-length:]
        if not found:
            raise ConfigError(f"no function in the corpus has a docstring, a body and {length} tokens of code up to "
                              "its docstring's end: use prompts='windows' or a shorter prompt")


@torch.inference_mode()
def _continue(target: PreTrainedModel, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations of equal-length prompts, batched (transformers' generate)."""
    ids = torch.tensor(prompts, device=target.device)
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=pad_id)
    return out.tolist()


@torch.inference_mode()
def target_features(target: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, H] last-layer features (before the final norm) of full sequences, as the engine hands them over."""
    with last_hidden_states(target) as captured:
        target(input_ids=ids.to(target.device), attention_mask=torch.ones_like(ids, device=target.device),
               logits_to_keep=1)
    return captured[0]


def _shard(ids: list[list[int]], target: PreTrainedModel) -> dict[str, torch.Tensor]:
    tokens = torch.tensor(ids, dtype=torch.long)
    features = target_features(target, tokens).to(torch.bfloat16).cpu()  # half the disk; heads train in fp32
    return {"input_ids": tokens.to(torch.int32), "features": features.contiguous()}


def build_feature_shards(
    target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: FeatureDataConfig, folder: Path,
    progress: bool = True,
) -> Path:
    """Write train and held-out shards under `folder` (resuming a partial run); returns the folder."""
    settings = {**asdict(config), "target": target.config.to_dict().get("_name_or_path", ""),
                "hidden_size": target.config.hidden_size, "dtype": str(target.dtype)}
    shards = ShardFolder(folder, settings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # held-out shards are never larger than the held-out set (a large --shard-size is for batching on GPUs)
    sizes = {"train": config.shard_size, "heldout": min(config.shard_size, config.heldout_sequences)}
    plan = [("train", i) for i in range(config.sequences // config.shard_size)]
    plan += [("heldout", i) for i in range(config.heldout_sequences // max(1, sizes["heldout"]))]
    todo = [(split, i) for split, i in plan if not shards.is_done(split, i)]
    docs = {split: load_corpus(config.corpus, split=split, heldout_percent=config.heldout_percent)
            for split in {s for s, _ in todo}}
    with counted("features", disable=not progress) as bar:
        task = bar.add_task("shards", total=len(plan), completed=len(plan) - len(todo))
        for split, index in todo:
            # each shard's sequences are a pure function of (seed, split, index): resuming redoes nothing
            rng = random.Random(f"{config.seed}-{split}-{index}")
            n_generated = round(sizes[split] * config.self_distill)
            windows = _windows(docs[split], tokenizer, config.seq_len, rng)
            rows = [next(windows) for _ in range(sizes[split] - n_generated)]
            if n_generated:
                if config.prompts == "functions":
                    source = _function_prompts(docs[split], tokenizer, config.prompt_tokens, rng)
                else:
                    source = (w[: config.prompt_tokens] for w in windows)
                prompts = [next(source) for _ in range(n_generated)]
                rows += _continue(target, prompts, config.seq_len - config.prompt_tokens, pad)
            shards.write(split, index, _shard(rows, target))
            bar.update(task, advance=1)
    return shards.folder


class FeatureShards(Dataset):
    """Every sequence of a split, in memory: {"input_ids": [T], "features": [T, H] float32}."""

    def __init__(self, folders: Path | list[Path], split: str = "train"):
        folders = [Path(f) for f in (folders if isinstance(folders, list) else [folders])]
        paths = sorted(p for folder in folders for p in (folder / split).glob("shard-*.safetensors"))
        if not paths:
            raise ConfigError(f"no {split} feature shards in {', '.join(map(str, folders))}: "
                              "run `draftsmith train heads` to build them")
        shards = [load_file(str(p)) for p in paths]
        self.ids = torch.cat([s["input_ids"] for s in shards]).long()
        self.features = torch.cat([s["features"] for s in shards])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "features": self.features[i].float()}

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        return torch.bincount(self.ids.flatten(), minlength=vocab_size)[:vocab_size]
