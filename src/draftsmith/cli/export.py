"""The `export` command. The main CLI adds it with `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from draftsmith.errors import ConfigError

FORMATS = ("eagle3", "hf", "gguf")


def export_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="eagle3 / hf: the folder to write; gguf: the .gguf "
                                                          "file to write.")],
    format: Annotated[str, typer.Option(help="eagle3: a trained EAGLE-3 head in the layout vLLM, SGLang and "
                                             "llama.cpp load (config.json + model.safetensors with d2t/t2d); hf: "
                                             "the target's config and tokenizer (llama.cpp's converter reads them "
                                             "with --target-model-dir); gguf: the target itself, unquantized, for "
                                             "llama.cpp.")]
    = "eagle3",
    head: Annotated[Optional[Path], typer.Option(help="eagle3: the head folder (head.json + head.safetensors) "
                                                      "from `draftsmith train heads --kind eagle3`.")] = None,
    target: Annotated[str, typer.Option(help="The target: HF hub id, local folder, .gguf file or embedded alias "
                                             "'smollm2' / 'gemma3'.")] = "smollm2",
    dtype: Annotated[str, typer.Option(help="eagle3: bf16 or f32 weights.")] = "bf16",
    gguf_dtype: Annotated[str, typer.Option(help="gguf: f32 or bf16 weights (norms stay f32).")] = "bf16",
    tokenizer_gguf: Annotated[Optional[Path], typer.Option(help="gguf: a GGUF to copy the tokenizer from; default: "
                                                               "the target's own file, when it is one.")] = None,
) -> None:
    """Write a trained EAGLE-3 head in the layout serving engines load, the target's config and tokenizer, or
    the target as a GGUF for llama.cpp."""
    if format == "speculators":
        raise ConfigError("--format speculators (EAGLE-1) is retired: no serving engine loads that layout; train "
                          "an EAGLE-3 head (`draftsmith train heads --kind eagle3`) and use --format eagle3")
    if format not in FORMATS:
        raise ConfigError(f"unknown export format '{format}': use {', '.join(FORMATS)}")
    if format == "gguf":
        path = export_gguf(target, out, gguf_dtype, tokenizer_gguf)
        typer.echo(f"wrote {path}")
        return
    from draftsmith.export import export_eagle3, export_target_folder

    if format == "hf":
        typer.echo(f"wrote {export_target_folder(target, out)}")
        return
    if head is None:
        raise ConfigError("--format eagle3 exports a trained head: give --head DIR")
    if dtype not in ("bf16", "f32"):
        raise ConfigError(f"--dtype must be bf16 or f32, got {dtype}")
    import torch

    typer.echo(f"wrote {export_eagle3(head, out, torch.bfloat16 if dtype == 'bf16' else torch.float32)}")


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
