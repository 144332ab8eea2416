"""`draftsmith train router`: D-LLM routers for a target (`--drafter layerskip:OUT`, `--lossy-sparse-verify
--routers OUT`), by our recipe or SpaDec's."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from draftsmith.cli.options import (BatchSize, CheckpointEvery, CorpusFolder, EvalEvery, GradAccum, LearningRate,
                                    MaxMinutes, Resume, Seed, Steps, Target, TrainDevice, TrustRemoteCode, Warmup,
                                    corpus_source, training_run)
from draftsmith.cli.train import train_app
from draftsmith.errors import ConfigError

UPSTREAM_LR = 2e-3


@train_app.command("router")
def router_command(
    target: Target = "smollm2",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the routers, checkpoints and logs.")]
    = Path("runs/router"),
    recipe: Annotated[str, typer.Option(help="upstream (SpaDec's: a LoRA on q, k, v trained with the routers, "
                                             "cross-entropy on the text; measured better at equal executed shares, "
                                             "docs/results/2026-12-05-spadec-matched-shares.md) or distil (ours: "
                                             "the target frozen, trained to agree with the dense one).")]
    = "upstream",
    robust_router: Annotated[bool, typer.Option("--robust-router/--plain-router", help="SpaDec's multi-token robust "
                                                "router: the router reads its input quantized to 4 bits per token, "
                                                "in training and decoding.")] = False,
    ratio: Annotated[float, typer.Option(help="Target share of the layers a token executes.")] = 0.5,
    start_layer: Annotated[int, typer.Option(help="Layers before this one always run.")] = 2,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Weight of |executed share - ratio| in the loss; "
                                                 "default: 50 for distil (D-LLM's 5 left SmolLM2, frozen, at 86% "
                                                 "executed for ratio 0.5), 5 for upstream (its own).")] = None,
    lora_rank: Annotated[int, typer.Option(help="Recipe upstream: LoRA rank on q, k, v.")] = 8,
    tau: Annotated[float, typer.Option(help="Gumbel-softmax temperature.")] = 1.0,
    corpus: CorpusFolder = None,
    sequences: Annotated[int, typer.Option(help="Training sequences cut from the corpus.")] = 1024,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 256,
    steps: Steps = 300,
    batch_size: BatchSize = 8,
    grad_accum: GradAccum = 1,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate; default: 2e-2 for distil (the routers "
                                                     "start near 'execute everything' and their biases must travel: "
                                                     "3e-3 left them at 86% executed after 60 steps), "
                                                     f"{UPSTREAM_LR} for upstream (the LoRA moves the target).")]
    = None,
    warmup: Warmup = 20,
    dtype: Annotated[str, typer.Option(help="dtype of the target while training (float32 on CPU).")]
    = "float32",
    eval_every: EvalEvery = 100,
    checkpoint_every: CheckpointEvery = 100,
    max_minutes: MaxMinutes = 0.0,
    resume: Resume = False,
    seed: Seed = 0,
    device: TrainDevice = "auto",
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Train per-layer routers that let each token skip layers of the target (D-LLM), by our recipe or SpaDec's."""
    from draftsmith.backends.lean import LeanLlama
    from draftsmith.models import load_model
    from draftsmith.train.router import RouterTrainConfig, train_routers

    cfg = RouterTrainConfig(recipe=recipe, ratio=ratio, start_layer=start_layer, lam=lam, tau=tau, seq_len=seq_len,
                            sequences=sequences, corpus=corpus_source(corpus), input_bits=4 if robust_router else 0,
                            lora_rank=lora_rank)
    upstream = recipe == "upstream"
    # upstream's optimizer: weight decay 0.02, cosine down to 0 (ours: 0.1, down to a tenth)
    if lr is None:
        lr = UPSTREAM_LR if upstream else 2e-2
    train = training_run(out, steps, batch_size, lr, warmup, eval_every, checkpoint_every, seed, device, resume,
                         max_minutes, grad_accum=grad_accum, weight_decay=0.02 if upstream else 0.1,
                         min_lr_ratio=0.0 if upstream else 0.1)
    loaded = load_model(target, device="cuda" if device == "cuda" else "cpu", dtype=dtype,
                        trust_remote_code=trust_remote_code)
    if not LeanLlama.supports(loaded.model):
        raise ConfigError(f"routers run on the lean Llama-family forward; {loaded.model.config.model_type} is not one")
    _, info = train_routers(loaded.model, loaded.tokenizer, cfg, train)
    typer.echo(f"routers saved in {out}: held-out {info['heldout']}, trained in {info['train_seconds']:.0f} s")


@train_app.command("router-share")
def router_share_command(
    routers: Annotated[str, typer.Option(help="Folder of trained routers (empty: the ones shipped for the target).")]
    = "",
    share: Annotated[float, typer.Option(help="Share of all layers a token should execute on held-out text.")] = 0.6,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the calibrated copy (default: the "
                                                                    "routers' folder + '-share' + SHARE).")] = None,
    target: Target = "smollm2",
    corpus: CorpusFolder = None,
    sequences: Annotated[int, typer.Option(help="Held-out sequences the share is measured on.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per held-out sequence.")] = 128,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Copy routers with a decision margin that makes them execute SHARE of the layers on held-out text, so
    routers of different trainings (recipes) run at one executed share; prints the routed model's agreement with
    the dense one there."""
    import shutil

    from draftsmith.data.corpus import load_corpus
    from draftsmith.models import load_model
    from draftsmith.routers import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_routers_for, save_routers
    from draftsmith.train.distill import TokenChunks
    from draftsmith.train.router import calibrate_share

    source = corpus_source(corpus)
    out = out or Path(f"{routers.rstrip('/') if routers else 'runs/router'}-share{share:g}")
    if routers and out.resolve() == Path(routers).resolve():
        raise ConfigError("--out must differ from the routers' folder: the uncalibrated routers are kept")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: give another --out")
    loaded = load_model(target, dtype="float32", trust_remote_code=trust_remote_code)
    routed = load_routers_for(routers, loaded)
    heldout = TokenChunks(load_corpus(source, split="heldout"), loaded.tokenizer, seq_len, max_chunks=sequences)
    result = calibrate_share(loaded.model, routed, heldout, share)
    routed.config.training = {**routed.config.training,
                              "calibration": {"command": shlex.join(["draftsmith", *sys.argv[1:]]), **result,
                                              "heldout_sequences": len(heldout), "seq_len": seq_len}}
    save_routers(routed, out)
    if routed.adapter is not None:  # the LoRA trained with them: the routed model stays the same model
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copy2(routed.adapter / name, out / name)
    typer.echo(f"routers at share {share:g} saved in {out}: margin {result['margin']:+.3f}, held-out executed "
               f"{result['executed']:.3f}, agreement with the dense model {result['agreement']:.1%}")


@train_app.command("predictor")
def predictor_command(
    target: Target = "smollm2",
    drafter: Annotated[str, typer.Option(help="The tree drafter whose trees the predictor will prune.")] = "eagle",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the predictor, checkpoints and logs.")]
    = Path("runs/predictor"),
    layer: Annotated[int, typer.Option(help="Score nodes on the hidden state after this many target layers "
                                            "(0 = a fifth of the depth).")] = 0,
    prompts: Annotated[int, typer.Option(help="Prompts decoded to collect tree nodes.")] = 48,
    heldout_prompts: Annotated[int, typer.Option(help="Prompts whose nodes are held out for evaluation.")] = 8,
    new_tokens: Annotated[int, typer.Option(help="Tokens decoded per prompt.")] = 96,
    corpus: CorpusFolder = None,
    confidence: Annotated[bool, typer.Option(help="Weigh the drafter's log-probability of each node too (the "
                                                  "drafter must give it: eagle does).")] = True,
    dtype: Annotated[str, typer.Option(help="dtype the target decodes in (the one you will decode in).")]
    = "auto",
    steps: Steps = 300,
    batch_size: BatchSize = 256,
    lr: LearningRate = 1e-2,
    eval_every: EvalEvery = 100,
    resume: Resume = False,
    seed: Seed = 0,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Train SpaDec's acceptance predictor from the verification outcomes of a tree drafter
    (`--prune predictor:OUT`)."""
    from draftsmith.drafters.registry import build_drafter
    from draftsmith.engine import SpecEngine
    from draftsmith.models import load_model
    from draftsmith.train.predictor import PredictorTrainConfig, train_predictor

    cfg = PredictorTrainConfig(layer=layer, prompts=prompts, heldout_prompts=heldout_prompts, new_tokens=new_tokens,
                               corpus=corpus_source(corpus), confidence=confidence, seed=seed,
                               extra={"drafter": drafter})
    # the predictor is a small logistic model: the CPU, no weight decay, checkpoints at the trainer's default
    train = training_run(out, steps, batch_size, lr, 10, eval_every, 200, seed, "cpu", resume, 0.0,
                         weight_decay=0.0)
    loaded = load_model(target, dtype=dtype, trust_remote_code=trust_remote_code)
    engine = SpecEngine(loaded.model, build_drafter(drafter, loaded), loaded.tokenizer)
    _, info = train_predictor(engine, loaded.tokenizer, cfg, train, progress=sys.stdout.isatty())
    typer.echo(f"predictor saved in {out}: {info['nodes']} nodes ({info['accepted_share']:.1%} accepted), "
               f"held-out {info['heldout']}, {info['collect_seconds']:.0f} s collecting")
