"""The Modified Hausdorff Distance baseline of Omniglot's one-shot classification test.

Each image becomes the set of its ink pixels' ``(row, col)`` coordinates, centred on their mean; a test image is
given the class of the training image at the smallest Modified Hausdorff Distance (Dubuisson & Jain, ICPR 1994,
distance measure d22/"MHD"):

    MHD(A, B) = max( mean_{a in A} min_{b in B} ||a - b||,  mean_{b in B} min_{a in A} ||a - b|| ).

This is Lake et al.'s baseline as their demo code computes it (``LoadImgAsPoints``, ``ModHausdorffDistance`` and
``classification_run`` of ``python/one-shot-classification/demo_classification.py`` in github.com/brendenlake/omniglot):
ink is a pixel of value 0, the images are compared at full resolution (105x105) with no other normalisation,
ties go to the first training image in sorted file order, and a run's error is the percentage of its 20 test
images given a wrong class.

References:
    Dubuisson & Jain, "A Modified Hausdorff Distance for Object Matching", ICPR 1994, pp. 566-568;
    Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic program induction",
    Science 350(6266), 2015 (the one-shot classification test, the MHD baseline: 38.8% error over 20 runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from metadyn.errors import InputError

# The authors' demo prints these per-run errors (%) for runs 1-20 (average 38.75%, "38.8 percent" in its
# comments); they are the reference metadyn's implementation is checked against, not results of metadyn.
LAKE_MHD_ERRORS = {1: 45.0, 2: 35.0, 3: 40.0, 4: 25.0, 5: 30.0, 6: 15.0, 7: 60.0, 8: 35.0, 9: 40.0, 10: 55.0,
                   11: 15.0, 12: 70.0, 13: 65.0, 14: 35.0, 15: 15.0, 16: 25.0, 17: 30.0, 18: 40.0, 19: 70.0, 20: 30.0}


def ink_points(ink: np.ndarray | Tensor) -> Tensor:
    """``(n, 2)`` float64 ``(row, col)`` coordinates of the ink pixels of a 2-D boolean mask, minus their mean."""
    mask = torch.as_tensor(np.asarray(ink)).bool()
    if mask.dim() != 2:
        raise InputError(f"an ink mask must be 2-D, got shape {tuple(mask.shape)}")
    pts = torch.nonzero(mask).double()  # row-major, as numpy's nonzero
    if len(pts) == 0:
        raise InputError("an image has no ink pixel: the Modified Hausdorff Distance is undefined")
    return pts - pts.mean(0)


def modified_hausdorff(a: Tensor, b: Tensor) -> float:
    """The Modified Hausdorff Distance between point sets ``a (n, 2)`` and ``b (m, 2)`` (exact Euclidean
    distances, no matrix-product shortcut)."""
    d = torch.cdist(a[None], b[None], compute_mode="donot_use_mm_for_euclid_dist")[0]  # (n, m)
    return float(torch.maximum(d.min(1).values.mean(), d.min(0).values.mean()))


def mhd_costs(train_ink: Sequence, test_ink: Sequence) -> Tensor:
    """``(n_test, n_train)`` matrix of Modified Hausdorff Distances between ink masks."""
    train = [ink_points(m) for m in train_ink]
    test = [ink_points(m) for m in test_ink]
    return torch.tensor([[modified_hausdorff(t, c) for c in train] for t in test], dtype=torch.float64)


def mhd_predict(train_ink: Sequence, test_ink: Sequence) -> Tensor:
    """Each test image's predicted class: the index of the nearest training image (the first one on a tie)."""
    return mhd_costs(train_ink, test_ink).argmin(1)


def mhd_flops(train_ink: Sequence, test_ink: Sequence) -> float:
    """FLOPs per test image of classifying it by MHD against every training image, counted as 5 FLOPs per pair of
    ink points (two differences, two squares, one sum; square roots and minima are not counted)."""
    n_train = sum(int(np.count_nonzero(np.asarray(m))) for m in train_ink)
    n_test = [int(np.count_nonzero(np.asarray(m))) for m in test_ink]
    return 5.0 * n_train * sum(n_test) / len(n_test)


def run_error(pred: Tensor, answers: Tensor) -> float:
    """A run's error in percent, as the authors score it: ``100 - 100 * correct / n_test``."""
    return 100.0 - 100.0 * float((pred == answers).sum()) / len(answers)


def mhd_runs(runs: Sequence) -> dict:
    """The MHD baseline on one-shot runs (:class:`~metadyn.data.fewshot_folders.OneShotRun`): ``error`` (% per
    run), ``mflops`` (per test image, mean over runs), the authors' per-run figures (``authors_error``, None for
    a run they do not list) and the largest absolute difference from them (``max_abs_difference``)."""
    error = [run_error(mhd_predict(r.train_ink, r.test_ink), r.test_y) for r in runs]
    authors = [LAKE_MHD_ERRORS.get(int(r.name[3:])) for r in runs]
    diffs = [abs(e - a) for e, a in zip(error, authors) if a is not None]
    return {"error": error, "mflops": sum(mhd_flops(r.train_ink, r.test_ink) for r in runs) / len(runs) / 1e6,
            "authors_error": authors, "max_abs_difference": max(diffs) if diffs else None}
