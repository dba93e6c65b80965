"""Idea 1: convert a trained static network into an early-exit one without its training data.

Data impressions (Zero-Shot Knowledge Distillation, Nayak et al., ICML 2019) are synthesised from the
teacher alone (:mod:`metadyn.datafree.impressions`); exits attached to the frozen teacher are trained on
them by distillation from its final output (:mod:`metadyn.datafree.convert`).
"""

from metadyn.datafree.convert import (
    convert_to_early_exit,
    distill_student,
    exit_distillation_loss,
    teacher_distillation_loss,
    teacher_logits,
    train_exits,
)
from metadyn.datafree.impressions import (
    DEFAULT_TAU,
    BatchNormPrior,
    ImpressionBatch,
    Impressions,
    SynthesisSettings,
    class_similarity,
    dirichlet_concentration,
    final_layer_weight,
    sample_targets,
    synthesize_impressions,
    target_kl,
    total_variation,
)
from metadyn.datafree.teacher import StaticCNN, static_cnn, tiny_static_cnn

__all__ = ["DEFAULT_TAU", "BatchNormPrior", "ImpressionBatch", "Impressions", "StaticCNN", "SynthesisSettings",
           "class_similarity", "convert_to_early_exit", "dirichlet_concentration", "distill_student",
           "exit_distillation_loss", "final_layer_weight", "sample_targets", "static_cnn", "synthesize_impressions",
           "target_kl", "teacher_distillation_loss", "teacher_logits", "tiny_static_cnn", "total_variation",
           "train_exits"]
