"""Training data for feature heads: token sequences with the target's last-layer features, computed ONCE into
safetensors shards and reused by every head trained on the same target (EAGLE-style, Medusa, CTC).

Two sources, mixed by `self_distill`:
- teacher-forced code: chunks of the corpus (the installed Python sources by default, or `--corpus`);
- self-distillation: the target's own greedy continuations of prompts cut from that code, generated in batches,
  since on a CPU a batch of sequences costs little more per step than one. A head learns what the target
  WRITES, which is what it must predict at decode time. Prompts either end at a line break anywhere
  (`prompts="windows"`) or right after a function's docstring (`prompts="functions"`): the form of a request to
  write a function body, the code assistants' workload), or in the benchmarks' own forms
  (`prompts="benchmark"`): a function's signature and docstring as a bare code prompt, or inside a chat request
  to complete it (half of them, for a target with a chat template), both as data/onpolicy.py builds them, the
  prompt's last `prompt_tokens` tokens kept.
Never HumanEval nor any benchmark's prompts: the benchmark measures them.

`routers` (`train heads --features sparse`): the features are the ROUTED model's (its routers deciding, with its
LoRA where it has one), as SpaDec retrains its EAGLE head on the sparse model it verifies with; the sequences and
the self-distilled continuations are the same as for dense features.

Shards are written one at a time with a manifest of what is done, so an interrupted run resumes at the next shard.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from draftsmith.backends.hf import last_hidden_states
from draftsmith.data.corpus import CodeDocument, documented_functions, load_corpus
from draftsmith.data.onpolicy import function_prompts, prompt_ids
from draftsmith.data.shards import ShardFolder
from draftsmith.errors import ConfigError
from draftsmith.progress import counted
from draftsmith.routers import Routers

PROMPT_KINDS = ("windows", "functions", "benchmark")


@dataclass
class FeatureDataConfig:
    corpus: str | None = None  # folder or .jsonl; None: the installed Python standard library
    heldout_percent: float = 10.0
    sequences: int = 768  # training sequences in all
    heldout_sequences: int = 64
    seq_len: int = 160  # tokens per sequence
    self_distill: float = 0.5  # share of sequences that are the target's own continuations
    prompt_tokens: int = 64  # prompt length of a self-distillation sequence (the rest is generated)
    prompts: Literal["windows", "functions", "benchmark"] = "windows"  # self-distillation prompts (see above)
    shard_size: int = 64  # sequences per shard (and per generation batch: larger on a GPU)
    seed: int = 0
    # EAGLE-3: shards also hold the residual stream entering these target layers, concatenated ("aux_features")
    feature_layers: list[int] = field(default_factory=list)

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


def _long_enough(items: list, candidates, length: int, rng: random.Random, nothing: str) -> Iterator[list[int]]:
    """Endless shuffled passes over `items`, yielding the last `length` tokens of each of an item's candidate
    prompts (`candidates(item)`) that has as many; a pass that finds none raises `nothing`."""
    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        found = False
        for i in order:
            for ids in candidates(items[i]):
                if len(ids) >= length:
                    found = True
                    yield ids[-length:]
        if not found:
            raise ConfigError(nothing)


def _function_prompts(docs, tokenizer, length: int, rng: random.Random) -> Iterator[list[int]]:
    """Prompts of `length` tokens ending right after a function's docstring (the code before it as context);
    functions with a body to write only, and too little code before them: skipped."""
    def candidates(doc: CodeDocument):
        ends = docstring_ends(doc.text)
        for end in rng.sample(ends, k=min(len(ends), 4)):
            yield tokenizer(doc.text[max(0, end - 8 * length) : end], add_special_tokens=False).input_ids

    return _long_enough(docs, candidates, length, rng, f"no function in the corpus has a docstring, a body and "
                        f"{length} tokens of code up to its docstring's end: use prompts='windows' or a shorter prompt")


def _benchmark_prompts(functions: list[str], tokenizer, length: int, rng: random.Random) -> Iterator[list[int]]:
    """The corpus's functions in the benchmarks' prompt forms (raw code, or a chat request for a target with a
    chat template), the last `length` tokens of each prompt that has as many."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    return _long_enough(functions, lambda code: [prompt_ids(tokenizer, code, chat and rng.random() < 0.5)], length,
                        rng, f"no documented function of the corpus makes a prompt of {length} tokens: use "
                        "prompts='windows' or a shorter prompt")


@torch.inference_mode()
def _continue(target: PreTrainedModel, prompts: list[list[int]], new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations of equal-length prompts, batched (transformers' generate)."""
    ids = torch.tensor(prompts, device=target.device)
    out = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=pad_id)
    return out.tolist()


@torch.inference_mode()
def target_features(target: PreTrainedModel, ids: torch.Tensor, layers: tuple[int, ...] = (),
                    routers: Routers | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, T, H] last-layer features (before the final norm) of full sequences, as the engine hands them over,
    and with `layers` the residual stream entering those layers, concatenated ([B, T, 3H]; else None). With
    `routers`, the routed model's last-layer features (target: the routed model, `Routers.routed_model`)."""
    if routers is not None:
        from draftsmith.train.router import RouterTrainConfig, routed_stack

        if layers:
            raise ConfigError("sparse features are the last layer's only: EAGLE-3's layer features come from the "
                              "dense target (use --features dense for eagle3)")
        ids = ids.to(target.device)
        hidden, _ = routed_stack(target, routers, ids, torch.ones_like(ids), RouterTrainConfig(), sample=False)
        return hidden, None
    with last_hidden_states(target) as last, last_hidden_states(target, layers) as inputs:
        target(input_ids=ids.to(target.device), attention_mask=torch.ones_like(ids, device=target.device),
               logits_to_keep=1)
    return last[0], torch.cat(inputs, dim=-1) if layers else None


def _shard(ids: list[list[int]], target: PreTrainedModel, layers: tuple[int, ...] = (),
           routers: Routers | None = None) -> dict[str, torch.Tensor]:
    tokens = torch.tensor(ids, dtype=torch.long)
    features, aux = target_features(target, tokens, layers, routers)
    shard = {"input_ids": tokens.to(torch.int32), "features": features.to(torch.bfloat16).cpu().contiguous()}
    if aux is not None:  # bf16: half the disk; heads train in fp32
        shard["aux_features"] = aux.to(torch.bfloat16).cpu().contiguous()
    return shard


def build_feature_shards(
    target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: FeatureDataConfig, folder: Path,
    progress: bool = True, routers: Routers | None = None,
) -> Path:
    """Write train and held-out shards under `folder` (resuming a partial run); returns the folder. With
    `routers`, the features are the routed model's (the text is still the dense target's)."""
    settings = {**asdict(config), "target": target.config.to_dict().get("_name_or_path", ""),
                "hidden_size": target.config.hidden_size, "dtype": str(target.dtype)}
    if not config.feature_layers:  # folders built before EAGLE-3 heads keep matching their manifests
        del settings["feature_layers"]
    routed = target
    if routers is not None:  # sparse features: never mixed with dense ones, nor with other routers'
        from draftsmith.collab.finetune import weights_fingerprint

        routed = routers.routed_model(target)
        settings["sparse_features"] = {"routers": weights_fingerprint(routers),
                                       "lora": weights_fingerprint(routed) if routed is not target else ""}
        if routers.config.margin:  # a calibrated margin routes differently (folders built before keep matching)
            settings["sparse_features"]["margin"] = routers.config.margin
    shards = ShardFolder(folder, settings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # held-out shards are never larger than the held-out set (a large --shard-size is for batching on GPUs)
    sizes = {"train": config.shard_size, "heldout": min(config.shard_size, config.heldout_sequences)}
    plan = [("train", i) for i in range(config.sequences // config.shard_size)]
    plan += [("heldout", i) for i in range(config.heldout_sequences // max(1, sizes["heldout"]))]
    todo = [(split, i) for split, i in plan if not shards.is_done(split, i)]
    docs = {split: load_corpus(config.corpus, split=split, heldout_percent=config.heldout_percent)
            for split in {s for s, _ in todo}}
    functions: dict[str, list[str]] = {}  # benchmark-form prompts: each split's documented functions, once
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
                elif config.prompts == "benchmark":
                    if split not in functions:
                        functions[split] = function_prompts(docs[split])
                    source = _benchmark_prompts(functions[split], tokenizer, config.prompt_tokens, rng)
                else:
                    source = (w[: config.prompt_tokens] for w in windows)
                prompts = [next(source) for _ in range(n_generated)]
                rows += _continue(target, prompts, config.seq_len - config.prompt_tokens, pad)
            shards.write(split, index, _shard(rows, routed, tuple(config.feature_layers), routers))
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
        has_aux = {"aux_features" in s for s in shards}
        if len(has_aux) > 1:
            raise ConfigError(f"the shards in {', '.join(map(str, folders))} mix folders with and without EAGLE-3's "
                              "layer features: build them all with the same --feature-layers")
        self.aux = torch.cat([s["aux_features"] for s in shards]) if has_aux == {True} else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"input_ids": self.ids[i], "features": self.features[i].float()}
        if self.aux is not None:
            item["aux_features"] = self.aux[i].float()
        return item

    def batch(self, start: int, size: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Sequences start..start+size as one batch on `device` (held-out evaluation)."""
        return {key: (value if key == "input_ids" else value.float()).to(device)
                for key, value in (("input_ids", self.ids[start : start + size]),
                                   ("features", self.features[start : start + size]),
                                   ("aux_features", None if self.aux is None else self.aux[start : start + size]))
                if value is not None}

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        return torch.bincount(self.ids.flatten(), minlength=vocab_size)[:vocab_size]
