import pytest
import torch

from metadyn.data import GLYPH_SPLITS, glyph_class_ids, load_classification, render_glyphs
from metadyn.errors import InputError


def test_render_shapes_range_and_labels():
    x, y = render_glyphs([5, 2, 9], 4, seed=0, size=20)
    assert x.shape == (12, 1, 20, 20) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [5] * 4 + [2] * 4 + [9] * 4
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    ink = x.flatten(1).mean(1)
    assert bool(((ink > 0.03) & (ink < 0.5)).all())  # strokes drawn, mostly background


def test_render_is_deterministic_and_seeded():
    a, _ = render_glyphs(range(4), 3, seed=1)
    b, _ = render_glyphs(range(4), 3, seed=1)
    c, _ = render_glyphs(range(4), 3, seed=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_class_subset_renders_independently():
    full, _ = render_glyphs(range(10), 5)
    sub, y = render_glyphs([3, 7], 5)
    assert torch.allclose(sub[:5], full[15:20], atol=1e-6)
    assert torch.allclose(sub[5:], full[35:40], atol=1e-6)
    more, _ = render_glyphs([3], 8)  # sample j depends on j only, not on how many are drawn
    assert torch.allclose(more[:5], full[15:20], atol=1e-6)


def test_same_class_is_closer_than_different_classes():
    k, n = 12, 8
    x, y = render_glyphs(range(k), n)
    d = torch.cdist(x.flatten(1), x.flatten(1))  # (k*n, k*n)
    same = y[:, None] == y[None, :]
    off_diag = ~torch.eye(k * n, dtype=torch.bool)
    within = d[same & off_diag].mean()
    between = d[~same].mean()
    assert within < 0.8 * between
    # nearest class mean classifies held-out samples well
    means = x.view(k, n, -1)[:, : n // 2].mean(1)  # (k, H*W)
    queries = x.view(k, n, -1)[:, n // 2 :].reshape(-1, means.shape[1])
    pred = torch.cdist(queries, means).argmin(1)
    truth = torch.arange(k).repeat_interleave(n - n // 2)
    assert float((pred == truth).float().mean()) > 0.7


def test_glyph_splits_are_disjoint_and_cover_600_classes():
    sets = [set(GLYPH_SPLITS[s]) for s in ("train", "val", "test")]
    assert [len(s) for s in sets] == [400, 100, 100]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(600))
    for s in GLYPH_SPLITS:
        assert glyph_class_ids(s) == list(GLYPH_SPLITS[s])
    with pytest.raises(InputError, match="unknown glyphs split 'dev'"):
        glyph_class_ids("dev")


def test_glyphs_loader():
    data = load_classification("glyphs", num_classes=5, samples_per_class=10, size=16, seed=0)
    assert data.num_classes == 5 and data.in_shape == (1, 16, 16)
    assert sum(len(data.split(s)) for s in ("train", "val", "calib", "test")) == 50
    assert sorted(torch.unique(data.train.y).tolist()) == list(range(5))
    with pytest.raises(InputError, match="num_classes"):
        load_classification("glyphs", num_classes=401)
    with pytest.raises(InputError, match="no option 'classes'"):
        load_classification("glyphs", classes=3)


@pytest.mark.parametrize(
    "args, match",
    [(([-1], 2), "non-negative"), (([1], 0), "samples_per_class"), (([1], 2, {"size": 4}), "size")],
)
def test_render_rejects_bad_arguments(args, match):
    kwargs = args[2] if len(args) > 2 else {}
    with pytest.raises(InputError, match=match):
        render_glyphs(args[0], args[1], **kwargs)
