"""A feature head's drafting as fixed-shape device work, replayed from CUDA graphs: no host sync inside a step
until the tree is chosen.

Eagerly, every tree level of an EAGLE head is a forward with host syncs (top-k to lists, masks gathered on the
host) and Python bookkeeping; on a GPU that dwarfs verifying the tree. With a fixed depth D and top_k K the
EAGLE-2 expansion has fixed shapes: each level feeds K frontier nodes to the head, takes each one's top K
children and keeps the K best of those K x K. So the whole tree is one captured body over static buffers: the
head's committed length (`base`), the root feature, and the candidates' tokens, parents and cumulative scores,
written on the device and read back in ONE transfer after the replay. The frontier's attention masks are built
on the device from each node's ancestors (a [K, tree slots] bool carried from level to level). The tree's
entries go to the head's cache at slots past its committed length, as the eager path writes them, and the next
feedback overwrites them.

The feedback (the head's forward over the pairs the target just kept) replays per bucket of rows, as the
target's steps do (`cuda_graphs.StaticStep`): padding rows write to dead slots past the step and see only
themselves; the newest row's output becomes the root feature, in place.

Everything runs on any device: with `capture=run_eagerly` the bodies run eagerly at each replay, which is how
the CPU tests check them against the eager drafter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from draftsmith.backends.cuda_graphs import GraphSet

FEEDBACK_BUCKETS = (1, 2, 4, 8, 16, 32)  # pairs per captured feedback; more (a prompt) run eagerly


@dataclass
class TreeBuffers:
    """One capture's buffers: what it reads besides the shared base and root, and the candidates it writes."""

    tokens: torch.Tensor  # [D * K] target ids of the candidates, level by level
    parents: torch.Tensor  # [D * K] each candidate's parent candidate (-1: the root)
    scores: torch.Tensor  # [D * K] cumulative draft log-probabilities


@dataclass
class FeedbackBuffers:
    features: torch.Tensor  # [bucket, hidden] the target's features of the kept pairs (padding rows: stale)
    tokens: torch.Tensor  # [bucket] the tokens after them
    rows: torch.Tensor  # [] long: how many of the bucket's rows are real


class CapturedTree:
    """The captured drafting of one EagleDrafter (its head, target parts and lean layers)."""

    def __init__(self, drafter, capture: Callable):
        self.drafter = drafter
        self.graphs = GraphSet(capture)
        device, hidden = drafter.device, drafter.parts.embed.weight.shape[1]
        with torch.inference_mode(False):  # read by address at every replay
            self.base = torch.zeros((), dtype=torch.long, device=device)
            self.root = torch.zeros(hidden, dtype=drafter.dtype, device=device)
        # the kept tokens go up from pinned memory without a sync; an event says when the copy is done with it
        pin = device.type == "cuda"
        self.staging = torch.zeros(FEEDBACK_BUCKETS[-1], dtype=torch.long, pin_memory=pin)
        self.staged = torch.cuda.Event() if pin else None

    @property
    def tree_slots(self) -> int:
        tree = self.drafter.tree
        return (tree.depth - 1) * tree.top_k

    def _columns(self) -> torch.Tensor:
        layers = self.drafter.layers
        return torch.arange(layers.k_cache.shape[2], device=self.drafter.device)

    # the feedback: the head reads the kept pairs after its committed ones

    def feedback(self, features: torch.Tensor, tokens: list[int]) -> bool:
        """Run the head over the kept pairs and set the root feature; False when no bucket holds them."""
        n, drafter = len(tokens), self.drafter
        bucket = next((size for size in FEEDBACK_BUCKETS if size >= n), None)
        if bucket is None or self.graphs.failed:
            return False
        base = drafter.length
        drafter.layers._reserve(base + max(bucket, self.tree_slots) + 1)
        if self.staged is not None:
            self.staged.synchronize()  # the previous step's copy has long finished: this returns at once
        self.staging[:n] = torch.tensor(tokens)

        def load(buffers: FeedbackBuffers) -> None:
            self.base.fill_(base)
            buffers.rows.fill_(n)
            buffers.features[:n].copy_(features.to(drafter.dtype))
            buffers.tokens.copy_(self.staging[:bucket], non_blocking=True)
            if self.staged is not None:
                self.staged.record()

        width = features.shape[-1]  # the target's features: one layer's, or EAGLE-3's three concatenated
        if self.graphs.run(("feedback", bucket, width), drafter.layers.k_cache,
                           lambda: self._feedback_body(bucket, width), load) is None:
            return False
        drafter.layers.length = base + n
        return True

    def _feedback_body(self, bucket: int, width: int) -> tuple[FeedbackBuffers, Callable[[], None]]:
        drafter, device = self.drafter, self.drafter.device
        with torch.inference_mode(False):
            buffers = FeedbackBuffers(torch.zeros(bucket, width, dtype=drafter.dtype, device=device),
                                      torch.zeros(bucket, dtype=torch.long, device=device),
                                      torch.zeros((), dtype=torch.long, device=device))
        columns, rows = self._columns(), torch.arange(bucket, device=device)

        def body() -> None:
            slots = self.base + rows
            real = (rows < buffers.rows)[:, None]
            # a real row sees the committed pairs and the real rows up to itself; a padding row only its own slot
            mask = torch.where(real, columns[None] <= slots[:, None], columns[None] == slots[:, None])
            x = drafter._fuse(buffers.features, drafter.parts.embed_tokens(buffers.tokens))
            out = drafter.layers.decoder_layers(x, slots + 1, mask, slots, causal=False)[0]
            self.root.copy_(out.index_select(0, (buffers.rows - 1).view(1))[0])

        return buffers, body

    # the tree

    def propose(self) -> tuple[list[int], list[int], list[float]] | None:
        """The candidates of this step's tree: target token ids, parents (-1: the root) and cumulative
        log-probabilities, level by level; None when the capture failed (run eagerly)."""
        drafter = self.drafter
        base = drafter.length
        drafter.layers._reserve(base + self.tree_slots + 1)

        def load(buffers: TreeBuffers) -> None:
            self.base.fill_(base)

        buffers = self.graphs.run("tree", drafter.layers.k_cache, self._tree_body, load)
        if buffers is None:
            return None
        values = torch.cat([buffers.tokens.double(), buffers.parents.double(), buffers.scores.double()]).tolist()
        size = len(values) // 3  # one transfer, then lists
        return ([int(v) for v in values[:size]], [int(v) for v in values[size : 2 * size]], values[2 * size :])

    def _tree_body(self) -> tuple[TreeBuffers, Callable[[], None]]:
        drafter, device = self.drafter, self.drafter.device
        depth, top_k, slots_total = drafter.tree.depth, drafter.tree.top_k, self.tree_slots
        with torch.inference_mode(False):
            buffers = TreeBuffers(*(torch.zeros(depth * top_k, dtype=dtype, device=device)
                                    for dtype in (torch.long, torch.long, torch.float32)))
        columns, frontier_rows = self._columns(), torch.arange(top_k, device=device)
        own = torch.zeros(depth, top_k, max(slots_total, 1), dtype=torch.bool, device=device)
        for level in range(1, depth):  # the frontier of level L sits at tree slots (L - 1) K .. L K - 1
            own[level, frontier_rows, (level - 1) * top_k + frontier_rows] = True
        tree_columns = torch.arange(max(slots_total, 1), device=device)

        def body() -> None:
            log_probs = drafter._logits(self.root[None]).float().log_softmax(-1)[0]
            scores, tokens = log_probs.topk(top_k)
            buffers.tokens[:top_k] = tokens
            buffers.parents[:top_k] = -1
            buffers.scores[:top_k] = scores
            frontier_ids, features = frontier_rows, self.root[None].expand(top_k, -1)
            ancestors = torch.zeros(top_k, max(slots_total, 1), dtype=torch.bool, device=device)
            committed = (columns < self.base)[None]
            for level in range(1, depth):
                visible = ancestors | own[level]
                # the tree's slots start at the committed length: place each row's visible tree slots there
                mask = committed.expand(top_k, -1).clone()
                mask.index_copy_(1, self.base + tree_columns, visible)
                slots = self.base + (level - 1) * top_k + frontier_rows
                x = drafter._fuse(features, drafter.parts.embed_tokens(drafter.parts.to_target_ids(tokens)))
                out = drafter.layers.decoder_layers(x, (self.base + level).expand(top_k), mask, slots, causal=False)[0]
                log_probs = drafter._logits(out).float().log_softmax(-1)
                child_scores, child_tokens = log_probs.topk(top_k, dim=-1)
                total = (child_scores + scores[:, None]).flatten()
                scores, best = total.topk(top_k)
                parent = best // top_k
                tokens = child_tokens.flatten()[best]
                span = slice(level * top_k, (level + 1) * top_k)
                buffers.tokens[span] = tokens
                buffers.parents[span] = frontier_ids[parent]
                buffers.scores[span] = scores
                frontier_ids, features, ancestors = level * top_k + frontier_rows, out[parent], visible[parent]
            buffers.tokens.copy_(drafter.parts.to_target_ids(buffers.tokens))

        return buffers, body
