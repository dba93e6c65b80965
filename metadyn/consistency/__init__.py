"""Idea 3: self-supervised consistency between early exits and the final exit."""

from metadyn.consistency.losses import ExitConsistency, byol_distance, consistency_loss

__all__ = ["ExitConsistency", "byol_distance", "consistency_loss"]
