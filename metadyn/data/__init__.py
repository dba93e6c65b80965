"""Datasets: digits (bundled), glyphs (procedural), local folders (image trees, CIFAR, MNIST-family IDX files),
N-way K-shot episodes.

Importing this package registers every loader in :data:`metadyn.registry.DATASETS`.
"""

from metadyn.data import digits, fashion_mnist, folders, glyphs  # noqa: F401  (register the loaders)
from metadyn.data.base import (
    ClassificationData,
    Split,
    check_finite,
    keep_labels,
    load_classification,
    split_indices,
)
from metadyn.data.episodes import ClassPool, Episode, EpisodeSampler
from metadyn.data.glyphs import GLYPH_SPLITS, glyph_class_ids, render_glyphs
from metadyn.data.local import MissingDataError, data_root

__all__ = [
    "GLYPH_SPLITS",
    "ClassPool",
    "ClassificationData",
    "Episode",
    "EpisodeSampler",
    "MissingDataError",
    "Split",
    "check_finite",
    "data_root",
    "glyph_class_ids",
    "keep_labels",
    "load_classification",
    "render_glyphs",
    "split_indices",
]
