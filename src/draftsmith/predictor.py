"""SpaDec's acceptance predictor: logistic regression on the target's hidden state after its first `layer` layers
(and, where the drafter gives it, the drafter's log-probability of the node), one score per draft-tree node, used
to cut the tree down to ONE path before the rest of the target runs.

Verification with a predictor (`--prune predictor[:DIR]`, any tree drafter): the target runs its first `layer`
layers over the whole tree; the predictor gives each node's chance of acceptance given its parent's, and their
products down the tree each node's chance of being accepted; nodes below the threshold (default: the tree's mean)
are cut with their subtrees; dynamic programming picks the root-to-leaf path of highest sum of chance x depth
weight. SpaDec cuts every tree to that path (`predictor-path`); by default the path is verified only where it is
expected to yield more tokens per second than the whole tree (the target's measured costs: the path saves the
later layers over the cut nodes, and loses the cut nodes' chances). Lossless either way: the target still
verifies every token it emits, pruning only removes candidates. If no first-level node survives, the drafter's
first node is kept, so a step still verifies something.

Depth weights: ln(1 + d) up to depth 2, then sech(d - 3) (a deep node is worth a little, then less and less),
the weighting of the SpaDec authors' tree selection.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from draftsmith.adaptive import CostCurve
from draftsmith.draft import ROOT, Draft
from draftsmith.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from draftsmith.models import LoadedModel

WEIGHTS, CONFIG = "predictor.safetensors", "predictor.json"


def depth_weight(depth: int) -> float:
    return math.log(depth + 1) if depth < 3 else 1 / math.cosh(depth - 3)


def best_path(draft: Draft, scores: list[float], threshold: float | None = None) -> list[int]:
    """The node ids (parents first) of the surviving root-to-leaf path of highest sum of score x depth weight.
    `threshold` None: the mean of the scores."""
    if not len(draft):
        return []
    threshold = sum(scores) / len(scores) if threshold is None else threshold
    depths, children = draft.depths(), draft.children()
    value: dict[int, float] = {}
    best_child: dict[int, int | None] = {}
    for node in reversed(range(len(draft))):  # children come after their parents: post-order by reverse id
        if scores[node] < threshold:
            continue
        kids = [c for c in children.get(node, []) if c in value]
        best_child[node] = max(kids, key=value.__getitem__, default=None)
        value[node] = scores[node] * depth_weight(depths[node]) + (value[best_child[node]] if kids else 0.0)
    first = [c for c in children.get(ROOT, []) if c in value]
    if not first:
        return [children[ROOT][0]]  # nothing survives: the drafter's own first choice, so the step verifies one
    path, node = [], max(first, key=value.__getitem__)
    while node is not None:
        path.append(node)
        node = best_child[node]
    return path


@dataclass
class PredictorConfig:
    hidden_size: int
    layer: int  # the predictor reads the hidden state after this many layers (the input of layer `layer`)
    threshold: float | None = None  # None: each tree's mean score
    confidence: bool = False  # the drafter's log-probability of each node is an input too
    # the mean over the training nodes of the hidden state's part of the logit (bias included): with the
    # confidence, a tree's worth judged before the first layers run (PathPruner.worth_scoring)
    hidden_logit: float | None = None
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ConfigError(f"the predictor's layer must be at least 1, got {self.layer}")


class AcceptancePredictor(nn.Module):
    """Logistic regression on a node's hidden state; with `config.confidence`, the drafter's log-probability of
    the node given its parent is one more input."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.hidden_size, 1)
        if config.confidence:
            self.confidence_weight = nn.Parameter(torch.zeros(1))

    def forward(self, hidden: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [n] of acceptance given the parent's, for hidden states [n, hidden] (and confidences [n])."""
        logits = self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)
        if self.config.confidence:
            if confidence is None:
                raise ConfigError("this predictor weighs the drafter's confidence, and the drafter gives none: "
                                  "train one with `draftsmith train predictor --no-confidence` for this drafter")
            logits = logits + self.confidence_weight * confidence.to(logits.dtype)
        return logits


def pruned_costs(costs: CostCurve, share: float, longest_path: int = 8) -> CostCurve:
    """What verifying n tokens costs when a pruner runs only `share` of the layers on all of them and the rest on
    one path (at most `longest_path` nodes): what a tree drafter should size its trees by."""
    sizes = sorted(set(costs.sizes) | {longest_path + 1})  # the kink where pruning starts to save
    return CostCurve(sizes, [share * costs(n) + (1 - share) * costs(min(n, longest_path + 1)) for n in sizes])


def reach_probabilities(draft: Draft, accept: list[float]) -> list[float]:
    """Each node's chance of being accepted, from each node's chance of acceptance given its parent's."""
    reach: list[float] = []
    for node, parent in enumerate(draft.parent_ids()):
        reach.append(accept[node] * (reach[parent] if parent != ROOT else 1.0))
    return reach


class PathPruner:
    """The runner's pruning step: scores a tree's nodes at `layer` and keeps one path.

    The predictor gives each node's acceptance given its parent's; the DP runs on each node's chance of being
    accepted (their product from the root: what SpaDec's predictor, trained on every node, estimates). With the
    target's measured `costs` (set by the engine), a step keeps its whole tree when that is expected to yield
    more tokens per second: in greedy decoding siblings exclude each other, so the expected accepted length of a
    node set is the sum of its nodes' chances, and the path's saving is the later layers over the cut nodes."""

    predictor: AcceptancePredictor | None = None  # None: a pruner that decides otherwise (a recorder, an oracle)

    def __init__(self, predictor: AcceptancePredictor, always: bool = False):
        self.predictor, self.layer = predictor, predictor.config.layer
        self.threshold, self.always = predictor.config.threshold, always  # always: SpaDec's rule, every tree cut
        self.costs: CostCurve | None = None  # the target's forward costs (set by the engine unless `always`)
        self.share = 0.0  # the part of the target's layers that runs before pruning
        self.reset_statistics()

    def worth_scoring(self, draft: Draft) -> bool:
        """Before the first layers run: could cutting this tree pay? Judged by the same rule, from the drafter's
        confidence and the hidden state's mean part of the logit over the training nodes. Where it could not, the
        runner verifies the tree whole in one forward: splitting the forward for a tree that is kept costs time for
        nothing. (A fixed mean, not one learnt while decoding: a request's steps never depend on earlier ones.)"""
        if self.always or self.costs is None or draft.confidence is None:
            return True
        hidden_logit = self.predictor.config.hidden_logit
        if hidden_logit is None:
            return True
        weight = self.predictor.confidence_weight.item()
        if self._best_path(draft, [1 / (1 + math.exp(-(hidden_logit + weight * c))) for c in draft.confidence])[1]:
            return True
        self.kept_whole, self.screened, self.proposed_nodes = (self.kept_whole + 1, self.screened + 1,
                                                               self.proposed_nodes + len(draft))
        return False

    @torch.inference_mode()
    def select(self, draft: Draft, hidden: torch.Tensor) -> list[int] | None:
        confidence = None if draft.confidence is None else torch.tensor(draft.confidence, device=hidden.device)
        path, pays = self._best_path(draft, torch.sigmoid(self.predictor(hidden, confidence).float()).tolist())
        self.proposed_nodes += len(draft)
        if not pays:
            self.kept_whole += 1
            return None
        self.pruned += 1
        return path

    def _best_path(self, draft: Draft, accept: list[float]) -> tuple[list[int], bool]:
        """The DP's path from each node's acceptance given its parent's, and whether cutting to it pays (always,
        under SpaDec's rule or without costs)."""
        reach = reach_probabilities(draft, accept)
        path = best_path(draft, reach, self.threshold)
        if self.always or self.costs is None:
            return path, True
        whole = self.costs(len(reach) + 1)
        cut = self.share * whole + (1 - self.share) * self.costs(len(path) + 1)
        return path, (1 + sum(reach[node] for node in path)) / cut >= (1 + sum(reach)) / whole

    @property
    def weighs_confidence(self) -> bool:
        """Whether the predictor reads the drafter's confidence per node (a drafter must then give it)."""
        return self.predictor is not None and self.predictor.config.confidence

    def start_request(self, costs: Callable[[], CostCurve], layers: int) -> None:
        """Before a request: the target's measured costs (read once, unless every tree is cut anyway) and the
        share of its `layers` that runs before the cut; statistics restart."""
        if not self.always and self.costs is None:
            self.costs, self.share = costs(), self.layer / layers
        self.reset_statistics()

    def tree_costs(self, costs: CostCurve, layers: int) -> CostCurve:
        """What a tree drafter should size its trees by: where every tree is cut, pruned nodes cost only the
        first layers."""
        return pruned_costs(costs, self.layer / layers) if self.always else costs

    def forget_costs(self) -> None:
        """The target's costs drifted: the next request reads them again."""
        self.costs = None

    def observe(self, draft: Draft, path: list[int]) -> None:
        """Told the accepted path of each verified draft (used by a recording pruner)."""

    def reset_statistics(self) -> None:
        self.kept_whole = self.pruned = self.screened = self.proposed_nodes = 0  # trees since the last reset

    def statistics(self) -> dict[str, float]:
        """For reports: the shares of trees cut to a path and kept whole without a split forward, and the nodes
        the drafter proposed per tree."""
        trees = self.pruned + self.kept_whole
        return {"pruned_trees": self.pruned / trees, "unsplit_trees": self.screened / trees,
                "proposed_nodes": self.proposed_nodes / trees} if trees else {}


class NodeRecorder(PathPruner):
    """Keeps every node and records, per node, its hidden state at `layer`, the drafter's confidence (0 where it
    gives none), whether its parent was accepted (a node whose parent was rejected was never put to the test)
    and whether it was accepted: the training data of `draftsmith train predictor`."""

    def __init__(self, layer: int):
        self.layer = layer
        self.features, self.confidences, self.reached, self.labels = [], [], [], []
        self._pending: torch.Tensor | None = None

    def start_request(self, costs: Callable[[], CostCurve], layers: int) -> None:
        pass  # every tree is recorded whole, whatever it costs

    def tree_costs(self, costs: CostCurve, layers: int) -> CostCurve:
        return costs

    def forget_costs(self) -> None:
        pass

    def statistics(self) -> dict[str, float]:
        return {}

    def worth_scoring(self, draft: Draft) -> bool:
        return True  # every tree is recorded

    def select(self, draft: Draft, hidden: torch.Tensor) -> list[int] | None:
        self._pending = hidden.float().cpu()
        return None

    def observe(self, draft: Draft, path: list[int]) -> None:
        if self._pending is None or len(self._pending) != len(draft):
            return
        labels = torch.zeros(len(draft))
        labels[path] = 1.0
        accepted = {ROOT, *path}
        self.features.append(self._pending)
        self.confidences.append(torch.tensor(draft.confidence or [0.0] * len(draft)))
        self.reached.append(torch.tensor([parent in accepted for parent in draft.parent_ids()]))
        self.labels.append(labels)
        self._pending = None


def save_predictor(predictor: AcceptancePredictor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in predictor.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(asdict(predictor.config), indent=1))


def build_pruner(spec: str | None, target: LoadedModel) -> PathPruner | None:
    """`none` / None; `predictor` (the one shipped for an embedded target) or `predictor:DIR`: prune where the
    path is expected to pay; `predictor-path[:DIR]`: always cut to the path (SpaDec's rule)."""
    if spec in (None, "", "none"):
        return None
    kind, _, path = spec.partition(":")
    if kind not in ("predictor", "predictor-path"):
        raise ConfigError(f"unknown pruning '{spec}': use none, predictor (the shipped one) or predictor:DIR "
                          "(from `draftsmith train predictor`), or predictor-path[:DIR] to always cut to one path")
    if not path:
        from draftsmith.artifacts import shipped_file

        path = str(shipped_file(target, "predictor", CONFIG, "train predictor").parent)
    return load_pruner(Path(path), target.engine_model, always=kind == "predictor-path")


def load_pruner(folder: Path, target: PreTrainedModel, always: bool = False) -> PathPruner:
    """The pruner of the predictor trained in `folder` for this target (`always`: cut every tree to a path)."""
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise ConfigError(f"no predictor in {folder} (expected {CONFIG} and {WEIGHTS}): train one with "
                          f"`draftsmith train predictor --target ... --out {folder}`")
    config = PredictorConfig(**json.loads((folder / CONFIG).read_text()))
    hidden, layers = target.config.hidden_size, target.config.num_hidden_layers
    if config.hidden_size != hidden or config.layer >= layers:
        raise ConfigError(f"the predictor in {folder} reads layer {config.layer} of hidden size {config.hidden_size}; "
                          f"this target has {layers} layers of {hidden}")
    predictor = AcceptancePredictor(config)
    predictor.load_state_dict(load_file(str(folder / WEIGHTS)))
    return PathPruner(predictor.to(target.device).eval(), always=always)
