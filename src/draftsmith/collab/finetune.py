"""LoRA fine-tuning of the small model on one domain (peft), on the project's trainer.

Examples are line-completion cases cut from the domain's `finetune` files, like the benchmark's cases from its
`test` files: the context up to a cut inside a line, then the rest of the line and EOS. The loss covers the
completion tokens and EOS only. The context and the completion are tokenized apart, as at decoding time, where
the prompt ends at the cut.

The saved folder holds the LoRA adapter (peft's files) and `collab.json`, which names the small model it adapts
by its draftsmith spec (`student` = the distilled student shipped for the target), so the folder stays valid on
any machine. `load_small` merges the adapter into that model for decoding.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from draftsmith.artifacts import draft_model_path
from draftsmith.bench.linecomplete import LineCase
from draftsmith.collab.domains import Domain, SplitConfig, completion_cases
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel, encode_prompt, load_draft_model
from draftsmith.train.distill import pad_id
from draftsmith.train.trainer import Batch, TrainConfig, Trainer

SMALL_FILE = "collab.json"  # in a fine-tuned folder: which small model the adapter belongs to
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    small: str = "student"  # draftsmith drafter spec of the small model: student[:DIR] or model:PATH
    rank: int = 8
    alpha: int = 32
    dropout: float = 0.1
    modules: tuple[str, ...] = ATTENTION
    examples: int = 4000  # completion cases cut from the finetune files
    heldout_examples: int = 200  # from the classifier files: never trained on
    context_tokens: int = 256  # the context's last tokens kept before the cut
    completion_tokens: int = 48  # the completion's first tokens kept (then EOS)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA needs rank >= 1, alpha > 0 and dropout in [0, 1): got {self.rank}, "
                              f"{self.alpha}, {self.dropout}")
        if self.examples < 1 or self.context_tokens < 1 or self.completion_tokens < 1:
            raise ConfigError("examples, context_tokens and completion_tokens must be at least 1")


class CompletionExamples(Dataset):
    """Fixed-length rows: context, completion, EOS, then padding; labels are -100 except on the completion + EOS."""

    def __init__(self, cases: list[LineCase], tokenizer: PreTrainedTokenizerBase, context_tokens: int,
                 completion_tokens: int):
        if tokenizer.eos_token_id is None:
            raise ConfigError("fine-tuning needs a tokenizer with an EOS token (it ends every completion)")
        length = context_tokens + completion_tokens + 1
        self.input_ids = torch.full((len(cases), length), pad_id(tokenizer), dtype=torch.long)
        self.labels = torch.full((len(cases), length), -100, dtype=torch.long)
        self.attention_mask = torch.zeros((len(cases), length), dtype=torch.long)
        for row, case in enumerate(cases):
            context = encode_prompt(tokenizer, case.context)[-context_tokens:]
            answer = tokenizer(case.target, add_special_tokens=False).input_ids[:completion_tokens]
            answer = answer + [tokenizer.eos_token_id]
            ids = context + answer
            self.input_ids[row, : len(ids)] = torch.tensor(ids)
            self.labels[row, len(context) : len(ids)] = torch.tensor(answer)
            self.attention_mask[row, : len(ids)] = 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> Batch:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i], "labels": self.labels[i]}


def completion_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on the completion tokens and EOS (the labels that are not -100). The output head runs on
    those positions alone: over a 49k vocabulary it would cost more than the whole rest of a small model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    labels = batch["labels"][:, 1:]
    kept = labels != -100
    logits = base.lm_head(hidden[:, :-1][kept]).float()
    loss = torch.nn.functional.cross_entropy(logits, labels[kept])
    accuracy = (logits.argmax(-1) == labels[kept]).float().mean()
    return loss, {"ce": loss.detach(), "token_accuracy": accuracy}


class HeldoutCompletions:
    """Mean completion CE and token accuracy (teacher-forced) on held-out cases."""

    def __init__(self, data: CompletionExamples, batch_size: int):
        self.data, self.batch_size = data, batch_size

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        ce = accuracy = 0.0
        batches = math.ceil(len(self.data) / self.batch_size)
        for b in range(batches):
            rows = range(b * self.batch_size, min(len(self.data), (b + 1) * self.batch_size))
            batch = {k: torch.stack([self.data[i][k] for i in rows]).to(device) for k in self.data[0]}
            _, metrics = completion_loss(model, batch)
            ce, accuracy = ce + float(metrics["ce"]), accuracy + float(metrics["token_accuracy"])
        return {"ce": ce / batches, "token_accuracy": accuracy / batches}


def lora_model(small: PreTrainedModel, config: FinetuneConfig) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in small.named_modules()}
    missing = [m for m in config.modules if m not in present]
    if missing:
        raise ConfigError(f"the small model has no modules named {missing} to put LoRA on (it has e.g. "
                          f"{sorted(present)[:8]})")
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(small, lora)


def finetune(target: LoadedModel, domain: Domain, config: FinetuneConfig, train: TrainConfig,
             split: SplitConfig = SplitConfig()) -> dict:
    """Fine-tune the small model on the domain; save the adapter in train.out_dir. Returns the summary."""
    trainer = Trainer(train, task=config)
    small = load_draft_model(draft_model_path(config.small, target), target).float()
    fingerprint = weights_fingerprint(small)  # before LoRA wraps its modules
    tokenizer = target.tokenizer  # the small model shares it (checked when it loaded)
    train_cases = completion_cases(domain, "finetune", config.examples, config.seed, split=split)
    heldout_cases = completion_cases(domain, "classifier", config.heldout_examples, config.seed, split=split)
    data = CompletionExamples(train_cases, tokenizer, config.context_tokens, config.completion_tokens)
    heldout = HeldoutCompletions(
        CompletionExamples(heldout_cases, tokenizer, config.context_tokens, config.completion_tokens), train.batch_size)
    model = lora_model(small.to(trainer.device), config)
    untrained = heldout(model.eval()) if trainer.is_main_process else None
    result = trainer.fit(model, data, completion_loss, heldout)
    summary = {"domain": domain.name, "source": str(domain.source.resolve()), "examples": len(data), "step": result.step,
               "heldout_untrained": untrained, "heldout": result.eval, "train": result.metrics,
               "finetune": asdict(config), "split": asdict(split)}
    if trainer.is_main_process:
        model.save_pretrained(train.out_dir)  # adapter_config.json + adapter_model.safetensors
        small_file = {"small": config.small, "small_fingerprint": fingerprint, **summary}
        (train.out_dir / SMALL_FILE).write_text(json.dumps(small_file, indent=2, default=str))
    trainer.accelerator.wait_for_everyone()
    return summary


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of a model's weights, as bfloat16 (so the same weights match in any load dtype)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def is_finetuned(folder: Path) -> bool:
    return (folder / SMALL_FILE).is_file() and (folder / "adapter_config.json").is_file()


def load_small(folder: Path, target: LoadedModel) -> PreTrainedModel:
    """The small model a fine-tuned folder adapts, with the adapter merged in, on the target's device and dtype."""
    from peft import PeftModel

    if not is_finetuned(folder):
        raise ConfigError(f"{folder} is not a fine-tuned small model (no {SMALL_FILE} and adapter_config.json): "
                          "make one with `draftsmith collab finetune --out DIR`")
    recorded = json.loads((folder / SMALL_FILE).read_text())
    base = load_draft_model(draft_model_path(recorded["small"], target), target)
    # an adapter is a delta on its own base's weights: on any other model (a re-trained student under the same
    # name) it would run, and draft nonsense
    if recorded.get("small_fingerprint") not in (None, weights_fingerprint(base)):
        raise ConfigError(f"{folder} adapts another version of '{recorded['small']}' than the one found now (its "
                          f"weights differ): fine-tune it again with `draftsmith collab finetune --small "
                          f"{recorded['small']}`")
    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload().eval()
