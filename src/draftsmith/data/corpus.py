"""Code corpora: folders of source files or jsonl, split deterministically by file into train / held-out.

The default corpus is the Python standard library of the running interpreter: it is installed on every
machine, so benchmarks and training runs are reproducible without any download.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from draftsmith.errors import ConfigError

Split = Literal["train", "heldout", "all"]
DEFAULT_EXTENSIONS = (".py",)
JSONL_TEXT_FIELDS = ("text", "content", "code")


@dataclass(frozen=True)
class CodeDocument:
    name: str  # path relative to the corpus root, or "file.jsonl:LINE"
    text: str


def default_corpus_root() -> Path:
    """The interpreter's standard library folder (pure-Python sources present on every install)."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(name: str, heldout_percent: float) -> bool:
    """Deterministic split by file name: the same file always lands on the same side, on every machine."""
    bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 10_000
    return bucket < heldout_percent * 100


def _folder_documents(root: Path, extensions: tuple[str, ...]) -> list[CodeDocument]:
    docs = []
    for path in sorted(p for p in root.rglob("*") if p.suffix in extensions and p.is_file()):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "/test" in f"/{rel}" or "__pycache__" in rel:
            continue  # third-party code and test suites are not the code users write
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            docs.append(CodeDocument(rel, text))
    return docs


def _jsonl_documents(path: Path) -> list[CodeDocument]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{line_no} is not valid JSON: {e.msg}") from e
            field = next((k for k in JSONL_TEXT_FIELDS if isinstance(record.get(k), str)), None)
            if field is None:
                raise ConfigError(f"{path}:{line_no} has none of the text fields {JSONL_TEXT_FIELDS}")
            docs.append(CodeDocument(f"{path.name}:{line_no}", record[field]))
    return docs


def load_corpus(
    source: str | Path | None = None,
    split: Split = "all",
    heldout_percent: float = 10.0,
    extensions: tuple[str, ...] = DEFAULT_EXTENSIONS,
    max_documents: int | None = None,
) -> list[CodeDocument]:
    """Documents of a corpus in a stable order. `source`: folder, .jsonl file, or None for the default."""
    root = Path(source) if source is not None else default_corpus_root()
    if not root.exists():
        raise ConfigError(f"corpus not found: {root} (give a folder of source files or a .jsonl file)")
    docs = _jsonl_documents(root) if root.is_file() else _folder_documents(root, extensions)
    if split != "all":
        want_heldout = split == "heldout"
        docs = [d for d in docs if is_heldout(d.name, heldout_percent) == want_heldout]
    if not docs:
        raise ConfigError(f"corpus {root} has no {split} documents with extensions {extensions}")
    return docs[:max_documents] if max_documents else docs


def documented_functions(text: str) -> tuple[ast.Module | None, list[ast.FunctionDef | ast.AsyncFunctionDef]]:
    """A source file's tree and its functions that have a docstring and a body after it (a body to write, as
    in a request to complete the function); (None, []) for a file Python cannot parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None, []
    return tree, [node for node in ast.walk(tree)
                  if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(node) is not None
                  and len(node.body) > 1]
