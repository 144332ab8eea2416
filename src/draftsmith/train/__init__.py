"""Training: one generic loop (trainer) and the recipes built on it (distill)."""

from draftsmith.train.distill import DistillConfig, StudentConfig, build_student, distill, distill_loss
from draftsmith.train.trainer import Trainer, TrainConfig, TrainResult

__all__ = ["DistillConfig", "StudentConfig", "TrainConfig", "TrainResult", "Trainer", "build_student", "distill",
           "distill_loss"]
