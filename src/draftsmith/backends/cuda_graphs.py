"""Captured decode steps for the lean forward on CUDA: one graph per bucket of fed tokens, replayed each step.

A 135M-parameter target's one-token step on a GPU is a few hundred small kernels whose launches cost more than
their work; a CUDA graph launches them all at once. A graph replays fixed shapes and fixed addresses, so the
captured step (`StaticStep`) reads everything that changes between steps from tensors filled in place: the
token ids, their positions, the cache slots they are written to (`index_copy_`, where the eager forward slices
at a Python offset) and an attention mask over the cache's whole capacity (where the eager forward slices the
cache to its length). A step of n tokens runs in the smallest bucket that holds it; the padding rows write
their keys and values to dead slots past the step and see only themselves, so no row reads them and nothing
in them is undefined. The cache growing (new tensors) drops the graphs; they are captured again on next use.

Everything but the capture itself runs on any device: `capture=run_eagerly` replays the step body eagerly,
which is how the CPU tests check the buffers, padding and masks against the plain forward.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch

from draftsmith.errors import ConfigError

BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64)  # tokens per captured step; larger steps run eagerly


def run_eagerly(body: Callable[[], None], pool=None) -> Callable[[], None]:
    """The step body itself, run at every replay: the captured path's logic without CUDA."""
    return body


def cuda_capture(body: Callable[[], None], pool=None) -> Callable[[], None]:
    """Capture `body` into a CUDA graph (after warm-up runs on a side stream, as torch's documentation asks:
    lazy initialisation and cuBLAS workspaces must happen outside the capture); returns its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        body()
    return graph.replay


class StaticStep:
    """The buffers of one bucket's step and the body that runs the target over them."""

    def __init__(self, lm, size: int):
        capacity, device = lm.k_cache.shape[2], lm.device
        self.lm, self.size = lm, size
        with torch.inference_mode(False):  # written in place at every step, captured by address
            self.ids = torch.zeros(1, size, dtype=torch.long, device=device)
            self.positions = torch.zeros(size, dtype=torch.long, device=device)
            self.slots = torch.arange(size, device=device)
            self.mask = torch.zeros(size, capacity, dtype=torch.bool, device=device)
        self.logits = self.hidden = None

    def load(self, ids: list[int], positions: list[int] | None, start: int, tree_mask: torch.Tensor | None) -> None:
        """Fill the buffers for `ids` fed after `start` cached entries (the padding rows after them)."""
        n, size, device = len(ids), self.size, self.lm.device
        if positions is None:
            positions = list(range(start, start + n))
        pad = size - n
        values = torch.tensor([ids + [0] * pad, positions + [start] * pad, list(range(start, start + size))])
        values = values.to(device, non_blocking=True)
        self.ids[0].copy_(values[0])
        self.positions.copy_(values[1])
        self.slots.copy_(values[2])
        mask = self.mask
        mask.zero_()
        mask[:n, :start] = True
        new = mask[:, start : start + size]
        new[:n, :n] = torch.ones(n, n, dtype=torch.bool, device=device).tril() if tree_mask is None else tree_mask
        new[n:, n:].fill_diagonal_(True)  # padding rows see their own slot only

    def run(self) -> None:
        lm = self.lm
        self.logits, self.hidden = lm._forward_stack(self.ids, self.positions, self.mask, self.slots, False, False)


class GraphSet:
    """Bodies captured on first use, one per key, all over one cache tensor (`owner`): graphs hold its address,
    so a new (grown) cache drops them, and their memory pool with them (a pool whose graphs are gone but which
    still holds memory, as cuBLAS's workspace, cannot take a new capture). A failed capture warns once and
    every later call runs eagerly. Shared by the target's steps and the feature heads' drafting."""

    def __init__(self, capture: Callable = cuda_capture):
        self.capture = capture
        self.graphs: dict = {}  # key -> (its buffers, its replay, its body)
        self.owner: torch.Tensor | None = None
        self.pool = None
        self.captures = 0  # graphs captured so far (tests and the bench see recaptures)
        self.failed = False

    def run(self, key, owner: torch.Tensor, build: Callable[[], tuple[object, Callable[[], None]]],
            load: Callable[[object], None]):
        """Load key's buffers and replay its graph, capturing it first (`build` gives fresh buffers and the body
        that reads them). Returns the buffers, or None where the caller must run eagerly."""
        if self.failed:
            return None
        with torch.cuda.device(owner.device) if owner.device.type == "cuda" else contextlib.nullcontext():
            if owner is not self.owner:
                self.graphs, self.owner = {}, owner
                self.pool = torch.cuda.graph_pool_handle() if self.capture is cuda_capture else None
            if key not in self.graphs:
                buffers, body = build()
                load(buffers)
                try:
                    # the body stays referenced: tensors its closure holds are read by the graph at every replay
                    self.graphs[key] = (buffers, self.capture(body, self.pool), body)
                except Exception as e:  # an operation the capture rejects, memory, a driver error: eager still works
                    warnings.warn(f"CUDA graph capture failed, running eager instead: {type(e).__name__}: "
                                  f"{e}".splitlines()[0], stacklevel=3)
                    self.failed, self.graphs = True, {}
                    return None
                self.captures += 1
            buffers, replay, _ = self.graphs[key]
            load(buffers)
            replay()
        return buffers


class CapturedSteps:
    """A lean forward's captured steps, one per bucket, captured on first use and shared with nothing else."""

    def __init__(self, lm, capture: Callable = cuda_capture):
        self.lm = lm
        self.set = GraphSet(capture)

    @property
    def captures(self) -> int:
        return self.set.captures

    @property
    def failed(self) -> bool:
        return self.set.failed

    @property
    def cache(self) -> torch.Tensor | None:
        """The cache tensor the steps were captured over."""
        return self.set.owner

    @property
    def steps(self) -> dict:
        return self.set.graphs

    @staticmethod
    def bucket(n: int) -> int | None:
        return next((size for size in BUCKETS if size >= n), None)

    def forward(self, ids: list[int], positions: list[int] | None, tree_mask: torch.Tensor | None,
                features: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        """What `LeanLlama.forward` returns for this step, or None when no bucket holds it (run it eagerly)."""
        lm, n, start = self.lm, len(ids), self.lm.length
        size = self.bucket(n)
        if size is None or self.failed:
            return None
        lm._reserve(start + size)  # the padding rows' slots too

        def build() -> tuple[StaticStep, Callable[[], None]]:
            step = StaticStep(lm, size)
            return step, step.run

        # a step captured before a drafter asked for middle layers' features returns the last layer's: keyed apart
        key = (size, tuple(lm.feature_layers))
        step = self.set.run(key, lm.k_cache, build, lambda step: step.load(ids, positions, start, tree_mask))
        if step is None:
            return None
        lm.length = start + n
        # copies: the next replay overwrites the buffers, and a caller may keep what it was given
        logits = step.logits[:n].clone()
        return (logits, step.hidden[:n].clone()) if features else logits


def check_graphs(graphs: bool | None, device: torch.device, dtype: torch.dtype, compile: bool) -> bool:
    """Whether a lean forward captures its steps. By default on CUDA below float32 and not compiled: float32 is
    the exactness mode (attention over the whole masked cache sums in another order than over its filled
    part), and the captured step runs the eager kernels. Asked for where it cannot run: refused clearly."""
    # deterministic algorithms turn index_copy_ into a sorted index_put_ that checks its indices on the host
    deterministic = torch.are_deterministic_algorithms_enabled()
    if graphs is None:
        return device.type == "cuda" and dtype != torch.float32 and not compile and not deterministic
    if graphs and device.type != "cuda":
        raise ConfigError(f"CUDA graphs need a CUDA device; the target is on {device.type}")
    if graphs and deterministic:
        raise ConfigError("CUDA graphs cannot capture the cache writes under torch.use_deterministic_algorithms")
    if graphs and compile:
        raise ConfigError("--cuda-graphs captures the eager forward; --compile compiles it: pick one")
    return graphs


def drafting_capture(graphs: bool | None, device: torch.device) -> Callable | None:
    """How a drafter's own forwards are captured: by default on CUDA in any dtype (a draft's rounding changes
    proposals only, which the target verifies), never under deterministic algorithms (see check_graphs)."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    if graphs is None:
        graphs = device.type == "cuda" and not deterministic
    if graphs and device.type != "cuda":
        raise ConfigError(f"CUDA graphs need a CUDA device; the drafter is on {device.type}")
    return cuda_capture if graphs else None
