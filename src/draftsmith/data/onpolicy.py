"""On-policy distillation data (DistillSpec): the target's own generations, which is what a draft model meets
at decode time, with the target's top logits at every generated token, so training needs no teacher forward.

Prompts are cut from a code corpus (the installed Python sources by default, or `--corpus`), never from
HumanEval: a function's signature and docstring, as a bare code prompt (the raw benchmark form) or as a chat
request to complete it (the instruct form). Each shard is one batched `generate` call (on a CPU a batch costs
little more per step than one sequence), greedy or sampled, written with a manifest of what is done: an
interrupted run resumes at the next shard, and a shard's content is a pure function of (seed, split, index).
"""

from __future__ import annotations

import ast
import random
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from draftsmith.data.corpus import CodeDocument, documented_functions, load_corpus
from draftsmith.data.shards import ShardFolder
from draftsmith.errors import ConfigError
from draftsmith.progress import counted

@dataclass
class OnPolicyConfig:
    corpus: str | None = None  # folder or .jsonl; None: the installed Python standard library
    heldout_percent: float = 10.0
    sequences: int = 768  # training sequences in all (~20 min of generation on a 2-core CPU)
    heldout_sequences: int = 64
    new_tokens: int = 128  # generated tokens per sequence (the benchmark's budget)
    max_prompt_tokens: int = 256  # longer prompts are skipped
    instruct_share: float = 0.5  # share of prompts in the chat form (needs a chat template)
    sampled_share: float = 0.5  # share of shards sampled at `temperature` (the rest greedy)
    temperature: float = 0.8
    top_logits: int = 32  # teacher logits kept per generated token (the KD loss's support)
    shard_size: int = 32  # sequences per shard = per generate call (larger on a GPU)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("instruct_share", "sampled_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} is a share in [0, 1], got {getattr(self, name)}")
        if self.sequences < self.shard_size or self.shard_size < 1 or self.heldout_sequences < 1:
            raise ConfigError(f"need sequences ({self.sequences}) >= shard_size ({self.shard_size}) >= 1 "
                              f"and heldout_sequences ({self.heldout_sequences}) >= 1")
        if self.new_tokens < 1 or self.top_logits < 1 or self.temperature <= 0:
            raise ConfigError("new_tokens and top_logits must be >= 1 and temperature > 0")


def function_prompts(docs: list[CodeDocument]) -> list[str]:
    """Every documented function of the corpus as a prompt that ends after its docstring, like a HumanEval
    prompt: the module's top-level imports, then the signature and docstring (a method dedented)."""
    prompts = []
    for doc in docs:
        tree, functions = documented_functions(doc.text)
        if not functions:
            continue
        lines = doc.text.splitlines(keepends=True)
        imports = "".join(lines[node.lineno - 1] for node in tree.body[:20]
                          if isinstance(node, ast.Import | ast.ImportFrom) and node.end_lineno == node.lineno)
        for node in functions:
            start = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
            head = textwrap.dedent("".join(lines[start : node.body[0].end_lineno]))
            prompts.append((imports + "\n\n" if imports else "") + head)
    return prompts


def instruct_request(code: str) -> str:
    """The user message asking a chat model to complete `code` (the benchmark's instruct form)."""
    from draftsmith.bench.humaneval import INSTRUCTION

    return f"{INSTRUCTION}\n\n```python\n{code.strip()}\n```\n"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, code: str, chat: bool) -> list[int]:
    from draftsmith.models import encode_prompt

    if not chat:
        return encode_prompt(tokenizer, code)
    text = tokenizer.apply_chat_template([{"role": "user", "content": instruct_request(code)}], tokenize=False,
                                         add_generation_prompt=True)
    return encode_prompt(tokenizer, text, templated=True)


@torch.inference_mode()
def generate_shard(
    target: PreTrainedModel, prompts: list[list[int]], config: OnPolicyConfig, sampled: bool, pad_id: int,
    generator_seed: int,
) -> dict[str, torch.Tensor]:
    """One batched generate call over left-padded prompts. Returns right-aligned rows [B, P + N]:
    input_ids, attention_mask (real tokens), generated (tokens the target wrote), and for each generated
    position the target's top logits (values float16 [B, N, K], ids int32)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):], attn[row, width - len(prompt):] = torch.tensor(prompt), 1
    torch.manual_seed(generator_seed)  # generate draws from torch's global generator
    sampling = dict(do_sample=True, temperature=config.temperature, top_k=0, top_p=1.0) if sampled else dict(do_sample=False)
    out = target.generate(ids.to(target.device), attention_mask=attn.to(target.device), max_new_tokens=config.new_tokens,
                          pad_token_id=pad_id, output_logits=True, return_dict_in_generate=True, **sampling)
    new = out.sequences[:, width:].cpu()
    logits = torch.stack(out.logits, dim=1).float()  # [B, N', V] raw: the target's own distribution at T = 1
    top = logits.topk(config.top_logits, dim=-1)
    n = new.shape[1]
    # a row that ended (EOS) keeps generating pad tokens: those are not the target's writing
    eos = target.generation_config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []))
    is_eos = torch.isin(new, eos_ids)
    generated = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
    pad_to = config.new_tokens - n  # every shard has the same shape, whatever its rows' lengths
    return {
        "input_ids": torch.cat([ids, new, torch.full((len(prompts), pad_to), pad_id)], 1).to(torch.int32),
        "attention_mask": torch.cat([attn.bool(), generated, torch.zeros(len(prompts), pad_to, dtype=torch.bool)], 1),
        "generated": torch.cat([torch.zeros_like(attn, dtype=torch.bool), generated,
                                torch.zeros(len(prompts), pad_to, dtype=torch.bool)], 1),
        "top_values": torch.nn.functional.pad(top.values, (0, 0, 0, pad_to)).to(torch.float16),
        "top_ids": torch.nn.functional.pad(top.indices, (0, 0, 0, pad_to)).to(torch.int32),
    }


def build_onpolicy_shards(
    target: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: OnPolicyConfig, folder: Path,
    progress: bool = True,
) -> Path:
    """Write train and held-out shards under `folder`, resuming a partial run; returns the folder."""
    # how many sequences is not a setting of the data: a later run may ask for more (they are added) or fewer
    settings = {**asdict(config), "target": target.config.to_dict().get("_name_or_path", ""),
                "vocab": len(tokenizer), "dtype": str(target.dtype)}
    for count in ("sequences", "heldout_sequences"):
        settings.pop(count)
    shards = ShardFolder(folder, settings, "on-policy data")
    chat = config.instruct_share > 0
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("instruct prompts need a tokenizer with a chat template; this target has none: "
                          "set the instruct share to 0")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    sizes = {"train": config.shard_size, "heldout": min(config.shard_size, config.heldout_sequences)}
    plan = [("train", i) for i in range(config.sequences // config.shard_size)]
    plan += [("heldout", i) for i in range(config.heldout_sequences // sizes["heldout"])]
    todo = [(split, i) for split, i in plan if not shards.is_done(split, i)]
    prompts = {}
    for split in {s for s, _ in todo}:
        prompts[split] = function_prompts(load_corpus(config.corpus, split=split, heldout_percent=config.heldout_percent))
        if not prompts[split]:
            raise ConfigError(f"the corpus's {split} files hold no documented function to prompt with")
    with counted("on-policy data", disable=not progress) as bar:
        task = bar.add_task("shards", total=len(plan), completed=len(plan) - len(todo))
        for split, index in todo:
            rng = random.Random(f"{config.seed}-{split}-{index}")
            rows: list[list[int]] = []
            while len(rows) < sizes[split]:
                ids = prompt_ids(tokenizer, rng.choice(prompts[split]), chat=rng.random() < config.instruct_share)
                if len(ids) <= config.max_prompt_tokens:
                    rows.append(ids)
            shard = generate_shard(target, rows, config, sampled=rng.random() < config.sampled_share,
                                   pad_id=pad, generator_seed=rng.randrange(2**62))
            shards.write(split, index, shard)
            bar.update(task, advance=1)
    return shards.folder


class OnPolicyData(Dataset):
    """Every sequence of a split, in memory, left-padded to one width (shards differ in prompt width), so that
    the generated tokens are the last `new_tokens` columns of every row: input_ids, attention_mask, position_ids
    [T]; generated [N] (which of those columns the target wrote); top_ids, top_values [N, K] (its top logits at
    the row predicting each of them)."""

    def __init__(self, folder: Path, split: str = "train", sequences: int | None = None):
        """`sequences`: the first shards holding that many (all shards when None)."""
        paths = sorted((Path(folder) / split).glob("shard-*.safetensors"))
        if not paths:
            raise ConfigError(f"no {split} on-policy shards in {folder}: build them with `draftsmith distill`")
        shards = [load_file(str(p)) for p in paths]
        if sequences is not None:
            sizes = torch.tensor([len(s["input_ids"]) for s in shards]).cumsum(0)
            shards = shards[: int((sizes < sequences).sum()) + 1]
        width = max(s["input_ids"].shape[1] for s in shards)
        self.new_tokens = shards[0]["top_ids"].shape[1]
        self.input_ids = torch.cat([_left_pad(s["input_ids"], width) for s in shards]).long()
        self.attention_mask = torch.cat([_left_pad(s["attention_mask"], width) for s in shards]).long()
        self.generated = torch.cat([s["generated"][:, -self.new_tokens :] for s in shards])
        self.top_ids = torch.cat([s["top_ids"] for s in shards]).long()
        self.top_values = torch.cat([s["top_values"] for s in shards])

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = self.attention_mask[i]
        return {"input_ids": self.input_ids[i], "attention_mask": mask,
                "position_ids": (mask.cumsum(0) - 1).clamp(min=0),  # left padding takes no positions
                "generated": self.generated[i], "top_ids": self.top_ids[i], "top_values": self.top_values[i].float()}

    def generated_tokens(self) -> int:
        return int(self.generated.sum())


def _left_pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (width - x.shape[1], 0)) if x.shape[1] < width else x
