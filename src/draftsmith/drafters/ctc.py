"""The CTC drafter (Wen et al., "Speculative Decoding with CTC-based Draft Model", arXiv 2412.00061).

A CTC head (heads.CtcHead) keeps the EAGLE-style head's cache of the target's true features. Each step:

0. the first level: the head's own next-token distribution (its newest pair's output, trained for exactly that
   token); each of its top-k tokens x is fed as one EAGLE step (a tree level of k rows), and from each x the
   head runs its F frames, a chain in feature space (one layer call per frame for all branches, each frame
   attending to the committed pairs, its branch's node and its own earlier frames), reading per frame a
   distribution over the draft vocabulary plus a blank (a feeding head's frame also reads the embedding of the
   frame before's best entry, as in training);
1. candidates after each x: CTC prefix beam search over x's frames, alignments drawn from each frame's top-k
   tokens and the blank, each alignment CTC-collapsed as it grows (repeats merged, then blanks dropped:
   "a a _ a b" -> "a a b") and every alignment that collapses to the same candidate summed into its probability; the most probable
   candidates are kept after each frame; candidate x.c is valued P(x) * P_frames(c | x);
2. a de-duplicated prefix tree of the collapsed candidates, each node valued by the summed probability of the
   candidates that start with its path;
3. the best n nodes (a node never values more than its parent, so the set is prefix-closed), n from the
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
    top_k: int = 4  # first-level tokens expanded, and tokens per frame an alignment may take (besides the blank)
    beams: int = 16  # collapsed candidates kept after each frame
    levels: int = 1  # tree levels drafted as EAGLE steps before the frames spell the rest (1 or 2)

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.beams < 1:
            raise ConfigError(f"CTC search needs top_k >= 1 and beams >= 1, got {self.top_k} and {self.beams}")
        if self.levels not in (1, 2):
            raise ConfigError(f"CTC search drafts 1 or 2 levels as EAGLE steps before its frames, got {self.levels}")


def ctc_collapse(alignment: list[int] | tuple[int, ...], blank: int) -> tuple[int, ...]:
    """CTC's many-to-one map: merge runs of the same entry, then drop blanks."""
    out: list[int] = []
    previous = None
    for entry in alignment:
        if entry != previous and entry != blank:
            out.append(entry)
        previous = entry
    return tuple(out)


def prefix_beam_search(log_probs: torch.Tensor, top_k: int, beams: int) -> dict[tuple[int, ...], float]:
    """CTC prefix beam search over the frames: {collapsed candidate: probability}, the probability of each summed
    over every alignment (drawn from each frame's top_k entries and the blank) that collapses to it; the `beams`
    most probable candidates are kept after each frame. log_probs: [frames, entries], the blank last."""
    blank = log_probs.shape[-1] - 1
    probs = log_probs.float().exp()
    entries = log_probs[:, :blank].topk(min(top_k, blank), dim=-1).indices.tolist()
    probs, blank_probs = probs.tolist(), probs[:, blank].tolist()
    # candidate -> (probability of its alignments ending in a blank, ... ending in its last token)
    found: dict[tuple[int, ...], tuple[float, float]] = {(): (1.0, 0.0)}
    for frame, tokens in enumerate(entries):
        grown: dict[tuple[int, ...], list[float]] = {}
        for prefix, (ends_blank, ends_token) in found.items():
            total = ends_blank + ends_token
            grown.setdefault(prefix, [0.0, 0.0])[0] += total * blank_probs[frame]
            for token in tokens:
                p = probs[frame][token]
                if prefix and token == prefix[-1]:  # a repeat merges unless a blank separates it
                    grown[prefix][1] += ends_token * p
                    grown.setdefault(prefix + (token,), [0.0, 0.0])[1] += ends_blank * p
                else:
                    grown.setdefault(prefix + (token,), [0.0, 0.0])[1] += total * p
        kept = sorted(grown.items(), key=lambda item: -sum(item[1]))[:beams]
        found = {prefix: (b, t) for prefix, (b, t) in kept}
    return {prefix: b + t for prefix, (b, t) in found.items() if prefix and b + t > 0}


def candidate_tree(candidates: dict[tuple[int, ...], float]) -> tuple[list[int], list[int], list[float]]:
    """A de-duplicated prefix tree of collapsed candidates: (tokens, parents, log values), a node's value the
    summed probability of the candidates that start with its path (so never above its parent's). Parents first."""
    node_of: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    mass: list[float] = []
    for candidate, p in sorted(candidates.items(), key=lambda item: len(item[0])):
        for depth in range(1, len(candidate) + 1):
            prefix = candidate[:depth]
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

    def __init__(self, head: CtcHead, target: PreTrainedModel, search: CtcSearch | None = None,
                 graphs: bool | None = None):
        super().__init__(head, target, graphs=graphs)  # its feedback replays captured; its frames run eagerly
        self.search = search or CtcSearch()
        self.blank = len(head.draft_to_target)  # one past the draft vocabulary: never a real token id
        if head.upstream:  # the blank is a token: its output row gives the blank logit, its own slot never wins
            self.blank_token_row = head.blank_row()
            blank_row, self.blank_bias = self.parts.head_rows[self.blank_token_row], 0.0
        else:
            blank_row, self.blank_bias = head.blank_weight.detach().to(self.dtype), float(head.blank_bias.detach())
            self.frame_embeddings = head.frame_embeddings.detach().to(self.dtype)
        self.frame_rows = self.layers.weights.prepare(torch.cat([self.parts.head_rows, blank_row[None]]))

    def reset(self, prompt_ids: list[int], sampling: SamplingConfig, generator: torch.Generator | None) -> None:
        super().reset(prompt_ids, sampling, generator)
        self.counts = {"steps": 0, "frames": 0, "blank_frames": 0, "collapsed_tokens": 0}

    @torch.inference_mode()
    def frame_log_probs(self, anchors: torch.Tensor, sees: torch.Tensor, position: int) -> torch.Tensor:
        """[m, F, draft vocabulary + 1] log-probabilities (the blank last) of the frames of m anchors: their
        outputs `anchors` [m, H], `sees` [m, cache] which cache entries each anchor's frames attend to, `position`
        the anchors' position. Frame f sits at position + 1 + f (upstream frames: at position + f, frame 0 being
        the anchor's own output)."""
        if self.head.upstream:
            return self._upstream_frame_log_probs(anchors, sees, position)
        rows, outputs, logits = len(anchors), [], []
        own = torch.eye(rows, dtype=torch.bool, device=self.device)
        previous = anchors
        for frame, slot in enumerate(self.frame_embeddings):
            slot = slot.expand(rows, -1)  # a frame embedding where a pair has its next token's
            if logits:  # a feeding head: plus what the frame before was best as
                slot = slot + self.head.entry_embeddings(logits[-1].argmax(-1), self.parts)
            sees = torch.cat([sees, own], dim=1)
            at = torch.full((rows,), position + 1 + frame, device=self.device)
            previous = self.layers.append(self._fuse(previous, slot), at, sees)[0]
            outputs.append(previous)
            if self.head.config.ctc_feed:  # its next frame needs this one's best entry now
                logits.append(self._frame_logits(previous))
        # without feeding, one product for all frames (the output rows are read once, not once a frame)
        logits = torch.stack(logits, dim=1) if logits else self._frame_logits(torch.stack(outputs, dim=1))
        return logits.log_softmax(-1)

    def _upstream_frame_log_probs(self, anchors: torch.Tensor, sees: torch.Tensor, position: int) -> torch.Tensor:
        """Upstream's frames: the anchor's output, then the head's own chain, each step fed the embedding of the
        frame before's best entry (the blank as its token) with that frame's output."""
        rows = len(anchors)
        own = torch.eye(rows, dtype=torch.bool, device=self.device)
        previous, logits = anchors, [self._frame_logits(anchors)]
        for frame in range(1, self.head.config.ctc_frames):
            fed = self.head.entry_embeddings(logits[-1].argmax(-1), self.parts)
            sees = torch.cat([sees, own], dim=1)
            at = torch.full((rows,), position + frame, device=self.device)
            previous = self.layers.append(self._fuse(previous, fed), at, sees)[0]
            logits.append(self._frame_logits(previous))
        return torch.stack(logits, dim=1).log_softmax(-1)

    def _frame_logits(self, frames: torch.Tensor) -> torch.Tensor:
        logits = self.layers.weights.multiply(self.parts.norm(frames), self.frame_rows).float()
        logits[..., -1] += self.blank_bias
        if self.head.upstream:
            logits[..., self.blank_token_row] = float("-inf")
        return logits

    def first_token_probs(self) -> torch.Tensor:
        """[draft vocabulary]: the head's distribution of the token after the root (its newest pair's output)."""
        return self._logits(self.root_feature[None]).float().softmax(-1)[0]

    @torch.inference_mode()
    def propose(self, context: list[int], k: int) -> Draft:
        """The first level from the head's own next-token distribution (its pair output, trained for exactly that
        token); each of its `top_k` best tokens x is fed as an EAGLE step. With `levels=2` the `top_k` best
        pairs (x, y) by P(x) P(y | x), y from x's step output, are fed as a second EAGLE step. The frames of the
        last level's nodes then spell what follows them: a candidate x.c (or x.y.c) is valued P(x) [P(y | x)]
        P_frames(c | ...), so the frames' tokens are conditioned on the tokens before them, not a marginal."""
        if self.root_feature is None or k < 1:
            return Draft()
        top_k, base = self.search.top_k, self.length
        first = self.first_token_probs()
        first_p, first_ids = first.topk(min(top_k, first.shape[-1]))
        rows = len(first_ids)
        sees = torch.cat([torch.ones(rows, base, dtype=torch.bool, device=self.device),
                          torch.eye(rows, dtype=torch.bool, device=self.device)], dim=1)
        anchors = self._run(self.root_feature[None].expand(rows, -1), self.parts.to_target_ids(first_ids),
                            torch.full((rows,), base + 1, device=self.device), sees)
        prefixes = [(x,) for x in first_ids.tolist()]
        masses = first_p.tolist()
        weighted: dict[tuple[int, ...], float] = {}
        if self.search.levels == 2:
            anchors, sees, prefixes, masses = self._second_level(anchors, sees, prefixes, masses, weighted)
        log_probs = self.frame_log_probs(anchors, sees, base + self.search.levels)
        for prefix, mass, frames in zip(prefixes, masses, log_probs):
            following = prefix_beam_search(frames, top_k, self.search.beams)
            weighted[prefix] = mass * max(0.0, 1.0 - sum(following.values()))  # so that the node is worth `mass`
            weighted.update({(*prefix, *c): mass * p for c, p in following.items()})
        tokens, parents, scores = candidate_tree(weighted)
        best = log_probs[0].argmax(-1).tolist()  # the best single alignment after the best node of the last level
        self.counts["steps"] += 1
        self.counts["frames"] += len(best)
        self.counts["blank_frames"] += sum(entry == self.blank for entry in best)
        self.counts["collapsed_tokens"] += len(ctc_collapse(best, self.blank))
        return self._select(self.target_ids(tokens), parents, scores, k)

    def _second_level(self, branch: torch.Tensor, sees: torch.Tensor, prefixes: list[tuple[int, ...]],
                      masses: list[float], weighted: dict[tuple[int, ...], float]):
        """Feed the best (x, y) pairs as a second EAGLE step: their outputs, masks, prefixes and masses. Each x
        keeps, as its own node's mass, the part of P(x) that its kept children do not carry."""
        rows, top_k = len(prefixes), self.search.top_k
        child_scores, child_ids = self._logits(branch).float().log_softmax(-1).topk(top_k, dim=-1)
        total = child_scores + torch.tensor(masses, device=self.device).log()[:, None]
        best = total.flatten().topk(min(top_k, total.numel())).indices
        parent_rows = (best // top_k).tolist()
        ys = child_ids.flatten()[best]
        pair_masses = total.flatten()[best].exp().tolist()
        for x in range(rows):
            weighted[prefixes[x]] = masses[x] - sum(m for r, m in zip(parent_rows, pair_masses) if r == x)
        n = len(parent_rows)
        new_sees = torch.zeros(n, sees.shape[1] + n, dtype=torch.bool, device=self.device)
        new_sees[:, : sees.shape[1]] = sees[parent_rows]  # what each parent saw, the parent itself included
        new_sees[:, sees.shape[1]:] = torch.eye(n, dtype=torch.bool, device=self.device)
        position = torch.full((n,), self.length + 2, device=self.device)
        out = self._run(branch[parent_rows], self.parts.to_target_ids(ys), position, new_sees)
        return out, new_sees, [(*prefixes[r], y) for r, y in zip(parent_rows, ys.tolist())], pair_masses

    def statistics(self) -> dict[str, float]:
        """The best alignment's blank rate and collapsed length, over this request's steps."""
        steps, frames = self.counts["steps"], self.counts["frames"]
        return {"ctc_blank_rate": self.counts["blank_frames"] / frames if frames else 0.0,
                "ctc_collapsed_length": self.counts["collapsed_tokens"] / steps if steps else 0.0}
