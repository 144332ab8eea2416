"""CLI options shared by several commands, declared once."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from draftsmith.train.trainer import TrainConfig

Target = Annotated[str, typer.Option(help="HF hub id, local folder, .gguf file, or an embedded alias: "
                                          "'smollm2' (the default), 'gemma3'.")]
Drafter = Annotated[str, typer.Option(help="auto (ngram: the fastest lossless drafter measured) | none | ngram | "
                                           "model:PATH (draft LM with the target's tokenizer) | "
                                           "student[:DIR] (the shipped distilled student) | mag[:FILE] (prompt lookup + "
                                           "bigram chain) | cascade[:K-MATRIX|:upstream[-lL]|:FILE.toml] (CS-Drafting) | "
                                           "eagle[:DIR] | medusa[:DIR] | ctc[:DIR] (feature heads; the shipped one without DIR) | "
                                           "eagle+ngram[:DIR] (the head's tree with prompt lookup's chain grafted on) | "
                                           "eagle3[:DIR] | eagle3+ngram[:DIR] (EAGLE-3 heads: three target layers) | "
                                           "layerskip[:DIR|:auto|:skip=LAYERS] (self-speculation: the target skipping "
                                           "layers by trained routers, the shipped ones without DIR, by a measured "
                                           "fixed set, or by the layers given).")]
Prune = Annotated[str, typer.Option(help="none | predictor[:DIR]: SpaDec's acceptance predictor cuts a draft tree "
                                         "to one path after the target's first layers where that is expected to "
                                         "pay; predictor-path[:DIR] cuts every tree (lossless; the shipped "
                                         "predictor without DIR).")]
LossySparseVerify = Annotated[bool, typer.Option(help="LOSSY: verify with the target's routers skipping layers "
                                                      "(SpaDec's sparse verification); the output is the sparse "
                                                      "model's, not the target's.")]
Routers = Annotated[str, typer.Option(help="Routers for --lossy-sparse-verify: a folder from `draftsmith train "
                                           "router`; empty: the shipped ones.")]
Weights = Annotated[str, typer.Option(help="Lean forward's weight layout: auto (fp32: transformers' own, bit-faithful; "
                                           "else the fastest), fastest, stored, transposed, onednn, fp16 (packed "
                                           "float16 weights with float32 activations, where packing keeps them: "
                                           "bf16 models; CPU), fp16-fused (the same weights through the fused "
                                           "kernels' product: faster steps, slower prefill; CPU), bf16-fused "
                                           "(bf16 weights as stored through the fused kernels' AVX512-BF16 dot "
                                           "products, where the CPU has them), bf16-amx (the same weights "
                                           "through AMX tiles: a tree's verification at about a one-token step's "
                                           "cost, where the CPU has AMX), gguf (a GGUF file's own Q4_0 / "
                                           "Q4_1 / Q8_0 blocks through the fused kernels: the default for a GGUF "
                                           "target without --dtype on AVX-512 CPUs without AMX; CPU), gguf-int8 (the same blocks multiplied as llama.cpp does: "
                                           "activations quantized to 8 bits per block, integer dot products; the "
                                           "GGUF default where the kernels are an AVX2 build; CPU), "
                                           "gguf-amx (that arithmetic on AMX's integer tiles: verifications at "
                                           "about a one-token step's cost; the GGUF default where the CPU has "
                                           "AMX); "
                                           "int8 / int4 / q8_0 (GGML's Q8_0 blocks "
                                           "through the same kernels): quantized weights, lossy, CPU only.")]
Backend = Annotated[str, typer.Option(help="torch (our lean Llama-family forward, else transformers') or llamacpp "
                                           "(a GGUF file run by llama.cpp, our drafters and acceptance on top; "
                                           "pip install 'draftsmith\\[llamacpp]').")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 where the hardware has fast bf16, else fp32), float32 "
                                         "(bit-exact fp32 greedy), bfloat16 or float16.")]
DraftTokens = Annotated[int, typer.Option("--k", help="Draft tokens per target step, at most (0 = plain decoding).")]
Adaptive = Annotated[bool, typer.Option("--adaptive/--fixed-k", help="Choose each step's draft length (up to k) "
                                        "from this machine's measured verify costs and recent acceptance.")]
NgramMax = Annotated[int, typer.Option(help="Longest n-gram the ngram drafter looks up.")]
NgramBranches = Annotated[int, typer.Option(help="Continuations the ngram drafter merges into a tree (1: a chain; "
                                                 "more pays where verifying many tokens costs little, on GPUs).")]
Compile = Annotated[bool, typer.Option("--compile/--eager", help="torch.compile the target's forward (once per "
                                       "process, time reported; eager if compiling fails). Measure before "
                                       "choosing it: on a 2-core CPU it was slower than eager.")]
CudaGraphs = Annotated[Optional[bool], typer.Option("--cuda-graphs/--no-cuda-graphs", help="Replay one-token and "
                                                    "draft steps from captured CUDA graphs (default: on CUDA below "
                                                    "float32, unless --compile).", show_default="auto")]
Fused = Annotated[Optional[bool], typer.Option("--fused/--no-fused", help="Run the lean forward's small operations "
                                              "through fused CPU kernels, compiled once per machine (default: on "
                                              "CPU below float32; DRAFTSMITH_FUSED=0 turns them off).",
                                              show_default="auto")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Run model code shipped with a hub model (off: safer).")]

# the options every training command takes; each command keeps its own defaults
Steps = Annotated[int, typer.Option(help="Optimizer steps.")]
BatchSize = Annotated[int, typer.Option(help="Sequences per micro-batch (per GPU under `accelerate launch`).")]
GradAccum = Annotated[int, typer.Option(help="Micro-batches per optimizer step.")]
LearningRate = Annotated[float, typer.Option(help="Peak learning rate (linear warm-up, cosine decay to a tenth).")]
Warmup = Annotated[int, typer.Option(help="Linear warm-up steps.")]
EvalEvery = Annotated[int, typer.Option(help="Held-out evaluation every N steps (0: only at the end).")]
CheckpointEvery = Annotated[int, typer.Option(help="Checkpoint every N steps (0: only the final save).")]
Seed = Annotated[int, typer.Option(help="Seed of the data order, initialisation and noise.")]
TrainDevice = Annotated[str, typer.Option(help="auto, cpu or cuda (under `accelerate launch`, one GPU each).")]
Resume = Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")]
MaxMinutes = Annotated[float, typer.Option(help="Stop training at this wall time (evaluated and saved as at the "
                                                "last step); 0 = run all --steps.")]


def training_run(out: Path, steps: int, batch_size: int, lr: float, warmup: int, eval_every: int,
                 checkpoint_every: int, seed: int, device: str, resume: bool, max_minutes: float,
                 **more) -> TrainConfig:
    """The trainer's config from the shared training options (`more`: the rest of TrainConfig's fields): a
    progress bar on a terminal, a plain line per log step in a log file."""
    from draftsmith.train.trainer import TrainConfig

    return TrainConfig(out_dir=out, max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup,
                       eval_every=eval_every, checkpoint_every=checkpoint_every, seed=seed, device=device,
                       resume=resume, max_minutes=max_minutes, progress=sys.stdout.isatty(), **more)
CorpusFolder = Annotated[Optional[Path], typer.Option("--corpus", help="Folder of source files or .jsonl; default: "
                                                                      "the installed Python standard library.")]


def corpus_source(corpus: Path | None) -> str | None:
    """The --corpus option as the data loaders take it, refused early (before any model loads) if missing."""
    if corpus is not None and not corpus.exists():
        raise ConfigError(f"corpus not found: {corpus} (give a folder of source files or a .jsonl file)")
    return str(corpus) if corpus else None
