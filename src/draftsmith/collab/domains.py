"""Domains for collaborative code completion: one code base each, split by file into three parts.

A domain is a folder of source files or a .jsonl of documents. The default domains are installed Python
packages of different kinds (an HTTP framework, a CLI library, a data library, part of the standard library),
found through the import system, so they exist on every machine that runs draftsmith and nothing is downloaded.
Files are split by a hash of their name: `finetune` trains the small model, `classifier` the classifier between
the two models, `test` holds the benchmark's line-completion cases. No file is in two parts.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from draftsmith.bench.linecomplete import LineCase, LineCaseConfig, build_cases
from draftsmith.data.corpus import CodeDocument, load_corpus
from draftsmith.errors import ConfigError

Part = Literal["finetune", "classifier", "test"]
PARTS: tuple[Part, ...] = ("finetune", "classifier", "test")
# name -> the importable package whose source is the domain (each is installed with draftsmith itself)
DEFAULT_DOMAINS = {"fastapi": "fastapi", "click": "click", "numpy": "numpy", "asyncio": "asyncio"}


@dataclass(frozen=True)
class SplitConfig:
    finetune: float = 0.7  # shares of the domain's files; the test part gets the rest
    classifier: float = 0.15
    max_documents: int = 400  # the first files in hash order, so a huge package stays a quick domain

    def __post_init__(self) -> None:
        if self.finetune <= 0 or self.classifier <= 0 or self.finetune + self.classifier >= 1:
            raise ConfigError(f"split shares must be positive and leave room for the test part: finetune "
                              f"{self.finetune} + classifier {self.classifier} must be < 1")


@dataclass(frozen=True)
class Domain:
    name: str
    source: Path  # folder of source files or .jsonl


def resolve_domain(spec: str | Path) -> Domain:
    """A default domain's name (`fastapi`, `click`, `numpy`, `asyncio`), an importable package's name, a folder of
    source, or a .jsonl file of documents."""
    path = Path(spec).expanduser()
    if path.exists():
        return Domain(path.stem if path.is_file() else path.resolve().name, path)
    package = DEFAULT_DOMAINS.get(str(spec), str(spec))
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"domain '{spec}' is neither a folder, a .jsonl file, nor an installed package (defaults: "
                          f"{', '.join(DEFAULT_DOMAINS)})")
    return Domain(str(spec), Path(found.submodule_search_locations[0]))


def _rank(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def split_documents(docs: list[CodeDocument], config: SplitConfig = SplitConfig()) -> dict[Part, list[CodeDocument]]:
    """Files in hash order, cut by the shares; every part gets at least one file (a domain needs three)."""
    if len(docs) < 3:
        raise ConfigError(f"a domain needs at least 3 files (one per part), this one has {len(docs)}")
    ordered = sorted(docs, key=lambda d: _rank(d.name))[: config.max_documents]
    n = len(ordered)
    first = min(max(1, round(n * config.finetune)), n - 2)
    second = min(max(first + 1, round(n * (config.finetune + config.classifier))), n - 1)
    return {"finetune": ordered[:first], "classifier": ordered[first:second], "test": ordered[second:]}


def domain_documents(domain: Domain, part: Part, config: SplitConfig = SplitConfig()) -> list[CodeDocument]:
    if part not in PARTS:
        raise ConfigError(f"unknown part '{part}': use {', '.join(PARTS)}")
    return split_documents(load_corpus(domain.source), config)[part]


def completion_cases(domain: Domain, part: Part = "test", num_cases: int = 100, seed: int = 0,
                     context_chars: int = 2000, split: SplitConfig = SplitConfig()) -> list[LineCase]:
    """Line-completion cases cut inside lines of one part: the context up to the cut, the rest of the line."""
    config = LineCaseConfig(num_cases=num_cases, mode="rest", context_chars=context_chars, seed=seed)
    return build_cases(config, docs=domain_documents(domain, part, split))
