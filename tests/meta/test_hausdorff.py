"""The Modified Hausdorff Distance baseline: the formula, the authors' reading of the images and scoring, and (when
the real runs are in $METADYN_DATA/omniglot) the authors' per-run error."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from metadyn.errors import InputError
from metadyn.meta.hausdorff import (
    LAKE_MHD_ERRORS,
    ink_points,
    mhd_costs,
    mhd_flops,
    mhd_predict,
    mhd_runs,
    modified_hausdorff,
    run_error,
)

REAL = Path(os.environ.get("METADYN_DATA", "/nonexistent")) / "omniglot"


def test_ink_points_are_row_col_coordinates_minus_their_mean():
    ink = np.zeros((4, 5), bool)
    ink[1, 1] = ink[3, 4] = True
    assert torch.equal(ink_points(ink), torch.tensor([[-1.0, -1.5], [1.0, 1.5]], dtype=torch.float64))
    with pytest.raises(InputError, match="no ink"):
        ink_points(np.zeros((3, 3), bool))


def test_modified_hausdorff_is_the_larger_mean_of_nearest_distances():
    a = torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
    # a -> b: 0, 0 (mean 0); b -> a: 0, 0, 3 (mean 1)
    assert modified_hausdorff(a, b) == pytest.approx(1.0) and modified_hausdorff(b, a) == pytest.approx(1.0)
    assert modified_hausdorff(a, a) == 0.0


def test_matches_a_plain_numpy_reading_of_the_formula():
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.normal(size=(rng.integers(3, 40), 2)), rng.normal(size=(rng.integers(3, 40), 2))
        d = np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
        expected = max(d.min(1).mean(), d.min(0).mean())
        assert modified_hausdorff(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(expected, rel=1e-12)


def _shape(points, size=9, shift=(0, 0)):
    img = np.zeros((size, size), bool)
    for r, c in points:
        img[r + shift[0], c + shift[1]] = True
    return img


def test_predictions_ignore_position_and_pick_the_first_of_equal_costs():
    bar, corner, dot = [(2, 2), (3, 2), (4, 2), (5, 2)], [(2, 2), (2, 3), (2, 4), (3, 2)], [(4, 4)]
    train = [_shape(bar), _shape(corner), _shape(bar)]  # a duplicate of class 0 as class 2
    test = [_shape(corner, shift=(3, 2)), _shape(bar, shift=(1, 4)), _shape(dot)]
    costs = mhd_costs(train, test)
    assert costs[0, 1] == 0.0 and costs[1, 0] == 0.0 and costs[1, 0] == costs[1, 2]
    assert mhd_predict(train, test)[:2].tolist() == [1, 0]  # the tie between 0 and 2 goes to 0
    assert run_error(torch.tensor([1, 0, 2]), torch.tensor([1, 0, 0])) == pytest.approx(100 / 3)
    assert mhd_flops(train, test) == 5.0 * 12 * (4 + 4 + 1) / 3


def test_authors_reference_figures_average_to_their_38_8_percent():
    assert len(LAKE_MHD_ERRORS) == 20 and round(np.mean(list(LAKE_MHD_ERRORS.values())), 1) == 38.8


@pytest.mark.skipif(not REAL.is_dir(), reason="Omniglot's files are not in $METADYN_DATA/omniglot")
def test_real_run01_gives_the_authors_error():
    from metadyn.data.fewshot_folders import omniglot_runs

    (run,) = omniglot_runs(str(REAL), runs=[1])
    assert run_error(mhd_predict(run.train_ink, run.test_ink), run.test_y) == LAKE_MHD_ERRORS[1]
    m = mhd_runs([run])
    assert m["error"] == [LAKE_MHD_ERRORS[1]] and m["authors_error"] == [LAKE_MHD_ERRORS[1]]
    assert m["max_abs_difference"] == 0.0 and m["mflops"] == mhd_flops(run.train_ink, run.test_ink) / 1e6
