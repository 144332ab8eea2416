"""Train SpaDec's acceptance predictor (`draftsmith train predictor`) from logged verification outcomes.

Collection: the target decodes held-out-free prompts (documented functions of the corpus, never a benchmark's)
with the tree drafter the predictor will prune; at every step the runner's `NodeRecorder` keeps the whole tree,
takes each node's hidden state after the predictor's layer from the verification forward itself (no extra
forward) and labels it by the verdict: 1 for the nodes on the accepted path. Only nodes whose parent was
accepted are kept: a node below a rejected one was never put to the test, and the predictor estimates acceptance
given the parent's (the pruner multiplies those down the tree). Training: logistic regression (Linear(hidden, 1),
plus the drafter's log-probability of the node where `confidence`; BCE) on the project's trainer; evaluated on
the nodes of held-out prompts (whole prompts are held out, so no step is in both splits).
"""

from __future__ import annotations

import random
import shlex
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from draftsmith.errors import ConfigError
from draftsmith.predictor import AcceptancePredictor, NodeRecorder, PredictorConfig, save_predictor
from draftsmith.progress import Bar
from draftsmith.train.trainer import Batch, TrainConfig, Trainer


@dataclass
class PredictorTrainConfig:
    layer: int = 0  # hidden state after this many layers; 0 = a fifth of the target's depth (SpaDec: 6 of 32)
    prompts: int = 48  # decoded to collect nodes
    heldout_prompts: int = 8
    new_tokens: int = 96
    instruct_share: float = 0.5  # prompts sent as a chat request to complete the function (the rest: bare code)
    confidence: bool = True  # the drafter's log-probability of each node is an input (the drafter must give it)
    corpus: str | None = None  # default: the Python standard library
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompts < 1 or self.heldout_prompts < 1:
            raise ConfigError("predictor training needs at least one training and one held-out prompt")


class NodeData(Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor, confidences: torch.Tensor | None = None):
        if not len(labels):
            raise ConfigError("no draft-tree nodes were collected: is the drafter a tree drafter?")
        self.features, self.labels = features, labels
        self.confidences = torch.zeros(len(labels)) if confidences is None else confidences

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        return {"hidden": self.features[i], "confidence": self.confidences[i], "label": self.labels[i]}


def collect_nodes(engine, prompts: list[list[int]], layer: int, new_tokens: int, progress: bool = True
                  ) -> NodeData:
    """Decode each prompt with the engine's tree drafter, recording every verified node (see module doc)."""
    from draftsmith.engine import GenerationConfig

    recorder = NodeRecorder(layer)
    engine.runner.pruner = recorder
    try:
        with Bar(disable=not progress, transient=True) as bar:
            task = bar.add_task("decoding to collect draft-tree nodes", total=len(prompts))
            for ids in prompts:
                engine.generate(ids, GenerationConfig(max_new_tokens=new_tokens, k=64))
                bar.advance(task)
    finally:
        engine.runner.pruner = None
    if not recorder.labels:
        return NodeData(torch.empty(0), torch.empty(0))
    reached = torch.cat(recorder.reached)  # nodes put to the test: their parent was accepted
    return NodeData(torch.cat(recorder.features)[reached], torch.cat(recorder.labels)[reached],
                    torch.cat(recorder.confidences)[reached])


def predictor_loss(model: AcceptancePredictor, batch: Batch) -> tuple[torch.Tensor, dict]:
    logits = model(batch["hidden"], batch["confidence"])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"])
    accuracy = ((logits > 0).float() == batch["label"]).float().mean()
    return loss, {"accuracy": accuracy}


class PredictorEval:
    """Held-out nodes: accuracy, ROC AUC, and the share of accepted nodes scoring at least the mean score (what a
    mean threshold keeps; decoding takes each tree's own mean)."""

    def __init__(self, data: NodeData):
        self.data = data

    @torch.no_grad()
    def __call__(self, model: AcceptancePredictor) -> dict[str, float]:
        from sklearn.metrics import roc_auc_score

        device = model.linear.weight.device
        scores = torch.sigmoid(model(self.data.features.to(device), self.data.confidences.to(device)).float()).cpu()
        labels = self.data.labels
        out = {"accuracy": float(((scores > 0.5).float() == labels).float().mean()),
               "accepted_share": float(labels.mean())}
        if 0 < labels.sum() < len(labels):
            out["auc"] = float(roc_auc_score(labels.numpy(), scores.numpy()))
            out["recall_at_mean"] = float((scores[labels == 1] >= scores.mean()).float().mean())
        return out


def collection_prompts(tokenizer, cfg: PredictorTrainConfig) -> tuple[list[list[int]], list[list[int]]]:
    """Training and held-out prompts: documented functions of the corpus's training split, some as chat requests."""
    from draftsmith.data.corpus import load_corpus
    from draftsmith.data.onpolicy import function_prompts, prompt_ids

    prompts = function_prompts(load_corpus(cfg.corpus, split="train"))
    rng = random.Random(cfg.seed)
    rng.shuffle(prompts)
    needed = cfg.prompts + cfg.heldout_prompts
    if len(prompts) < needed:
        raise ConfigError(f"the corpus has {len(prompts)} documented functions; {needed} prompts were asked for")
    ids = [prompt_ids(tokenizer, code, chat=rng.random() < cfg.instruct_share)[-384:] for code in prompts[:needed]]
    return ids[: cfg.prompts], ids[cfg.prompts :]


def train_predictor(engine, tokenizer, cfg: PredictorTrainConfig, train: TrainConfig,
                    progress: bool = True) -> tuple[AcceptancePredictor, dict]:
    """Collect nodes with `engine` (target + tree drafter), train the predictor, save it in train.out_dir."""
    started = time.perf_counter()
    target = engine.model
    layers = target.config.num_hidden_layers
    layer = cfg.layer or max(1, round(layers / 5))
    if not 1 <= layer < layers:
        raise ConfigError(f"--layer must be in 1..{layers - 1} for this {layers}-layer target, got {layer}")
    if cfg.confidence and (engine.drafter is None or not engine.drafter.gives_confidence):  # before minutes of decoding
        raise ConfigError(f"the {engine.drafter.name} drafter gives no confidence per node: use --no-confidence")
    train_prompts, heldout_prompts = collection_prompts(tokenizer, cfg)
    data = collect_nodes(engine, train_prompts, layer, cfg.new_tokens, progress)
    heldout = collect_nodes(engine, heldout_prompts, layer, cfg.new_tokens, progress)
    collect_seconds = time.perf_counter() - started
    trainer = Trainer(train, task=cfg)
    predictor = AcceptancePredictor(PredictorConfig(hidden_size=target.config.hidden_size, layer=layer,
                                                    confidence=cfg.confidence))
    result = trainer.fit(predictor, data, predictor_loss, PredictorEval(heldout))
    with torch.no_grad():
        predictor.config.hidden_logit = round(float(predictor.linear(data.features.to(
            predictor.linear.weight.device)).mean()), 4)
    predictor.config.training = {
        "command": shlex.join(["draftsmith", *sys.argv[1:]]), **cfg.extra, "corpus": cfg.corpus or "python stdlib",
        "prompts": cfg.prompts, "nodes": len(data), "heldout_nodes": len(heldout),
        "accepted_share": round(float(data.labels.mean()), 4), "steps": result.step, "heldout": result.eval,
        "collect_seconds": round(collect_seconds, 1), "train_seconds": round(time.perf_counter() - started, 1)}
    if trainer.is_main_process:
        save_predictor(predictor, train.out_dir)
    return predictor, predictor.config.training
