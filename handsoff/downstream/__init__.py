"""Downstream: the network that judges a generated dataset (DeepLabV3 with a head per task), trained on it and
evaluated on real labeled images."""

from handsoff.downstream.model import BACKBONES, DenseModel
from handsoff.downstream.train import evaluate_model, evaluate_run, load_downstream, train_downstream

__all__ = ["BACKBONES", "DenseModel", "evaluate_model", "evaluate_run", "load_downstream", "train_downstream"]
