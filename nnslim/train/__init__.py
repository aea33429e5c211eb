"""Training: the Trainer and the compress-until-target loop."""

from .trainer import Distillation, Regularization, Trainer, TrainOptions, TrainResult

__all__ = ["Distillation", "Regularization", "TrainOptions", "TrainResult", "Trainer"]
