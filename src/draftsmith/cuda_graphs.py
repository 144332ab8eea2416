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


class CapturedSteps:
    """A lean forward's captured steps, one per bucket, captured on first use and shared with nothing else."""

    def __init__(self, lm, capture: Callable = cuda_capture):
        self.lm, self.capture = lm, capture
        self.steps: dict[int, tuple[StaticStep, Callable[[], None]]] = {}
        self.cache: torch.Tensor | None = None  # the cache tensor the steps were captured over
        self.pool = None  # one memory pool for the buckets of one cache (see `_drop`)
        self.captures = 0  # graphs captured so far (a test and the bench can see recaptures)
        self.failed = False  # a capture failed: every step runs eagerly from then on

    def _drop(self) -> None:
        """Forget the steps captured over the old cache. Their pool goes with them: a pool whose graphs are gone
        but which still holds memory (cuBLAS keeps its workspace there) cannot take a new capture."""
        self.steps, self.cache = {}, self.lm.k_cache
        self.pool = torch.cuda.graph_pool_handle() if self.capture is cuda_capture else None

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
        with torch.cuda.device(lm.device) if lm.device.type == "cuda" else contextlib.nullcontext():
            if lm.k_cache is not self.cache:  # a new (grown) cache: graphs hold the old one's address
                self._drop()
            if size not in self.steps:
                step = StaticStep(lm, size)
                step.load(ids, positions, start, tree_mask)
                try:
                    self.steps[size] = (step, self.capture(step.run, self.pool))
                except Exception as e:  # an operation the capture rejects, memory, a driver error: eager still works
                    warnings.warn(f"CUDA graph capture failed, running eager instead: {type(e).__name__}: "
                                  f"{e}".splitlines()[0], stacklevel=3)
                    self.failed, self.steps = True, {}
                    return None
                self.captures += 1
            step, replay = self.steps[size]
            step.load(ids, positions, start, tree_mask)
            replay()
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
