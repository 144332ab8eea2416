"""`draftsmith train heads`: build (or reuse) the target's feature shards, then train a head on them."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from draftsmith.cli.train import train_app
from draftsmith.cli.options import (BatchSize, CheckpointEvery, CorpusFolder, EvalEvery, GradAccum, LearningRate,
                                    MaxMinutes, Resume, Seed, Steps, Target, TrainDevice, TrustRemoteCode, Warmup,
                                    corpus_source, training_run)
from draftsmith.errors import ConfigError



@train_app.command("heads")
def heads_command(
    kind: Annotated[str, typer.Option(help="eagle (one decoder layer, tree drafting), eagle3 (EAGLE-3: three target "
                                           "layers fused, tree drafting; `draftsmith export --format eagle3` "
                                           "writes it for vLLM, SGLang and llama.cpp), medusa (K heads, static "
                                           "tree) or ctc (the EAGLE layer with CTC-trained frames, collapsed into a "
                                           "tree).")]
    = "eagle",
    feature_layers: Annotated[str, typer.Option(help="eagle3: the 3 target layers whose inputs it reads, e.g. "
                                                     "2,15,27 (default: 2, L/2, L-3 of an L-layer target).")] = "",
    target: Target = "smollm2",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the head, checkpoints and logs.")]
    = Path("runs/eagle"),
    data: Annotated[Optional[Path], typer.Option(help="Feature shards folder (built there if missing, reused "
                                                      "if present); default: OUT/../features-TARGET.")] = None,
    corpus: CorpusFolder = None,
    features: Annotated[str, typer.Option(help="dense (the target's features) or sparse (the routed model's, its "
                                               "routers deciding: a head for --lossy-sparse-verify, as SpaDec "
                                               "retrains EAGLE on its sparse model).")] = "dense",
    routers: Annotated[str, typer.Option(help="--features sparse: the routers (a folder from `draftsmith train "
                                              "router`, with its LoRA if it has one); empty: the shipped ones.")] = "",
    sequences: Annotated[int, typer.Option(help="Training sequences (features computed once).")] = 768,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 160,
    self_distill: Annotated[float, typer.Option(help="Share of sequences that are the target's own greedy "
                                                     "continuations of code prompts (the rest: code as is).")] = 0.5,
    prompts: Annotated[str, typer.Option(help="Where self-distillation prompts end: windows (a line break "
                                              "anywhere in the code) or functions (right after a function's "
                                              "docstring: a request to write its body) or benchmark "
                                              "(signature + docstring, raw or as a chat request to write the "
                                              "function: the benchmarks' forms, from the corpus's functions).")]
    = "windows",
    prompt_tokens: Annotated[int, typer.Option(help="Prompt tokens of a self-distilled sequence (the rest of "
                                                    "--seq-len is generated).")] = 64,
    code_sequences: Annotated[int, typer.Option(help="More teacher-forced code sequences, in a second shard "
                                                     "folder (DATA-code): cheap, since nothing is generated; "
                                                     "0: none.")] = 2560,
    shard_size: Annotated[int, typer.Option(help="Sequences per feature shard and per generation batch (a GPU "
                                                 "takes 1024).")] = 64,
    data_dtype: Annotated[str, typer.Option(help="dtype the target computes features in (the dtype you decode "
                                                 "in: auto = bf16 where fast).")] = "auto",
    draft_vocab: Annotated[int, typer.Option(help="Draft from the N most frequent training tokens (0 = all).")]
    = 8192,
    medusa_heads: int = 4,
    medusa_tree_nodes: Annotated[int, typer.Option(help="Nodes of Medusa's static tree.")] = 32,
    init_from: Annotated[Optional[str], typer.Option(help="Fine-tune a trained head (same kind; its shape and "
                                                           "draft vocabulary are kept): a folder, or the kind's "
                                                           "name for the head shipped for the target.")] = None,
    steps: Steps = 1200,
    batch_size: BatchSize = 16,
    grad_accum: GradAccum = 1,
    lr: LearningRate = 1e-3,
    warmup: Warmup = 50,
    noise: Annotated[float, typer.Option(help="EAGLE input noise, in units of the features' RMS.")] = 0.1,
    unroll: Annotated[int, typer.Option(help="EAGLE training-time test: drafting steps trained on the head's own "
                                             "predictions (1 = EAGLE-1's single step).")] = 1,
    w_regression: Annotated[float, typer.Option(help="Weight of the feature regression (EAGLE, CTC).")] = 1.0,
    w_ce: Annotated[float, typer.Option(help="Weight of the soft cross-entropy (EAGLE, CTC).")] = 0.1,
    w_ctc: Annotated[float, typer.Option(help="Weight of the CTC loss (CTC heads; upstream's 0.01).")] = 0.01,
    ctc_labels: Annotated[int, typer.Option(help="CTC: future tokens each step's frames are trained to spell.")] = 3,
    ctc_frames: Annotated[int, typer.Option(help="CTC: frames per step (0 = 2 x --ctc-labels).")] = 0,
    ctc_feed: Annotated[bool, typer.Option(help="CTC: each frame also reads the embedding of the previous frame's "
                                                "best entry (token or blank), at training as at decode time.")]
    = False,
    ctc_frames_from: Annotated[str, typer.Option(help="CTC: where a step's frames come from: chain (ours: a side "
                                                      "chain of frames with a learned blank) or upstream (the CTC "
                                                      "drafter's code: the head's own consecutive outputs, a "
                                                      "vocabulary token as the blank).")] = "chain",
    data_only: Annotated[bool, typer.Option(help="Build (or finish) the feature shards and stop: train heads on "
                                                 "them later, or elsewhere, with the same data flags.")] = False,
    max_minutes: MaxMinutes = 0.0,
    eval_every: EvalEvery = 250,
    checkpoint_every: CheckpointEvery = 250,
    resume: Resume = False,
    seed: Seed = 0,
    device: TrainDevice = "auto",
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Train an EAGLE-style, EAGLE-3, Medusa or CTC head for a target; `--drafter KIND:OUT` then uses it."""
    from draftsmith.models import load_model
    from draftsmith.train.features import FeatureDataConfig, build_feature_shards
    from draftsmith.train.heads import HeadTrainConfig, head_feature_layers, head_to_tune, train_head

    corpus_source(corpus)  # a missing corpus or head is refused before anything loads
    if features not in ("dense", "sparse"):
        raise ConfigError(f"--features takes dense or sparse, got {features!r}")
    if routers and features == "dense":  # they would be ignored: dense features are the target's own
        raise ConfigError("--routers are for --features sparse (a head on the routed model's features)")
    if features == "sparse" and kind == "eagle3":
        raise ConfigError("--features sparse builds last-layer features only; eagle3 reads dense layer features")
    if init_from == kind:
        from draftsmith.artifacts import shipped_head_folder

        if not (shipped := shipped_head_folder(Path(target).name, kind)).is_dir():
            raise ConfigError(f"no {kind} head ships for target '{target}': give a folder to --init-from")
        init_from = str(shipped)
    if init_from is not None:
        head_to_tune(init_from, kind)  # refused before the data, which takes long to build
    try:
        layers = [int(i) for i in feature_layers.split(",") if i.strip()]
    except ValueError:
        raise ConfigError(f"--feature-layers takes layer numbers separated by commas, got {feature_layers!r}") from None
    data_config = FeatureDataConfig(corpus=corpus_source(corpus), sequences=sequences, seq_len=seq_len,
                                    self_distill=self_distill, prompts=prompts, prompt_tokens=prompt_tokens,
                                    shard_size=shard_size, seed=seed)
    head_config = HeadTrainConfig(kind=kind, draft_vocab=draft_vocab, medusa_heads=medusa_heads,
                                  medusa_tree_nodes=medusa_tree_nodes, noise=noise, w_regression=w_regression,
                                  w_ce=w_ce, w_ctc=w_ctc, ctc_labels=ctc_labels, ctc_frames=ctc_frames, ctc_feed=ctc_feed,
                                  ctc_frames_from=ctc_frames_from,
                                  unroll=unroll, init_from=init_from, feature_layers=layers)
    train = training_run(out, steps, batch_size, lr, warmup, eval_every, checkpoint_every, seed, device, resume,
                         max_minutes, grad_accum=grad_accum)
    loaded = load_model(target, device="cuda" if device == "cuda" else "cpu", dtype=data_dtype,
                        trust_remote_code=trust_remote_code)
    if kind == "eagle3":  # its shards also hold the three layers' features: a folder of their own
        head_config.feature_layers = layers = head_feature_layers(head_config, loaded.model)
    else:
        layers = []
    sparse = None
    if features == "sparse":
        from draftsmith.routers import load_routers_for

        sparse = load_routers_for(routers, loaded)
    suffix = f"-layers-{'-'.join(map(str, layers))}" if layers else "-sparse" if sparse else ""
    shards = data or out.parent / f"features-{Path(target).name}{suffix}"
    data_config.feature_layers = layers
    started = time.perf_counter()
    build_feature_shards(loaded.model, loaded.tokenizer, data_config, shards, routers=sparse)
    folders = [shards]
    if code_sequences:
        code_config = FeatureDataConfig(corpus=data_config.corpus, sequences=code_sequences, heldout_sequences=0,
                                        seq_len=seq_len, self_distill=0.0, shard_size=shard_size, seed=seed + 1,
                                        feature_layers=layers)
        folders.append(build_feature_shards(loaded.model, loaded.tokenizer, code_config,
                                            shards.with_name(shards.name + "-code"), routers=sparse))
    data_seconds = time.perf_counter() - started
    if data_only:
        typer.echo(f"feature shards ready in {', '.join(map(str, folders))} ({data_seconds:.0f} s); no head trained")
        return
    head_config.extra = {"command": shlex.join(["draftsmith", *sys.argv[1:]]), "data": [str(f) for f in folders],
                         "corpus": str(corpus) if corpus else "python stdlib", "self_distill": self_distill,
                         "code_sequences": code_sequences, "features": features,
                         "data_seconds": round(data_seconds, 1)}
    _, info = train_head(loaded.model, folders, head_config, train, target_name=target)
    typer.echo(f"{kind} head saved in {out}: held-out {info['heldout']}, trained in {info['train_seconds']:.0f} s "
               f"(features {data_seconds:.0f} s)")
