"""What the package ships for its embedded models (heads, the student, tables, routers, predictors), and how a
target finds them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from draftsmith.models import LoadedModel

SHIPPED_HEADS = Path(__file__).resolve().parent / "shipped"  # folders trained for the embedded models


def shipped_file(target: LoadedModel, kind: str, filename: str, command: str, use: str = "") -> Path:
    """A file the package ships for an embedded target (the student, the bigram table), or a clear error that
    says how to make one and `use` it (default: its PATH after 'KIND:')."""
    path = shipped_head_folder(target.name, kind) / filename
    if not path.is_file():
        use = use or f"its PATH after '{kind}:'"
        raise ConfigError(f"no {kind} ships for target '{target.name}': make one with `draftsmith {command} "
                          f"--target {target.name} --out PATH` and give {use}")
    return path


def shipped_head_folder(target_name: str, kind: str) -> Path:
    """Where the package keeps the `kind` head trained for an embedded target (it may not exist). A benchmark's
    target cast to another dtype (`smollm2@bfloat16`) uses its model's heads: a head is cast on loading; so does
    a path to the embedded model's GGUF file, or to a copy of it."""
    name = target_name.split('@')[0]
    if name.endswith(".gguf") and Path(name).is_file():
        from draftsmith.models import embedded_alias

        name = embedded_alias(Path(name)) or name
    return SHIPPED_HEADS / f"{name}-{kind}"


def shipped_head(kind: str, target: LoadedModel) -> Path:
    """The head shipped in the package for an embedded target (`--drafter eagle` with no folder)."""
    folder = shipped_head_folder(target.name, kind)
    if not folder.is_dir():
        shipped = sorted(p.name for p in SHIPPED_HEADS.glob("*")) if SHIPPED_HEADS.is_dir() else []
        raise ConfigError(f"no {kind} head ships for target '{target.name}' (shipped: {', '.join(shipped) or 'none'}); "
                          f"train one with `draftsmith train heads --kind {kind} --target {target.name} --out DIR` "
                          f"and use --drafter {kind}:DIR")
    return folder


def draft_model_path(spec: str, target: LoadedModel) -> str:
    """Where the draft LM of `model:PATH` or `student[:DIR]` is: PATH, DIR, or the student shipped for the
    target."""
    kind, _, path = spec.partition(":")
    if kind == "model" and not path:
        raise ConfigError("give the draft model after 'model:', e.g. model:runs/student")
    if kind == "student" and not path:
        path = str(shipped_file(target, "student", "config.json", "train student").parent)
    return path
