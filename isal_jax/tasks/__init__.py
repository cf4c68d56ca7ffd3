"""Task adapters for ISAL: turn a model + its data into what the influence engine needs
(per-sample loss, pseudo labels, predictions/features). Classification lives here; a
detection adapter can sit beside it with the same shape of API."""
from isal_jax.tasks.classification import (ClassificationTask, save_classifier_checkpoint,
                                           train_tiny_classifier)

__all__ = ["ClassificationTask", "train_tiny_classifier", "save_classifier_checkpoint"]
