"""Training: one stage of KD/SFT on accelerate, resumable checkpoints."""

from srd.train.loop import StagePlan, evaluate_dev, make_accelerator, train_stage
from srd.train.step import DistillModule, features, teacher_features

__all__ = [
    "DistillModule",
    "StagePlan",
    "evaluate_dev",
    "features",
    "make_accelerator",
    "teacher_features",
    "train_stage",
]
