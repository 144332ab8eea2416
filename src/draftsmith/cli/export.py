"""The `export` command. The main CLI adds it with `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from draftsmith.errors import ConfigError

FORMATS = ("speculators", "gguf")


def export_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="speculators: the folder to write (config.json + "
                                                          "model.safetensors); gguf: the .gguf file to write.")],
    format: Annotated[str, typer.Option(help="speculators: a trained EAGLE head for vLLM's speculative_config; "
                                             "gguf: the target itself, unquantized, for llama.cpp.")]
    = "speculators",
    head: Annotated[Optional[Path], typer.Option(help="speculators: the head folder (head.json + head.safetensors) "
                                                      "from `draftsmith train heads --kind eagle`.")] = None,
    target: Annotated[str, typer.Option(help="The target: HF hub id, local folder, .gguf file or embedded alias "
                                             "'smollm2' / 'gemma3'.")] = "smollm2",
    verifier: Annotated[Optional[str], typer.Option(help="speculators: verifier name written for the serving engine "
                                                         "to load; default: the alias's hub id, or --target.")] = None,
    speculative_tokens: Annotated[int, typer.Option(help="speculators: default draft length in the config.")] = 5,
    gguf_dtype: Annotated[str, typer.Option(help="gguf: f32 or bf16 weights (norms stay f32).")] = "bf16",
    tokenizer_gguf: Annotated[Optional[Path], typer.Option(help="gguf: a GGUF to copy the tokenizer from; default: "
                                                               "the target's own file, when it is one.")] = None,
) -> None:
    """Write a trained EAGLE head in the layout a serving engine loads, or the target as a GGUF for llama.cpp."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format '{format}': use {', '.join(FORMATS)}")
    if format == "gguf":
        path = export_gguf(target, out, gguf_dtype, tokenizer_gguf)
        typer.echo(f"wrote {path}")
        return
    from draftsmith.export import export_speculators

    if head is None:
        raise ConfigError("--format speculators exports a trained head: give --head DIR")
    folder = export_speculators(head, out, target, verifier=verifier, speculative_tokens=speculative_tokens)
    typer.echo(f"wrote {folder}")


def export_gguf(target: str, out: Path, dtype: str, tokenizer_gguf: Path | None) -> Path:
    from draftsmith.gguf_export import write_gguf
    from draftsmith.models import gguf_path, load_model

    source = tokenizer_gguf or gguf_path(target)
    if source is None:
        raise ConfigError(f"'{target}' is not a GGUF file: give --tokenizer-gguf FILE with this model's tokenizer "
                          "(or convert it with llama.cpp's convert_hf_to_gguf.py)")
    if not source.is_file():
        raise ConfigError(f"tokenizer GGUF not found: {source}")
    if out.suffix != ".gguf":
        raise ConfigError(f"--out must name a .gguf file, got {out}")
    return write_gguf(load_model(target).model, out, source, dtype)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
