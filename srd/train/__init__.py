"""Training: one stage of KD/SFT on accelerate, resumable checkpoints."""

from srd.models.features import features, teacher_features
from srd.train.loop import StagePlan, StageSummary, evaluate_dev, train_stage
from srd.train.step import DistillModule

__all__ = [
    "DistillModule",
    "StagePlan",
    "StageSummary",
    "evaluate_dev",
    "features",
    "teacher_features",
    "train_stage",
]
