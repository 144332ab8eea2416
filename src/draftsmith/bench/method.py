"""What the runner times: a Method (one way of decoding) and the Output of one of its calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from draftsmith.step import Stats


@dataclass
class Output:
    tokens: list[int]  # generated tokens, a final EOS included
    seconds: float  # wall time of the generation, prefill included
    target_steps: int  # token-yielding target forwards
    stats: Stats | None = None  # our engine's statistics (draft / verify split, acceptance)


@dataclass
class Method:
    name: str
    generate: Callable[[list[int]], Output]
    compile_s: float | None = None  # seconds torch.compile took before the run, for compiled methods
    weight_format: str | None = None  # the lean forward's weight format (timed per machine: the report says it)
    close: Callable[[], None] | None = None  # releases what the method holds outside this process (a server)
    select: Callable[[str], None] | None = None  # told each task's id before its call (a per-domain method)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # time the work, not its launch
