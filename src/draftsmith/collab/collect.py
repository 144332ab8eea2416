"""Teacher-force both models over line-completion cases of a domain's `classifier` files and keep the positions
where exactly one model's argmax is the true token (label 1: the small model was right), with their features.

Both models run through the same cached forward the engine decodes with (`cached_lm`), and the features come
from features.FeatureBuilder, as at decoding time (rule.CollabRule).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel

from draftsmith.backends.factory import cached_lm
from draftsmith.collab.domains import Domain, SplitConfig, completion_cases, domain_documents
from draftsmith.collab.features import ContextIndex, CorpusIndex, FeatureBuilder, LineState, Position, token_texts
from draftsmith.errors import ConfigError
from draftsmith.models import LoadedModel, encode_prompt

FEATURES_FILE = "features.safetensors"


@dataclass(frozen=True)
class CollectConfig:
    cases: int = 400  # cases cut from the classifier files
    context_chars: int = 1000  # as the benchmark's cases (collab workload)
    max_target_tokens: int = 48
    seed: int = 1  # other cuts than the fine-tuning's held-out cases (seed 0)


@dataclass
class Collected:
    large_hidden: torch.Tensor  # [n, hidden_l]
    small_hidden: torch.Tensor  # [n, hidden_s]
    scalars: torch.Tensor  # [n, 25]
    labels: torch.Tensor  # [n] 1 = the small model's token was right
    cases: torch.Tensor  # [n] the case each position came from (validation splits by case)
    mismatches: int  # positions where the two argmaxes differ (what decoding asks the classifier about)
    positions: int  # target tokens seen
    large_right: int = 0  # of them, where the large model's argmax is the true token
    small_right: int = 0


def teacher_forced(lm, ids: list[int], first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and hidden states of rows first.. of `ids` fed through the cached forward; the rows before only
    fill the cache (the output head, a fifth of a 135M model's work per row, runs on the kept rows alone)."""
    lm.reset(len(ids) + 1)
    if first > 0:
        lm.forward(ids[:first], last_only=True)
    logits, hidden = lm.forward(ids[first:], features=True)
    return logits.float(), hidden.float()


@torch.inference_mode()
def collect_case(large, small, builder: FeatureBuilder, tokenizer, context_text: str, target_text: str,
                 max_target_tokens: int, vocab: int) -> tuple[list, dict[str, int]]:
    """Rows of (large hidden, small hidden, scalars, label) of one case, and its counts: positions, mismatches
    and where each model was right."""
    prompt = encode_prompt(tokenizer, context_text)
    context_text = tokenizer.decode(prompt, skip_special_tokens=True)  # what decoding sees (rule.CollabRule.reset)
    target = tokenizer(target_text, add_special_tokens=False).input_ids[:max_target_tokens]
    counts = {"positions": len(target), "mismatches": 0, "large_right": 0, "small_right": 0}
    if not target:
        return [], counts
    ids = prompt + target
    first = len(prompt) - 1  # the row that predicts the answer's first token
    large_logits, large_hidden = teacher_forced(large, ids[:-1], first)
    small_logits, small_hidden = teacher_forced(small, ids[:-1], first)
    context, line = ContextIndex.of(context_text, prompt), LineState(context_text, prompt, builder.token_texts)
    rows = []
    for j, truth in enumerate(target):
        row = j
        l, s = int(large_logits[row, :vocab].argmax()), int(small_logits[row, :vocab].argmax())
        counts["mismatches"] += l != s
        counts["large_right"] += l == truth
        counts["small_right"] += s == truth
        if (l == truth) == (s == truth):
            continue
        line_ids, line_text, in_line = line.at(target[:j])
        position = Position(l, s, large_logits[row, :vocab].softmax(-1), small_logits[row, :vocab].softmax(-1),
                            large_hidden[row], small_hidden[row], line_ids, line_text, in_line, target[:j])
        rows.append((large_hidden[row], small_hidden[row], builder.scalars(position, context), float(s == truth)))
    return rows, counts


def collect(large: LoadedModel, small: PreTrainedModel, domain: Domain, config: CollectConfig,
            split: SplitConfig = SplitConfig(), progress: bool = True) -> Collected:
    from draftsmith.progress import track

    cases = completion_cases(domain, "classifier", config.cases, config.seed, config.context_chars, split)
    builder = FeatureBuilder(token_texts(large.tokenizer), CorpusIndex(domain_documents(domain, "finetune", split)))
    large_lm, small_lm = cached_lm(large.model), cached_lm(small)
    vocab = min(large.model.get_output_embeddings().weight.shape[0], small.get_output_embeddings().weight.shape[0])
    rows, owners, totals = [], [], {"positions": 0, "mismatches": 0, "large_right": 0, "small_right": 0}
    for c, case in enumerate(track(cases, description=f"collecting {domain.name}", disable=not progress)):
        found, counts = collect_case(large_lm, small_lm, builder, large.tokenizer, case.context, case.target,
                                     config.max_target_tokens, vocab)
        rows += found
        owners += [c] * len(found)
        totals = {k: totals[k] + counts[k] for k in totals}
    if not rows:
        raise ConfigError(f"no position of {len(cases)} cases had exactly one model right: nothing to train on")
    return Collected(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                     torch.from_numpy(np.stack([r[2] for r in rows])), torch.tensor([r[3] for r in rows]),
                     torch.tensor(owners), **totals)


def save_collected(data: Collected, folder: Path, meta: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in asdict(data).items() if isinstance(v, torch.Tensor)}
    save_file(tensors, folder / FEATURES_FILE)
    summary = {"positions_kept": len(data.labels), "small_right_share": float(data.labels.mean()),
               "mismatches": data.mismatches, "target_tokens": data.positions,
               "large_accuracy": data.large_right / max(1, data.positions),
               "small_accuracy": data.small_right / max(1, data.positions), **meta}
    (folder / "features.json").write_text(json.dumps(summary, indent=2, default=str))
    return folder / FEATURES_FILE


def load_collected(folder: Path) -> Collected:
    from safetensors.torch import load_file

    path = folder / FEATURES_FILE
    if not path.is_file():
        raise ConfigError(f"no collected features in {folder} ({FEATURES_FILE}): run `draftsmith collab collect` first")
    t = load_file(path)
    meta = json.loads((folder / "features.json").read_text()) if (folder / "features.json").is_file() else {}
    return Collected(t["large_hidden"], t["small_hidden"], t["scalars"], t["labels"], t["cases"],
                     meta.get("mismatches", 0), meta.get("target_tokens", 0))  # accuracies: features.json
