"""`draftsmith train student` (the old `distill`, kept as a hidden alias): distil a student drafter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from draftsmith.cli.options import (BatchSize, CheckpointEvery, CorpusFolder, EvalEvery, GradAccum, LearningRate,
                                    MaxMinutes, Resume, Seed, Steps, TrainDevice, Warmup, corpus_source,
                                    training_run)
from draftsmith.errors import ConfigError


def distill_command(
    target: Annotated[str, typer.Option(help="Teacher: HF hub id, local folder, .gguf file or embedded alias "
                                              "'smollm2' / 'gemma3'.")] = "smollm2",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the student, checkpoints and logs.")]
    = Path("runs/student"),
    corpus: CorpusFolder = None,
    heldout_percent: Annotated[float, typer.Option(help="Share of corpus files held out for evaluation.")] = 10.0,
    steps: Steps = 350,
    batch_size: BatchSize = 8,
    grad_accum: GradAccum = 1,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence (corpus data).")] = 128,
    lr: LearningRate = 2e-3,
    warmup: Warmup = 20,
    alpha: Annotated[float, typer.Option(help="Weight of CE on data; 1 - alpha goes to KL to the teacher.")] = 0.2,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the KL term.")] = 1.0,
    data: Annotated[str, typer.Option(help="onpolicy: the target's own replies to prompts cut from the corpus "
                                           "(generated once, cached, resumable); corpus: the corpus text itself.")]
    = "onpolicy",
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder of the on-policy data (reused by later runs "
                                                          "with the same settings); default: OUT/onpolicy.")] = None,
    sequences: Annotated[int, typer.Option(help="On-policy training sequences to generate.")] = 768,
    new_tokens: Annotated[int, typer.Option(help="Tokens the target writes per on-policy sequence.")] = 128,
    instruct_share: Annotated[float, typer.Option(help="Share of on-policy prompts sent as a chat request to "
                                                       "complete the function (the rest: the bare code).")] = 0.5,
    sampled_share: Annotated[float, typer.Option(help="Share of on-policy batches sampled (the rest greedy).")] = 0.5,
    generate_batch: Annotated[int, typer.Option(help="Sequences per generate call (larger on a GPU).")] = 32,
    layers: Annotated[int, typer.Option(help="Student transformer layers (6 cost no more than 4 here: "
                                                "the output head dominates).")] = 6,
    hidden: Annotated[int, typer.Option(help="Student hidden size.")] = 256,
    heads: Annotated[int, typer.Option(help="Student attention heads.")] = 4,
    kv_heads: Annotated[int, typer.Option(help="Student key/value heads.")] = 2,
    init_embeddings: Annotated[bool, typer.Option(help="Start the student's embeddings from the target's "
                                                       "(projected onto their top principal directions).")] = True,
    init_head: Annotated[bool, typer.Option(help="Start the student's output head from the target's.")] = True,
    init_from: Annotated[Optional[str], typer.Option(help="Continue from a trained student: a folder, or "
                                                          "'student' for the one shipped for the target.")] = None,
    save_dtype: Annotated[str, typer.Option(help="dtype of the saved student: bfloat16 (half the file), float32, "
                                                 "float16.")] = "bfloat16",
    eval_every: EvalEvery = 100,
    checkpoint_every: CheckpointEvery = 50,
    max_minutes: MaxMinutes = 0.0,
    resume: Resume = False,
    seed: Seed = 0,
    device: TrainDevice = "auto",
    mixed_precision: Annotated[str, typer.Option(help="auto (bf16/fp16 on GPU, none on CPU), no, bf16, fp16.")]
    = "auto",
    trust_remote_code: bool = False,
) -> None:
    """Train a small student LM to imitate the target, for use as a draft model."""
    from draftsmith.data.onpolicy import OnPolicyConfig
    from draftsmith.models import load_model
    from draftsmith.train.distill import DistillConfig, StudentConfig, distill

    # every setting is checked before the (slow) target load
    corpus_source(corpus)  # a missing corpus is refused before anything loads
    student = StudentConfig(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads)
    onpolicy = OnPolicyConfig(corpus=corpus_source(corpus), heldout_percent=heldout_percent,
                              sequences=sequences, new_tokens=new_tokens, instruct_share=instruct_share,
                              sampled_share=sampled_share, shard_size=generate_batch, seed=seed)
    config = DistillConfig(data=data, corpus=corpus, heldout_percent=heldout_percent, seq_len=seq_len, alpha=alpha,
                           temperature=temperature, onpolicy=onpolicy, data_dir=data_dir, student=student,
                           init_embeddings=init_embeddings, init_head=init_head, save_dtype=save_dtype,
                           init_from=student_folder(init_from, target))
    train = training_run(out, steps, batch_size, lr, warmup, eval_every, checkpoint_every, seed, device, resume,
                         max_minutes, grad_accum=grad_accum, mixed_precision=mixed_precision)
    # the teacher only runs forward: bf16 halves its memory on GPU; fp32 on CPU, where bf16 is often slower.
    # It is loaded on the CPU; the trainer puts it on each process's own GPU under `accelerate launch`.
    bf16 = device != "cpu" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    loaded = load_model(target, device="cpu", dtype="bfloat16" if bf16 else "float32",
                        trust_remote_code=trust_remote_code)
    result = distill(loaded.model, loaded.tokenizer, config, train)
    if result.eval:
        typer.echo(f"student saved in {out}: held-out greedy match {result.eval['greedy_match']:.1%}, "
                   f"perplexity {result.eval['ppl']:.2f}")


def student_folder(spec: str | None, target: str) -> Path | None:
    """`student`: the student shipped for an embedded target; anything else: a folder."""
    if spec != "student":
        return Path(spec) if spec else None
    from draftsmith.artifacts import shipped_head_folder

    folder = shipped_head_folder(target, "student")
    if not folder.is_dir():
        raise ConfigError(f"no student ships for target '{target}': give a folder to --init-from")
    return folder
