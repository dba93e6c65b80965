import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.datasets import load_digits

from metadyn.data import check_finite, load_classification, split_indices
from metadyn.errors import InputError


def _check_partition(parts, n):
    allidx = torch.cat(list(parts.values()))
    assert len(allidx) == n
    assert torch.equal(torch.sort(allidx)[0], torch.arange(n))


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(10, 40), min_size=2, max_size=6),
    val=st.floats(0.05, 0.3),
    test=st.floats(0.05, 0.3),
    seed=st.integers(0, 2**31),
)
def test_split_indices_is_a_stratified_partition(counts, val, test, seed):
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])[torch.randperm(sum(counts))]
    parts = split_indices(y, {"val": val, "test": test}, seed)
    assert list(parts) == ["train", "val", "test"]
    _check_partition(parts, len(y))
    for k, c in enumerate(counts):
        n_val = int((y[parts["val"]] == k).sum())
        assert abs(n_val - val * c) < 2


def test_split_indices_deterministic_per_seed():
    y = np.repeat(np.arange(5), 20)
    a = split_indices(y, {"val": 0.2}, seed=3)
    b = split_indices(y, {"val": 0.2}, seed=3)
    c = split_indices(y, {"val": 0.2}, seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["val"], c["val"])


@pytest.mark.parametrize(
    "fractions, match",
    [
        ({"val": 0.0}, "'val'"),
        ({"val": 1.2}, "'val'"),
        ({"val": 0.6, "test": 0.5}, "sum to 1.1"),
        ({"train": 0.5}, "'train'"),
    ],
)
def test_split_indices_rejects_bad_fractions(fractions, match):
    with pytest.raises(InputError, match=match):
        split_indices(torch.arange(10) % 2, fractions, 0)


def test_check_finite():
    check_finite(torch.zeros(3), "ok")
    with pytest.raises(InputError, match="dataset 'bad' contains NaN"):
        check_finite(torch.tensor([0.0, float("nan")]), "bad")
    with pytest.raises(InputError, match="infinite"):
        check_finite(np.array([np.inf]), "bad")


def test_digits_loads_with_disjoint_stratified_splits():
    data = load_classification("digits", seed=0)
    assert data.num_classes == 10 and data.in_shape == (1, 8, 8)
    sizes = [len(data.split(s)) for s in ("train", "val", "calib", "test")]
    assert sum(sizes) == 1797
    assert abs(len(data.test) - 0.2 * 1797) < 10 and abs(len(data.val) - 0.1 * 1797) < 10
    for s in ("train", "val", "calib", "test"):
        sp = data.split(s)
        assert sp.x.dtype == torch.float32 and sp.y.dtype == torch.int64
        assert sp.x.shape[1:] == (1, 8, 8)
        assert 0.0 <= float(sp.x.min()) and float(sp.x.max()) <= 1.0
        counts = torch.bincount(sp.y, minlength=10).float()
        assert float(counts.min()) >= 0.8 * float(counts.mean())  # stratified: every class in proportion
    # disjoint: the splits together hold each of the 1797 images exactly as often as the raw set does
    proj = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keys = torch.cat([data.split(s).x.flatten(1).double() @ proj for s in ("train", "val", "calib", "test")])
    raw = torch.from_numpy(load_digits().data / 16.0) @ proj
    assert torch.allclose(torch.sort(keys)[0], torch.sort(raw)[0])


def test_digits_splits_depend_on_seed_only():
    a, b, c = (load_classification("digits", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.val.y, b.val.y)
    assert not torch.equal(a.test.x, c.test.x)


def test_load_classification_errors():
    with pytest.raises(InputError, match="unknown dataset 'digitz'"):
        load_classification("digitz")
    with pytest.raises(InputError, match="no option 'colour'"):
        load_classification("digits", colour=True)
    with pytest.raises(InputError, match="bundled and takes no root"):
        load_classification("digits", root="/tmp")
    with pytest.raises(InputError, match="unknown split 'dev'"):
        load_classification("digits").split("dev")
