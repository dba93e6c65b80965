import pytest
import torch

from metadyn.data import ClassPool, Episode, EpisodeSampler, Split, load_classification
from metadyn.errors import InputError


def _pool(n_classes=8, per_class=10, skip=None):
    """Sample i is an image filled with the value i, so episodes can be traced back to pool indices."""
    y = torch.arange(n_classes).repeat_interleave(per_class) * 3 + 1  # non-contiguous class ids
    if skip is not None:
        y = y[skip:]
    x = torch.arange(len(y), dtype=torch.float32)[:, None, None, None].expand(-1, 1, 2, 2).contiguous()
    return ClassPool(x, y)


def _ids(x):
    return x[:, 0, 0, 0].long()


def test_pool_groups_by_class():
    pool = _pool(skip=3)
    assert pool.classes == [1, 4, 7, 10, 13, 16, 19, 22]
    assert pool.count(1) == 7 and pool.count(4) == 10 and pool.count(2) == 0
    assert len(pool) == 77


def test_episode_shapes_labels_and_disjointness():
    pool = _pool()
    ep = EpisodeSampler(pool, n_way=5, k_shot=2, n_query=3, seed=0).episode(0)
    assert ep.support_x.shape == (10, 1, 2, 2) and ep.query_x.shape == (15, 1, 2, 2)
    assert ep.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # class-major
    assert torch.equal(ep.query_y, torch.arange(5).repeat_interleave(3))
    sid, qid = _ids(ep.support_x), _ids(ep.query_x)
    assert not set(sid.tolist()) & set(qid.tolist())
    assert len(set(sid.tolist())) == 10 and len(set(qid.tolist())) == 15
    # one pool class per label, the same for support and query, 5 distinct classes
    s_cls, q_cls = pool.y[sid].view(5, 2), pool.y[qid].view(5, 3)
    assert bool((s_cls == s_cls[:, :1]).all()) and bool((q_cls == s_cls[:, :1]).all())
    assert len(set(s_cls[:, 0].tolist())) == 5


def test_episodes_deterministic_per_seed_and_index():
    pool = _pool()
    a = EpisodeSampler(pool, 5, 1, 2, seed=3)
    b = EpisodeSampler(pool, 5, 1, 2, seed=3)
    for i in (0, 7):
        ea, eb = a.episode(i), b.episode(i)
        assert all(torch.equal(getattr(ea, f), getattr(eb, f)) for f in ("support_x", "support_y", "query_x"))
    assert not torch.equal(a.episode(0).support_x, a.episode(1).support_x)
    assert not torch.equal(a.episode(0).support_x, EpisodeSampler(pool, 5, 1, 2, seed=4).episode(0).support_x)
    first = [e.support_x for _, e in zip(range(3), a)]
    assert all(torch.equal(first[i], a.episode(i).support_x) for i in range(3))


def test_labels_are_a_permutation_over_classes():
    pool = _pool()
    s = EpisodeSampler(pool, 4, 1, 1, seed=0)
    first_label_class = {int(pool.y[_ids(s.episode(i).support_x)[0]]) for i in range(30)}
    assert len(first_label_class) > 3  # label 0 goes to different classes across episodes


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_way": 9, "k_shot": 1, "n_query": 1}, "n_way=9 is larger than the 8 classes available"),
        (
            {"n_way": 2, "k_shot": 5, "n_query": 4},
            "k_shot \\+ n_query = 9 is larger than the 7 samples of class 1",
        ),
        ({"n_way": 0, "k_shot": 1, "n_query": 1}, "n_way must be a positive integer, got 0"),
        ({"n_way": 2, "k_shot": -1, "n_query": 1}, "k_shot must be a positive integer, got -1"),
        ({"n_way": 2, "k_shot": 1, "n_query": 0}, "n_query must be a positive integer, got 0"),
    ],
)
def test_impossible_sizes_raise(kwargs, match):
    with pytest.raises(InputError, match=match):
        EpisodeSampler(_pool(skip=3), **kwargs)


def test_batch_stacks_episodes():
    pool = _pool()
    s = EpisodeSampler(pool, 3, 2, 4, seed=1)
    sx, sy, qx, qy = s.batch(5, meta_batch=4)
    assert sx.shape == (4, 6, 1, 2, 2) and sy.shape == (4, 6)
    assert qx.shape == (4, 12, 1, 2, 2) and qy.shape == (4, 12)
    assert torch.equal(sx[2], s.episode(7).support_x) and torch.equal(qy[0], s.episode(5).query_y)


def test_episode_to_and_pool_sources():
    ep = EpisodeSampler(_pool(), 2, 1, 1).episode(0).to("cpu")
    assert isinstance(ep, Episode)
    pool = ClassPool.from_glyphs("val", samples_per_class=3, size=12)
    assert len(pool.classes) == 100 and pool.classes[0] == 400 and pool.x.shape == (300, 1, 12, 12)
    data = load_classification("digits")
    pool = ClassPool.from_data(data.train)
    assert pool.classes == list(range(10))
    with pytest.raises(InputError, match="NaN"):
        ClassPool.from_data(Split(torch.full((2, 1, 2, 2), float("nan")), torch.tensor([0, 1])))
