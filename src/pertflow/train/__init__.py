"""The training engine shared by every model family."""

from pertflow.train.config import TrainConfig
from pertflow.train.engine import Batch, BatchSource, Trainer, TrainingDiverged, TrainResult

__all__ = ["Batch", "BatchSource", "TrainConfig", "TrainResult", "Trainer", "TrainingDiverged"]
