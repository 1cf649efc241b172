"""Downstream evaluation of a (pre)trained Medformer encoder with MedMNIST's official metrics.

``metrics``   head losses and scores, official AUC/ACC, label subsets
``features``  linear-probe features and head scores of a whole split
``probe``     linear probe of the frozen encoder (C chosen on val), random-init reference
``finetune``  end-to-end fine-tuning (epoch chosen on val, test scored once)
"""

from medformer.eval.features import extract_features, predict_scores
from medformer.eval.finetune import RECIPE, fine_tune, recipe_epochs, validation_epochs
from medformer.eval.metrics import METHODS, TASKS, head_loss, head_scores, label_subset, official_metrics
from medformer.eval.probe import DEFAULT_CS, PROBE_READOUT, linear_probe, random_init_reference

__all__ = ["DEFAULT_CS", "METHODS", "PROBE_READOUT", "RECIPE", "TASKS", "extract_features", "fine_tune", "head_loss",
           "head_scores", "label_subset", "linear_probe", "official_metrics", "predict_scores",
           "random_init_reference", "recipe_epochs", "validation_epochs"]
