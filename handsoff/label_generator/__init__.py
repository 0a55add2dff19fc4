"""The label generator (HandsOff's core): an MLP ensemble from generator hypercolumns to labels with uncertainty.

The factorized hypercolumn (``features``); the stacked ensemble and prediction API (``model``); fitting on inverted
labeled images (``train``). What each task predicts and how is in ``handsoff.tasks``.
"""

from handsoff.label_generator.model import LabelGenerator, MLPEnsemble, load_label_generator, save_label_generator
from handsoff.label_generator.train import fit_from_folder, fit_label_generator, label_generator_complete
from handsoff.tasks import Depth, Keypoints, Segmentation, parse_task_names

__all__ = ["Depth", "Keypoints", "LabelGenerator", "MLPEnsemble", "Segmentation", "fit_from_folder",
           "fit_label_generator", "label_generator_complete", "load_label_generator", "parse_task_names",
           "save_label_generator"]
