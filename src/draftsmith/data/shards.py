"""A folder of training-data shards built one at a time (slow to make: the target generates or runs over them),
with a manifest of the settings they were made with and of the shards done, so an interrupted build resumes at
the next shard and a build with other settings is refused rather than mixed in."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from draftsmith.errors import ConfigError

MANIFEST = "manifest.json"


class ShardFolder:
    def __init__(self, folder: Path, settings: dict, what: str = "shards"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / MANIFEST
        if self.path.is_file():
            self.manifest = json.loads(self.path.read_text())
            if self.manifest["settings"] != settings:
                raise ConfigError(f"{self.folder} holds {what} made with other settings ({self.manifest['settings']}); "
                                  "use another folder, or delete it to rebuild")
        else:
            self.manifest = {"settings": settings, "done": []}

    def is_done(self, split: str, index: int) -> bool:
        return f"{split}/{index}" in self.manifest["done"]

    def write(self, split: str, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Save one shard (atomically: a crash never leaves half a file under the final name), then record it."""
        (self.folder / split).mkdir(exist_ok=True)
        tmp = self.folder / split / f"shard-{index:05d}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.folder / split / f"shard-{index:05d}.safetensors")
        self.manifest["done"].append(f"{split}/{index}")
        self.path.write_text(json.dumps(self.manifest, indent=1))
