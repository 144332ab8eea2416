"""The `export` command. The main CLI adds it with `register(app)`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from draftsmith.errors import ConfigError


def export_command(
    head: Annotated[Path, typer.Option(help="Head folder (head.json + head.safetensors) from `draftsmith train "
                                            "heads --kind eagle`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (config.json + model.safetensors).")],
    target: Annotated[str, typer.Option(help="The target the head was trained for: HF hub id, local folder, "
                                             ".gguf file or embedded alias 'smollm2' / 'gemma3'.")] = "smollm2",
    format: Annotated[str, typer.Option(help="Layout to write: speculators (vLLM's speculative_config).")]
    = "speculators",
    verifier: Annotated[Optional[str], typer.Option(help="Verifier name written for the serving engine to load; "
                                                         "default: the alias's hub id, or --target.")] = None,
    speculative_tokens: Annotated[int, typer.Option(help="Default draft length written in the config.")] = 5,
) -> None:
    """Write a trained EAGLE head in the layout a serving engine loads (see the README's caveats)."""
    from draftsmith.export import FORMATS, export_speculators

    if format not in FORMATS:
        raise ConfigError(f"unknown export format '{format}': use {', '.join(FORMATS)}")
    folder = export_speculators(head, out, target, verifier=verifier, speculative_tokens=speculative_tokens)
    typer.echo(f"wrote {folder}")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
