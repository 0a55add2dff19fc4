"""The label generator (HandsOff's core): an MLP ensemble from generator hypercolumns to labels with uncertainty.

Tasks: segmentation, keypoints, depth (``tasks``); the factorized hypercolumn (``features``); the stacked
ensemble and prediction API (``model``); fitting on inverted labeled images (``train``).
"""

from handsoff.label_generator.model import LabelGenerator, MLPEnsemble, load_label_generator, save_label_generator
from handsoff.label_generator.tasks import Depth, Keypoints, Segmentation, parse_task_names
from handsoff.label_generator.train import build_tasks, fit_from_folder, fit_label_generator

__all__ = ["Depth", "Keypoints", "LabelGenerator", "MLPEnsemble", "Segmentation", "build_tasks",
           "fit_from_folder", "fit_label_generator", "load_label_generator", "parse_task_names", "save_label_generator"]
