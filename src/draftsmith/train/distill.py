"""Distilled student drafter (METHODS.md section 4): a small Llama trained to imitate the target.

The student is a plain transformers LlamaForCausalLM with the target's vocabulary, saved with safetensors
next to the target's tokenizer, so any engine can load it as a draft model. Loss per real token:

    alpha * CE(student, data) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))

averaged over real (non-padding) tokens. The number to watch is the held-out greedy match rate: the
fraction of positions where the student's argmax is the teacher's, i.e. greedy draft acceptance.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from draftsmith.data.corpus import CodeDocument, load_corpus
from draftsmith.data.onpolicy import OnPolicyConfig, OnPolicyData, build_onpolicy_shards
from draftsmith.errors import ConfigError
from draftsmith.train.trainer import Batch, Trainer, TrainConfig, TrainResult

IGNORE = -100  # label of a position that has no data token to predict (padding, teacher-generated text)


# ---- student --------------------------------------------------------------------------------------------


@dataclass
class StudentConfig:
    """Defaults: ~3.5M transformer parameters on top of the (tied) embedding, sized so a run of a few
    hundred steps fits in ~30 min on a 2-core CPU next to SmolLM2-135M, whose forward dominates the cost."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4  # head_dim 64, as in most Llamas
    num_kv_heads: int = 2
    intermediate_size: int | None = None  # default 3 * hidden_size
    tie_embeddings: bool | None = None  # default: as the target
    attention_dropout: float = 0.0

    def __post_init__(self) -> None:
        if min(self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads) < 1:
            raise ConfigError("student hidden size, layers, heads and kv heads must all be at least 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"student hidden size {self.hidden_size} must be a multiple of heads {self.num_heads}, "
                f"and heads a multiple of kv heads {self.num_kv_heads}"
            )


def vocab_rows(model: PreTrainedModel) -> int:
    """Number of logits the model emits (can exceed len(tokenizer): padded embedding matrices)."""
    return model.get_output_embeddings().weight.shape[0]


def student_config(target: PreTrainedModel, spec: StudentConfig) -> LlamaConfig:
    t = target.config
    tie = spec.tie_embeddings if spec.tie_embeddings is not None else bool(getattr(t, "tie_word_embeddings", False))
    return LlamaConfig(
        vocab_size=vocab_rows(target),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size or 3 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=getattr(t, "max_position_embeddings", 2048),
        attention_dropout=spec.attention_dropout,
        tie_word_embeddings=tie,
        bos_token_id=getattr(t, "bos_token_id", None),
        eos_token_id=getattr(t, "eos_token_id", None),
        pad_token_id=getattr(t, "pad_token_id", None),
    )


def principal_basis(weight: torch.Tensor, width: int) -> torch.Tensor:
    """[d, width] orthonormal columns: the top right-singular vectors of a [vocab, d] matrix.

    Why this projection, not truncation or a random one: W @ B @ B.T is the best rank-`width`
    approximation of W (Eckart-Young), so token-to-token similarities, which is what the embedding
    encodes, survive as well as any linear map to `width` dims can keep them. Truncating to the first
    dims assumes they matter most, which nothing in training makes true; a random orthogonal map keeps
    only width/d of every direction. It is deterministic too (no seed). When the student is as wide or
    wider, the basis is the identity, padded with zero columns."""
    d = weight.shape[1]
    if width >= d:
        return torch.eye(d, width)
    w = weight.detach().double().cpu()
    _, vectors = torch.linalg.eigh(w.T @ w)  # eigenvalues ascending: the last columns matter most
    return vectors[:, -width:].flip(1).float()


@torch.no_grad()
def build_student(
    target: PreTrainedModel, spec: StudentConfig, init_embeddings: bool = True, init_head: bool = True
) -> LlamaForCausalLM:
    """A fresh fp32 student. The embedding and output head can start from the target's, projected to the
    student's width with one shared basis, so inputs and outputs keep speaking the same coordinates."""
    student = LlamaForCausalLM(student_config(target, spec))
    t_in, t_out = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    if not (init_embeddings or init_head) or t_in.shape[0] != t_out.shape[0]:
        return student
    basis = principal_basis(t_in if init_embeddings else t_out, spec.hidden_size)
    if init_embeddings:
        student.get_input_embeddings().weight.copy_(t_in.detach().float().cpu() @ basis)
    if init_head and not (student.config.tie_word_embeddings and init_embeddings):  # tied: head is the embedding
        student.get_output_embeddings().weight.copy_(t_out.detach().float().cpu() @ basis)
    return student


def load_student(folder: Path, target: PreTrainedModel) -> PreTrainedModel:
    """A trained student (safetensors folder) in fp32, to continue distilling: more data, more steps."""
    if not (Path(folder) / "config.json").is_file():
        raise ConfigError(f"--init-from {folder}: not a student folder (no config.json)")
    student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if vocab_rows(student) != vocab_rows(target):
        raise ConfigError(f"--init-from {folder}: the student has {vocab_rows(student)} logits, the target "
                          f"{vocab_rows(target)}; a student continues only on its own target's vocabulary")
    return student.train()


# ---- data -----------------------------------------------------------------------------------------------


class TokenChunks(Dataset):
    """Documents tokenized, joined with EOS and cut into chunks of seq_len tokens (packing). Only the very
    last chunk is padded; attention_mask says which tokens are real."""

    def __init__(self, docs: list[CodeDocument], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                 max_chunks: int | None = None):
        ids: list[int] = []
        eos = tokenizer.eos_token_id
        for doc in docs:
            ids += tokenizer(doc.text, add_special_tokens=False, verbose=False)["input_ids"]
            ids += [eos] if eos is not None else []
            if max_chunks and len(ids) >= max_chunks * seq_len:
                ids = ids[: max_chunks * seq_len]
                break
        if len(ids) < 2:
            raise ConfigError("the corpus has no text to train on")
        n = math.ceil(len(ids) / seq_len)
        self.input_ids = torch.full((n * seq_len,), pad_id(tokenizer), dtype=torch.long)
        self.input_ids[: len(ids)] = torch.tensor(ids)
        self.attention_mask = (torch.arange(n * seq_len) < len(ids)).long()
        self.input_ids, self.attention_mask = self.input_ids.view(n, seq_len), self.attention_mask.view(n, seq_len)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> Batch:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """Any id works (masks, not ids, mark padding); pad, else EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def shuffled(docs: list[CodeDocument], seed: int) -> list[CodeDocument]:
    """Seeded order, so a token budget samples the whole corpus rather than its first folders."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    return docs


# ---- loss -----------------------------------------------------------------------------------------------


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, kl) averaged over real tokens.

    Shapes: logits [B, T, V] at the positions that predict `labels` [B, T]; mask [B, T] is 1 on real
    positions. KL is averaged over every real position; CE over the real positions that have a data label
    (labels == IGNORE marks text the teacher generated: there the data says nothing, the teacher does).
    """
    mask = mask.bool()
    s, t = student_logits.float(), teacher_logits.float()
    has_label = mask & (labels != IGNORE)
    ce_tok = F.cross_entropy(s.flatten(0, 1), labels.masked_fill(~has_label, IGNORE).flatten(), reduction="none")
    ce = ce_tok.sum() / has_label.sum().clamp(min=1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    kl_tok = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    kl = (kl_tok * mask).sum() / mask.sum().clamp(min=1)
    total = alpha * ce + (1 - alpha) * temperature**2 * kl
    return total, ce, kl


@dataclass
class DistillLoss:
    """loss_fn for the trainer: teacher and student read the same tokens; position t predicts t + 1."""

    teacher: PreTrainedModel
    alpha: float
    temperature: float

    def __call__(self, student: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ids, attn = batch["input_ids"], batch["attention_mask"]
        labels = ids[:, 1:].masked_fill(attn[:, 1:] == 0, IGNORE)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids, attention_mask=attn).logits
        student_logits = student(input_ids=ids, attention_mask=attn).logits
        mask = attn[:, 1:] * attn[:, :-1]
        total, ce, kl = distill_loss(student_logits[:, :-1], teacher_logits[:, :-1], labels, mask,
                                     self.alpha, self.temperature)
        return total, {"ce": ce.detach(), "kl": kl.detach()}


def topk_distill_loss(
    student_logits: torch.Tensor,
    top_ids: torch.Tensor,
    top_values: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, ce, kl) averaged over the positions that have a label, with the teacher known by its top logits
    only ([..., K] ids and values): KL from the teacher's distribution renormalised over its top K (most of its
    mass on code) to the student's, whose log-probabilities stay normalised over the whole vocabulary."""
    has_label = labels != IGNORE
    s = student_logits[has_label].float()  # [n, V]
    log_p = F.log_softmax(s, dim=-1)  # over the whole vocabulary: the costliest op here, done once at T = 1
    ce = -log_p.gather(-1, labels[has_label][:, None]).mean() if len(s) else s.sum()
    log_p_s = (log_p if temperature == 1 else F.log_softmax(s / temperature, dim=-1)).gather(-1, top_ids[has_label])
    log_p_t = F.log_softmax(top_values[has_label].float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() if len(s) else s.sum()
    return alpha * ce + (1 - alpha) * temperature**2 * kl, ce, kl


def generated_logits(student: nn.Module, batch: Batch) -> torch.Tensor:
    """[B, N, V]: the student's logits at the rows that predict the N generated tokens, which are the last N
    columns of every row (on-policy data is left-padded): only those rows go through the output head."""
    n = batch["generated"].shape[1]
    out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"], logits_to_keep=n + 1)
    return out.logits[:, :-1]


@dataclass
class OnPolicyLoss:
    """loss_fn on on-policy shards: the target's top logits came with the data, so training runs no teacher.
    Only the target's own tokens are predicted (the prompt is context: the student never drafts it)."""

    alpha: float
    temperature: float

    def __call__(self, student: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["generated"].shape[1]
        labels = batch["input_ids"][:, -n:].masked_fill(~batch["generated"].bool(), IGNORE)
        total, ce, kl = topk_distill_loss(generated_logits(student, batch), batch["top_ids"], batch["top_values"],
                                          labels, self.alpha, self.temperature)
        return total, {"ce": ce.detach(), "kl": kl.detach()}


# ---- evaluation -----------------------------------------------------------------------------------------


class HeldoutEval:
    """Teacher-forced greedy match on held-out chunks: the fraction of real positions where the student's
    argmax equals the teacher's, an estimate of greedy draft acceptance. Also CE and perplexity on the
    data. The teacher's argmax is computed once, on first use (only the main process evaluates)."""

    def __init__(self, teacher: PreTrainedModel, data: TokenChunks, batch_size: int):
        self.teacher, self.data, self.batch_size = teacher, data, batch_size
        self.teacher_argmax: list[torch.Tensor] | None = None

    def batches(self, device: torch.device):
        for i in range(0, len(self.data), self.batch_size):
            ids = self.data.input_ids[i : i + self.batch_size].to(device)
            yield ids, self.data.attention_mask[i : i + self.batch_size].to(device)

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> dict[str, float]:
        device = next(student.parameters()).device
        if self.teacher_argmax is None:
            self.teacher_argmax = [self.teacher(input_ids=ids, attention_mask=attn).logits[:, :-1].argmax(-1)
                                   for ids, attn in self.batches(device)]
        matches = ce_sum = n = 0.0
        for (ids, attn), teacher_argmax in zip(self.batches(device), self.teacher_argmax):
            logits = student(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
            real = (attn[:, 1:] * attn[:, :-1]).bool()
            matches += ((logits.argmax(-1) == teacher_argmax) & real).sum().item()
            ce_sum += F.cross_entropy(logits[real], ids[:, 1:][real], reduction="sum").item()
            n += real.sum().item()
        ce = ce_sum / max(n, 1)
        return {"greedy_match": matches / max(n, 1), "ce": ce, "ppl": math.exp(min(ce, 50.0))}


class OnPolicyEval:
    """Greedy match on held-out on-policy sequences: the share of the target's own tokens where the student's
    argmax is the target's (its top logit), i.e. the greedy acceptance of one drafted token."""

    def __init__(self, data: OnPolicyData, batch_size: int):
        self.data, self.batch_size = data, batch_size

    @torch.no_grad()
    def __call__(self, student: nn.Module) -> dict[str, float]:
        device = next(student.parameters()).device
        matches = ce_sum = n = 0.0
        for start in range(0, len(self.data), self.batch_size):
            batch = default_collate([self.data[i] for i in range(start, min(start + self.batch_size, len(self.data)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = generated_logits(student, batch).float()
            predicted = batch["generated"].bool()
            tokens = batch["input_ids"][:, -predicted.shape[1] :]
            matches += ((logits.argmax(-1) == batch["top_ids"][..., 0]) & predicted).sum().item()
            ce_sum += F.cross_entropy(logits[predicted], tokens[predicted], reduction="sum").item()
            n += predicted.sum().item()
        ce = ce_sum / max(n, 1)
        return {"greedy_match": matches / max(n, 1), "ce": ce, "ppl": math.exp(min(ce, 50.0))}


# ---- the recipe -----------------------------------------------------------------------------------------


@dataclass
class DistillConfig:
    # "onpolicy": the target's own generations for prompts cut from the corpus (DistillSpec), with its top
    # logits stored beside them; "corpus": the corpus's text itself, the teacher run on it in every batch
    data: str = "onpolicy"
    corpus: str | Path | None = None  # folder or .jsonl; None: this interpreter's standard library
    heldout_percent: float = 10.0
    seq_len: int = 128  # corpus data: tokens per training sequence
    eval_chunks: int = 32  # corpus data: held-out sequences of seq_len tokens
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    data_dir: Path | None = None  # on-policy shards (reused across runs); None: <out>/onpolicy
    alpha: float = 0.2  # mostly KL: acceptance rewards matching the teacher, CE on data only regularises
    temperature: float = 1.0  # acceptance is decided at the teacher's own temperature
    student: StudentConfig = field(default_factory=StudentConfig)
    init_embeddings: bool = True
    init_head: bool = True
    init_from: Path | None = None  # a student folder to continue from (its shape wins over `student`)
    save_dtype: str = "bfloat16"  # the saved weights' dtype: bf16 halves the file; drafting runs in the target's dtype

    def __post_init__(self) -> None:
        if self.save_dtype not in ("bfloat16", "float32", "float16"):
            raise ConfigError(f"save_dtype must be bfloat16, float32 or float16, got '{self.save_dtype}'")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha weighs CE against KL and must be in [0, 1], got {self.alpha}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a positive number, got {self.temperature}")
        if self.data not in ("onpolicy", "corpus"):
            raise ConfigError(f"data must be 'onpolicy' or 'corpus', got '{self.data}'")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len {self.seq_len} is too short (at least 2)")
        if self.eval_chunks < 1:
            raise ConfigError(f"eval_chunks must be at least 1, got {self.eval_chunks}")
        if not 0 < self.heldout_percent < 100:
            raise ConfigError(f"heldout_percent must be between 0 and 100, got {self.heldout_percent}")


def distill(
    teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: DistillConfig, train: TrainConfig
) -> TrainResult:
    """Train a student (on the target's own generations, or on the corpus) and save it in `train.out_dir`
    (loadable with from_pretrained)."""
    trainer = Trainer(train, task=config)  # first: it seeds the RNGs the student is initialised from
    student = (load_student(config.init_from, teacher) if config.init_from is not None
               else build_student(teacher, config.student, config.init_embeddings, config.init_head))
    teacher = teacher.to(trainer.device).eval().requires_grad_(False)

    if config.data == "onpolicy":
        folder = config.data_dir or train.out_dir / "onpolicy"
        if trainer.is_main_process:  # generated once, by one process; the others read the shards
            build_onpolicy_shards(teacher, tokenizer, config.onpolicy, folder)
        trainer.accelerator.wait_for_everyone()
        train_data = OnPolicyData(folder, "train", config.onpolicy.sequences)
        loss_fn = OnPolicyLoss(config.alpha, config.temperature)
        evaluate = OnPolicyEval(OnPolicyData(folder, "heldout", config.onpolicy.heldout_sequences), train.batch_size)
        print(f"on-policy data: {len(train_data)} sequences, {train_data.generated_tokens()} target tokens")
    else:
        # one epoch of training text is exactly what the run consumes; tokenizing more would be wasted
        budget = train.max_steps * train.grad_accum * train.batch_size * trainer.accelerator.num_processes
        split = dict(source=config.corpus, heldout_percent=config.heldout_percent)
        train_docs = shuffled(load_corpus(split="train", **split), train.seed)
        heldout_docs = shuffled(load_corpus(split="heldout", **split), train.seed)
        train_data = TokenChunks(train_docs, tokenizer, config.seq_len, max_chunks=budget)
        heldout = TokenChunks(heldout_docs, tokenizer, config.seq_len, max_chunks=config.eval_chunks)
        loss_fn = DistillLoss(teacher, config.alpha, config.temperature)
        evaluate = HeldoutEval(teacher, heldout, train.batch_size)
    # the untrained student's score is the number training has to beat
    untrained = evaluate(student.to(trainer.device).eval()) if trainer.is_main_process else None
    if untrained is not None:
        print(f"untrained student on held-out data: greedy match {untrained['greedy_match']:.3f}, "
              f"ce {untrained['ce']:.3f}")
    result = trainer.fit(student, train_data, loss_fn, evaluate)

    if trainer.is_main_process:
        save_student(student, tokenizer, teacher, train.out_dir, getattr(torch, config.save_dtype))
        summary = {"step": result.step, "train": result.metrics, "heldout": result.eval,
                   "heldout_untrained": untrained,
                   "distill": asdict(config), "trainer": asdict(train)}
        (train.out_dir / "distill.json").write_text(json.dumps(summary, indent=2, default=str))
    trainer.accelerator.wait_for_everyone()
    return result


def save_student(student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, teacher: PreTrainedModel,
                 out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """A from_pretrained folder: config, safetensors weights (in `dtype`), generation config and the target's
    tokenizer. The trained model itself stays as it is (fp32)."""
    gen = teacher.generation_config
    student.generation_config.eos_token_id = gen.eos_token_id
    student.generation_config.pad_token_id = gen.pad_token_id
    student.generation_config.bos_token_id = gen.bos_token_id
    saved = student if dtype == torch.float32 else copy.deepcopy(student).to(dtype)
    saved.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
