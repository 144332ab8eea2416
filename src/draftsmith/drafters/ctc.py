"""The CTC drafter (Wen et al., "Speculative Decoding with CTC-based Draft Model", arXiv 2412.00061).

A CTC head (heads.CtcHead) keeps the EAGLE-style head's cache of the target's true features; each step it runs
its F frames in ONE call of its decoder layer (each frame attends to the committed pairs and the frames before
it) and reads, per frame, a distribution over the draft vocabulary plus a blank. Then:

1. candidate alignments: a beam over the frames from each frame's top-k entries (blank included), scored by
   the sum of their log-probabilities;
2. CTC collapse of each alignment: repeats merged, then blanks dropped ("a a _ a b" -> "a a b");
3. a de-duplicated prefix tree of the collapsed candidates, each node valued by the summed probability of the
   alignments that pass through it (several alignments collapse to one candidate);
4. the best n nodes (a node never values more than its parent, so the set is prefix-closed), n from the
   measured verification cost as for EAGLE trees. The tree's mask and positions are built by the verifier
   from the collapsed tree's own parents and depths, so each node is scored as its own chain would be
   (upstream gathered verification logits with indices edited in place after the collapse, and its positions
   were off by one).

Nodes are distinct among siblings and deterministic (point-mass draft distributions), so greedy acceptance
follows the longest matching path and recursive rejection over siblings keeps the target's distribution
exactly under sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from draftsmith.acceptance import SamplingConfig
from draftsmith.draft import ROOT, Draft
from draftsmith.drafters.eagle import EagleDrafter
from draftsmith.errors import ConfigError
from draftsmith.heads import CtcHead


@dataclass
class CtcSearch:
    top_k: int = 4  # entries per frame a candidate alignment may take (blank included)
    beams: int = 16  # candidate alignments kept over the frames

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.beams < 1:
            raise ConfigError(f"CTC search needs top_k >= 1 and beams >= 1, got {self.top_k} and {self.beams}")


def ctc_collapse(alignment: list[int] | tuple[int, ...], blank: int) -> tuple[int, ...]:
    """CTC's many-to-one map: merge runs of the same entry, then drop blanks."""
    out: list[int] = []
    previous = None
    for entry in alignment:
        if entry != previous and entry != blank:
            out.append(entry)
        previous = entry
    return tuple(out)


def best_alignments(log_probs: torch.Tensor, top_k: int, beams: int) -> list[tuple[tuple[int, ...], float]]:
    """The `beams` most probable frame-by-frame paths through each frame's top_k entries: [(alignment, log p)],
    best first. log_probs: [frames, entries]."""
    values, entries = log_probs.topk(min(top_k, log_probs.shape[-1]), dim=-1)
    scores = values[0][:beams]
    paths = entries[0][:beams, None]
    for frame in range(1, log_probs.shape[0]):
        total = (scores[:, None] + values[frame][None]).flatten()
        best = total.topk(min(beams, total.numel())).indices
        width = values.shape[1]
        paths = torch.cat([paths[best // width], entries[frame][best % width, None]], dim=1)
        scores = total[best]
    return list(zip(map(tuple, paths.tolist()), scores.tolist()))


def collapsed_tree(alignments: list[tuple[tuple[int, ...], float]], blank: int
                   ) -> tuple[list[int], list[int], list[float]]:
    """Collapse each alignment and merge the results into a prefix tree: (tokens, parents, log values), a node's
    value the summed probability of the alignments whose collapse passes through it. Parents come first."""
    node_of: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    mass: list[float] = []
    for alignment, log_p in alignments:
        collapsed = ctc_collapse(alignment, blank)
        p = math.exp(log_p)
        for depth in range(1, len(collapsed) + 1):
            prefix = collapsed[:depth]
            node = node_of.get(prefix)
            if node is None:
                node = node_of[prefix] = len(tokens)
                tokens.append(prefix[-1])
                parents.append(node_of[prefix[:-1]] if depth > 1 else ROOT)
                mass.append(0.0)
            mass[node] += p
    return tokens, parents, [math.log(m) if m > 0 else -math.inf for m in mass]


class CtcDrafter(EagleDrafter):
    name = "ctc"

    def __init__(self, head: CtcHead, target: PreTrainedModel, search: CtcSearch | None = None):
        super().__init__(head, target)
        self.search = search or CtcSearch()
        self.blank = len(head.draft_to_target)  # one past the draft vocabulary: never a real token id
        rows = torch.cat([self.parts.head_rows, head.blank_weight.detach()[None].to(self.dtype)])
        self.frame_rows = self.layers.weights.prepare(rows)
        self.frame_embeddings = head.frame_embeddings.detach().to(self.dtype)
        self.blank_bias = float(head.blank_bias.detach())

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator | None) -> None:
        super().reset(prompt_ids, sampling, generator)
        self.root_input: torch.Tensor | None = None  # the newest pair's fused input, which the frames extend
        self.counts = {"steps": 0, "frames": 0, "blank_frames": 0, "collapsed_tokens": 0}

    @torch.inference_mode()
    def _run(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor
             ) -> torch.Tensor:
        x = self._fuse(features, tokens)
        self.root_input = x[0, -1]
        return self.layers.append(x, positions, allowed)[0]

    @torch.inference_mode()
    def frame_log_probs(self) -> torch.Tensor:
        """[F, draft vocabulary + 1] log-probabilities of this step's frames (the blank last)."""
        frames, base = len(self.frame_embeddings), self.length
        x = self.root_input + self.frame_embeddings
        positions = torch.arange(base + 1, base + 1 + frames, device=self.device)
        allowed = torch.ones(frames, base + frames, dtype=torch.bool, device=self.device).tril(base)
        out = self.layers.append(x[None], positions, allowed)[0]
        logits = self.layers.weights.multiply(self.parts.norm(out), self.frame_rows).float()
        logits[:, -1] += self.blank_bias
        return logits.log_softmax(-1)

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> Draft:
        if self.root_input is None or k < 1:
            return Draft()
        log_probs = self.frame_log_probs()
        alignments = best_alignments(log_probs, self.search.top_k, self.search.beams)
        tokens, parents, scores = collapsed_tree(alignments, self.blank)
        best = alignments[0][0]
        self.counts["steps"] += 1
        self.counts["frames"] += len(best)
        self.counts["blank_frames"] += sum(entry == self.blank for entry in best)
        self.counts["collapsed_tokens"] += len(ctc_collapse(best, self.blank))
        if not tokens:  # every candidate collapsed to nothing: the step yields the target's own token
            return Draft()
        return self._select(tokens, parents, scores, k)

    def statistics(self) -> dict[str, float]:
        """The best alignment's blank rate and collapsed length, over this request's steps."""
        steps, frames = self.counts["steps"], self.counts["frames"]
        return {"ctc_blank_rate": self.counts["blank_frames"] / frames if frames else 0.0,
                "ctc_collapsed_length": self.counts["collapsed_tokens"] / steps if steps else 0.0}
