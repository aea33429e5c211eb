"""Training: the Trainer and the compress-until-target loop."""

from .loop import CompressionResult, compress, schedule
from .trainer import (
    Distillation,
    Regularization,
    Trainer,
    TrainOptions,
    TrainResult,
    TrainState,
)

__all__ = [
    "CompressionResult",
    "Distillation",
    "Regularization",
    "TrainOptions",
    "TrainResult",
    "TrainState",
    "Trainer",
    "compress",
    "schedule",
]
