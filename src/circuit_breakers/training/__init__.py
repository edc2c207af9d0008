"""Representation Rerouting training: the loop (trainer.py) and its parts, each with one job."""

from .trainer import RRTrainer, TrainResult, batch_indices, train

__all__ = ["RRTrainer", "TrainResult", "batch_indices", "train"]
