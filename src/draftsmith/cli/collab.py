"""`draftsmith collab finetune | collect | train-classifier`: the collaborative completion recipe, one domain at a
time, all three writing into one folder (the adapter, the collected features, the classifier), which decoding
(`--drafter`/bench `collab:DIR`) reads whole."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from draftsmith.cli.options import (BatchSize, CheckpointEvery, EvalEvery, LearningRate, MaxMinutes, Resume, Seed,
                                    Steps, TrainDevice, Warmup, training_run)

collab_app = typer.Typer(no_args_is_help=True, help="Collaborative domain code completion: a LoRA-fine-tuned small "
                                                    "model, the target, and a classifier between them.")
DomainOption = Annotated[str, typer.Option(help="A default domain (fastapi, click, numpy, asyncio), an installed "
                                                "package's name, a folder of source or a .jsonl.")]
# one folder per domain: finetune writes the adapter there, collect the features, train-classifier the classifier
CollabFolder = Annotated[Path | None, typer.Option("--out", "-o", help="The domain's collab folder (default "
                                                                       "runs/collab/DOMAIN).")]


def _folder(out: Path | None, domain: str) -> Path:
    return out if out is not None else Path("runs/collab") / Path(domain).name


@collab_app.command("finetune")
def finetune_command(
    domain: DomainOption = "fastapi",
    out: CollabFolder = None,
    target: Annotated[str, typer.Option(help="The large model (its tokenizer is the small model's).")] = "smollm2",
    small: Annotated[str, typer.Option(help="The small model: student[:DIR] (the distilled student) or "
                                            "model:PATH.")] = "student",
    rank: int = 8,
    alpha: int = 32,
    dropout: float = 0.1,
    modules: Annotated[str, typer.Option(help="Comma list of the modules LoRA adapts.")] = "q_proj,k_proj,v_proj,o_proj",
    examples: Annotated[int, typer.Option(help="Completion cases cut from the domain's finetune files.")] = 4000,
    steps: Steps = 400,
    batch_size: BatchSize = 8,
    lr: LearningRate = 1e-3,
    warmup: Warmup = 20,
    eval_every: EvalEvery = 100,
    checkpoint_every: CheckpointEvery = 100,
    max_minutes: MaxMinutes = 0.0,
    resume: Resume = False,
    seed: Seed = 0,
    device: TrainDevice = "auto",
) -> None:
    """LoRA-fine-tune the small model on one domain (loss on the completion tokens and EOS)."""
    from draftsmith.collab.domains import resolve_domain
    from draftsmith.collab.finetune import FinetuneConfig, finetune
    from draftsmith.models import load_model

    where = resolve_domain(domain)  # a bad domain fails before any model loads
    out = _folder(out, where.name)
    config = FinetuneConfig(small=small, rank=rank, alpha=alpha, dropout=dropout,
                            modules=tuple(m.strip() for m in modules.split(",") if m.strip()), examples=examples,
                            seed=seed)
    train = training_run(out, steps, batch_size, lr, warmup, eval_every, checkpoint_every, seed, device, resume,
                         max_minutes)
    large = load_model(target, device="cuda" if device == "cuda" else "cpu", dtype="float32")
    start = time.perf_counter()
    summary = finetune(large, where, config, train)
    typer.echo(f"adapter saved in {out} after {time.perf_counter() - start:.0f} s: held-out completion CE "
               f"{summary['heldout_untrained']['ce']:.3f} -> {summary['heldout']['ce']:.3f}, token accuracy "
               f"{summary['heldout_untrained']['token_accuracy']:.3f} -> {summary['heldout']['token_accuracy']:.3f}")


@collab_app.command("collect")
def collect_command(
    domain: DomainOption = "fastapi",
    out: CollabFolder = None,
    target: Annotated[str, typer.Option(help="The large model.")] = "smollm2",
    cases: Annotated[int, typer.Option(help="Line-completion cases cut from the domain's classifier files.")] = 400,
    context_chars: int = 1000,
    seed: int = 1,
) -> None:
    """Teacher-force both models over the classifier files; keep positions where exactly one is right."""
    from draftsmith.collab.collect import CollectConfig, collect, save_collected
    from draftsmith.collab.domains import resolve_domain
    from draftsmith.collab.finetune import load_small
    from draftsmith.models import load_model

    where = resolve_domain(domain)
    out = _folder(out, where.name)
    large = load_model(target, dtype="float32")
    small = load_small(out, large)
    config = CollectConfig(cases=cases, context_chars=context_chars, seed=seed)
    start = time.perf_counter()
    data = collect(large, small, where, config, progress=sys.stdout.isatty())
    path = save_collected(data, out, {"domain": where.name, "target": target, "collect": config.__dict__,
                                      "seconds": time.perf_counter() - start})
    typer.echo(f"{len(data.labels)} positions (small model right in {float(data.labels.mean()):.1%}; the models "
               f"disagreed on {data.mismatches} of {data.positions} tokens; right: large "
               f"{data.large_right / max(1, data.positions):.1%}, small {data.small_right / max(1, data.positions):.1%})"
               f" saved in {path}")


@collab_app.command("train-classifier")
def train_classifier_command(
    domain: DomainOption = "fastapi",
    out: CollabFolder = None,
    balance: Annotated[str, typer.Option(help="Class balance: smote (imbalanced-learn), weights or none.")] = "smote",
    dropout: float = 0.5,
    lr: float = 5e-4,
    batch_size: int = 64,
    max_epochs: int = 60,
    patience: Annotated[int, typer.Option(help="Epochs without a better validation loss before stopping.")] = 8,
    validation_share: Annotated[float, typer.Option(help="Share of the cases held out (whole cases).")] = 0.2,
    seed: int = 0,
) -> None:
    """Train the MLP on the collected features (BCE, SMOTE, early stopping on the validation cases)."""
    from draftsmith.collab.classifier import ClassifierConfig, save_classifier, train_classifier
    from draftsmith.collab.collect import load_collected
    from draftsmith.collab.domains import resolve_domain

    out = _folder(out, resolve_domain(domain).name)
    config = ClassifierConfig(dropout=dropout, lr=lr, batch_size=batch_size, max_epochs=max_epochs, patience=patience,
                              validation_share=validation_share, balance=balance, seed=seed)
    data = load_collected(out)
    start = time.perf_counter()
    model, summary = train_classifier(data, config)
    summary["seconds"] = time.perf_counter() - start
    save_classifier(model, out, summary)
    v = summary["validation"]
    typer.echo(f"classifier saved in {out} (best epoch {summary['best_epoch']} of {summary['epochs']}): validation "
               f"accuracy {v['accuracy']:.3f}, AUC {v['auc']:.3f}, small right in {v['small_right']:.1%} of "
               f"{v['rows']} rows, predicted small in {v['predicted_small']:.1%}")


@collab_app.command("complete")
def complete_command(
    prefix: Annotated[str, typer.Argument(help="The code before the cursor (the rest of its line is completed); "
                                               "'-' reads it from standard input.")],
    domain: DomainOption = "fastapi",
    folder: Annotated[Path | None, typer.Option("--folder", help="The collab folder (default: the one shipped for "
                                                                "the target, else runs/collab/DOMAIN).")] = None,
    method: Annotated[str, typer.Option(help="collab, bild, small-draft (lossless), small or plain.")] = "collab",
    threshold: Annotated[float, typer.Option(help="collab: keep the small model's token when P > this "
                                                  "(1 = lossless).")] = 0.5,
    k: Annotated[int, typer.Option(help="Tokens the small model drafts per step.")] = 8,
    target: Annotated[str, typer.Option(help="The large model.")] = "smollm2",
    max_new_tokens: int = 64,
) -> None:
    """Complete the current line of PREFIX with the large and the small model of a domain."""
    from draftsmith.bench.collab import COLLAB_METHODS, collab_engine, collab_folder
    from draftsmith.bench.config import MethodSpec
    from draftsmith.errors import ConfigError
    from draftsmith.collab.domains import resolve_domain
    from draftsmith.collab.rule import line_end_ids
    from draftsmith.engine import GenerationConfig
    from draftsmith.models import load_model

    if method not in COLLAB_METHODS:
        raise ConfigError(f"unknown method '{method}': use {', '.join(COLLAB_METHODS)}")
    text = sys.stdin.read() if prefix == "-" else prefix
    name = resolve_domain(domain).name
    large = load_model(target, dtype="float32")
    options = {} if method in ("plain", "small") else {"k": k}
    if method == "collab":
        options["threshold"] = threshold
    engine = collab_engine(MethodSpec(method, method, str(folder) if folder else None, options), large, name)
    config = GenerationConfig(max_new_tokens=max_new_tokens, k=0 if method in ("plain", "small") else k,
                              end_ids=line_end_ids(large.tokenizer))
    result = engine.generate(large.encode(text), config)
    line = large.tokenizer.decode(result.tokens, skip_special_tokens=True).split("\n")[0]
    typer.echo(line)
    calls = 0 if method == "small" else result.stats.target_steps + 1
    typer.echo(f"[{method} on {collab_folder(str(folder) if folder else None, large, name)}: {len(result.tokens)} "
               f"tokens, {calls} large-model calls, {result.stats.total_s * 1000:.0f} ms]", err=True)


def register(app: typer.Typer) -> None:
    app.add_typer(collab_app, name="collab")
