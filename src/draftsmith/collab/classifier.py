"""The classifier between the two models: P(the small model's token is right | the two disagree).

Input: both hidden states and the 25 scalars of features.py. Each hidden state is normalised (layer norm without
gain), scaled by its token's probability share, and projected to 16 by its own layer; with the standardised
scalars that is 57 features, then an MLP 57 -> 20 -> 16 -> 1 with batch norm, ReLU and dropout. BCE; classes
balanced by SMOTE (imbalanced-learn) on the training rows; early stopping on a validation split made by case, so
no case has positions on both sides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from draftsmith.collab.collect import Collected
from draftsmith.collab.features import HIDDEN_PROJECTION, SCALARS, hidden_weights
from draftsmith.errors import ConfigError

CLASSIFIER_FILE = "classifier.safetensors"


@dataclass(frozen=True)
class ClassifierConfig:
    dropout: float = 0.5
    lr: float = 5e-4
    weight_decay: float = 1e-5
    batch_size: int = 64
    max_epochs: int = 60
    patience: int = 8  # epochs without a better validation loss before stopping
    validation_share: float = 0.2  # of the cases
    balance: str = "smote"  # "smote" | "weights" | "none"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.balance not in ("smote", "weights", "none"):
            raise ConfigError(f"balance must be smote, weights or none, got {self.balance!r}")
        if not 0 < self.validation_share < 1:
            raise ConfigError(f"validation_share must be in (0, 1), got {self.validation_share}")


class CollabClassifier(nn.Module):
    def __init__(self, large_hidden: int, small_hidden: int, dropout: float = 0.5):
        super().__init__()
        self.large_hidden, self.small_hidden = large_hidden, small_hidden
        self.project_large = nn.Linear(large_hidden, HIDDEN_PROJECTION)
        self.project_small = nn.Linear(small_hidden, HIDDEN_PROJECTION)
        self.register_buffer("scalar_mean", torch.zeros(len(SCALARS)))
        self.register_buffer("scalar_std", torch.ones(len(SCALARS)))
        width = 2 * HIDDEN_PROJECTION + len(SCALARS)
        self.mlp = nn.Sequential(
            nn.Linear(width, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(16, 1),
        )

    def forward(self, large_hidden: torch.Tensor, small_hidden: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """Logits [n] of P(small right)."""
        w_large, w_small = hidden_weights(scalars)
        norm = nn.functional.layer_norm
        features = torch.cat([
            self.project_large(w_large * norm(large_hidden, (self.large_hidden,))),
            self.project_small(w_small * norm(small_hidden, (self.small_hidden,))),
            (scalars - self.scalar_mean) / self.scalar_std,
        ], -1)
        return self.mlp(features).squeeze(-1)

    @torch.no_grad()
    def probability(self, large_hidden: torch.Tensor, small_hidden: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        self.eval()
        return self(large_hidden, small_hidden, scalars).sigmoid()


def split_by_case(cases: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (train, validation): a seeded `share` of the cases goes to validation whole."""
    unique = cases.unique()
    order = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))]
    held = set(order[: max(1, round(share * len(unique)))].tolist())
    is_held = torch.tensor([int(c) in held for c in cases.tolist()])
    return (~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)


def balanced(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """SMOTE: synthetic minority rows until both classes are as many."""
    from imblearn.over_sampling import SMOTE

    minority = int(min((y == 0).sum(), (y == 1).sum()))
    if minority < 2:
        raise ConfigError(f"one class has {minority} training rows: SMOTE needs at least 2 (collect more cases)")
    return SMOTE(k_neighbors=min(5, minority - 1), random_state=seed).fit_resample(x, y)


def evaluate(model: CollabClassifier, data: Collected, rows: torch.Tensor) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    y = data.labels[rows]
    p = model.probability(data.large_hidden[rows], data.small_hidden[rows], data.scalars[rows])
    loss = nn.functional.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), y)
    predicted = p > 0.5
    both = 0 < y.sum() < len(y)
    return {"loss": float(loss), "accuracy": float((predicted == y.bool()).float().mean()),
            "auc": float(roc_auc_score(y.numpy(), p.numpy())) if both else float("nan"),
            "precision": float(y[predicted].mean()) if predicted.any() else float("nan"),
            "predicted_small": float(predicted.float().mean()), "small_right": float(y.mean()), "rows": len(rows)}


def train_classifier(data: Collected, config: ClassifierConfig = ClassifierConfig()) -> tuple[CollabClassifier, dict]:
    torch.manual_seed(config.seed)
    train_rows, val_rows = split_by_case(data.cases, config.validation_share, config.seed)
    h_l, h_s = data.large_hidden.shape[1], data.small_hidden.shape[1]
    x = torch.cat([data.large_hidden, data.small_hidden, data.scalars], 1)[train_rows].numpy()
    y = data.labels[train_rows].numpy()
    if config.balance == "smote":
        x, y = balanced(x, y, config.seed)
    x, y = torch.from_numpy(np.asarray(x, dtype=np.float32)), torch.from_numpy(np.asarray(y, dtype=np.float32))
    model = CollabClassifier(h_l, h_s, config.dropout)
    scalars = x[:, h_l + h_s :]
    model.scalar_mean.copy_(scalars.mean(0))
    model.scalar_std.copy_(scalars.std(0, unbiased=False).clamp(min=1e-6))
    positive_weight = float((y == 0).sum() / max(1, (y == 1).sum())) if config.balance == "weights" else 1.0
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best, best_state, waited, history = float("inf"), None, 0, []
    generator = torch.Generator().manual_seed(config.seed)
    for epoch in range(config.max_epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(order) - 1, config.batch_size):  # batch norm needs two rows
            batch = order[start : start + config.batch_size]
            if len(batch) < 2:
                continue
            logits = model(x[batch, :h_l], x[batch, h_l : h_l + h_s], x[batch, h_l + h_s :])
            weight = torch.where(y[batch] > 0, positive_weight, 1.0)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, y[batch], weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        val = evaluate(model, data, val_rows)
        history.append({"epoch": epoch + 1, **val})
        if val["loss"] < best - 1e-4:
            best, waited = val["loss"], 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= config.patience:
                break
    model.load_state_dict(best_state)
    summary = {"train_rows": len(train_rows), "balanced_rows": len(y), "validation": evaluate(model, data, val_rows),
               "train": evaluate(model, data, train_rows), "epochs": len(history),
               "best_epoch": min(history, key=lambda h: h["loss"])["epoch"], "history": history,
               "config": asdict(config)}
    return model.eval(), summary


def save_classifier(model: CollabClassifier, folder: Path, summary: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / CLASSIFIER_FILE)
    meta = {"large_hidden": model.large_hidden, "small_hidden": model.small_hidden,
            "dropout": summary["config"]["dropout"], **summary}
    (folder / "classifier.json").write_text(json.dumps(meta, indent=2))


def load_classifier(folder: Path) -> CollabClassifier:
    path, meta_path = folder / CLASSIFIER_FILE, folder / "classifier.json"
    if not path.is_file() or not meta_path.is_file():
        raise ConfigError(f"no classifier in {folder} ({CLASSIFIER_FILE} + classifier.json): run "
                          "`draftsmith collab train-classifier` first")
    meta = json.loads(meta_path.read_text())
    model = CollabClassifier(meta["large_hidden"], meta["small_hidden"], meta["dropout"])
    model.load_state_dict(load_file(path))
    return model.eval()
