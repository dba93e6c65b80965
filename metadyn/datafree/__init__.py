"""Idea 1: convert a trained static network into an early-exit one without its training data.

Data impressions (Zero-Shot Knowledge Distillation, Nayak et al., ICML 2019) are synthesised from the
teacher alone (:mod:`metadyn.datafree.impressions`); exits attached to the frozen teacher are trained on
them by distillation from its final output (:mod:`metadyn.datafree.convert`). :func:`convert` does it all in one
call for a user's own network (:func:`build_teacher`), with a feature prior fit for it (:mod:`metadyn.datafree.priors`).
"""

from metadyn.datafree.convert import (
    ConversionReport,
    convert,
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
from metadyn.datafree.priors import PRIORS, ImagePrior, PriorSettings
from metadyn.datafree.teacher import (
    InputSpace,
    StaticCNN,
    adapt_input_channels,
    build_teacher,
    static_cnn,
    tiny_static_cnn,
)

__all__ = ["DEFAULT_TAU", "PRIORS", "BatchNormPrior", "ConversionReport", "ImagePrior", "ImpressionBatch",
           "Impressions", "InputSpace", "PriorSettings", "StaticCNN", "SynthesisSettings", "adapt_input_channels",
           "build_teacher", "class_similarity", "convert", "convert_to_early_exit", "dirichlet_concentration",
           "distill_student",
           "exit_distillation_loss", "final_layer_weight", "sample_targets", "static_cnn", "synthesize_impressions",
           "target_kl", "teacher_distillation_loss", "teacher_logits", "tiny_static_cnn", "total_variation",
           "train_exits"]
