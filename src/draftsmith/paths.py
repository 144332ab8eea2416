"""Where draftsmith keeps what it can rebuild: cost calibrations, models assembled from packages."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "draftsmith"
