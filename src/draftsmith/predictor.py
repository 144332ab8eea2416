"""SpaDec's acceptance predictor: logistic regression on the target's hidden state after its first `layer` layers,
one score per draft-tree node, used to cut the tree down to ONE path before the rest of the target runs.

Verification with a predictor (`--prune predictor:DIR`, any tree drafter): the target runs its first `layer`
layers over the whole tree; the predictor scores every node; nodes below the threshold (default: the mean score
of the tree's nodes) are cut with their subtrees; dynamic programming picks the root-to-leaf path of highest
sum of score x depth weight; the remaining layers run on that path only. Lossless: the target still verifies
every token it emits, pruning only removes candidates. If no first-level node survives, the drafter's first
node is kept, so a step still verifies something.

Depth weights: ln(1 + d) up to depth 2, then sech(d - 3) (a deep node is worth a little, then less and less),
the weighting of the SpaDec authors' tree selection.
"""

from __future__ import annotations

import json
import math
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
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise ConfigError(f"the predictor's layer must be at least 1, got {self.layer}")


class AcceptancePredictor(nn.Module):
    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [n] of acceptance for hidden states [n, hidden]."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def pruned_costs(costs: CostCurve, share: float, longest_path: int = 8) -> CostCurve:
    """What verifying n tokens costs when a pruner runs only `share` of the layers on all of them and the rest on
    one path (at most `longest_path` nodes): what a tree drafter should size its trees by."""
    sizes = sorted(set(costs.sizes) | {longest_path + 1})  # the kink where pruning starts to save
    return CostCurve(sizes, [share * costs(n) + (1 - share) * costs(min(n, longest_path + 1)) for n in sizes])


class PathPruner:
    """The runner's pruning step: scores a tree's nodes at `layer` and keeps one path."""

    def __init__(self, predictor: AcceptancePredictor):
        self.predictor, self.layer = predictor, predictor.config.layer
        self.threshold = predictor.config.threshold

    @torch.inference_mode()
    def select(self, draft: Draft, hidden: torch.Tensor) -> list[int] | None:
        scores = torch.sigmoid(self.predictor(hidden).float()).tolist()
        return best_path(draft, scores, self.threshold)

    def observe(self, draft: Draft, path: list[int]) -> None:
        """Told the accepted path of each verified draft (used by a recording pruner)."""


class NodeRecorder(PathPruner):
    """Keeps every node and records (hidden state at `layer`, accepted or not) per node: the training data of
    `draftsmith train predictor`."""

    def __init__(self, layer: int):
        self.layer, self.features, self.labels = layer, [], []
        self._pending: torch.Tensor | None = None

    def select(self, draft: Draft, hidden: torch.Tensor) -> list[int] | None:
        self._pending = hidden.float().cpu()
        return None

    def observe(self, draft: Draft, path: list[int]) -> None:
        if self._pending is None or len(self._pending) != len(draft):
            return
        labels = torch.zeros(len(draft))
        labels[path] = 1.0
        self.features.append(self._pending)
        self.labels.append(labels)
        self._pending = None


def save_predictor(predictor: AcceptancePredictor, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in predictor.state_dict().items()}, str(folder / WEIGHTS))
    (folder / CONFIG).write_text(json.dumps(asdict(predictor.config), indent=1))


def build_pruner(spec: str | None, target: LoadedModel) -> PathPruner | None:
    """`none` / None, `predictor` (the one shipped for an embedded target) or `predictor:DIR`."""
    if spec in (None, "", "none"):
        return None
    kind, _, path = spec.partition(":")
    if kind != "predictor":
        raise ConfigError(f"unknown pruning '{spec}': use none, predictor (the shipped one) or predictor:DIR "
                          "(from `draftsmith train predictor`)")
    if not path:
        from draftsmith.drafters import shipped_file

        path = str(shipped_file(target, "predictor", CONFIG, "train predictor").parent)
    return load_pruner(Path(path), target.model)


def load_pruner(folder: Path, target: PreTrainedModel) -> PathPruner:
    """The pruner of the predictor trained in `folder` for this target."""
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
    return PathPruner(predictor.to(target.device).eval())
