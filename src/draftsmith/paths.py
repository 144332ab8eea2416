"""Where draftsmith keeps what it can rebuild: cost calibrations, models assembled from packages."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "draftsmith"


def cached_entry(name: str, key: str, measure: Callable[[], Any], refresh: bool = False) -> Any:
    """Entry `key` of the JSON table `name` in the cache folder: `measure()`d the first time (or on `refresh`) and
    kept. Processes share this folder (a server beside a benchmark, parallel test workers), so the table is
    re-read after measuring, keeping what others added meanwhile, and written to a file of this writer's own,
    then renamed over the table: no reader sees half a file and no writer renames another's."""
    path = cache_dir() / name
    table = _read_table(path)
    if key in table and not refresh:
        return table[key]
    value = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {**_read_table(path), key: value}
    tmp = path.with_name(f"{path.name}.{private_suffix()}.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(path)
    return value


def private_suffix() -> str:
    """Unique to this process and thread: for temporary files renamed into place."""
    return f"{os.getpid()}-{threading.get_ident()}"


def _read_table(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
