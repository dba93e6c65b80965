import torch

from metadyn.consistency.losses import consistency_method
from metadyn.core.backbones.conv4 import conv4_exits
from metadyn.data import ClassPool, EpisodeSampler
from metadyn.meta import MetaLearner


def _setup(weight):
    torch.manual_seed(0)
    net = conv4_exits(in_shape=(1, 8, 8), num_classes=3, width=4, norm="batch_episodic").double()
    cons = consistency_method(net, (1, 8, 8), kind="byol", weight=weight, hidden=8).double()
    g = torch.Generator().manual_seed(0)
    pool = ClassPool(torch.rand(60, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(6).repeat(10))
    batch = EpisodeSampler(pool, 3, 1, 2, seed=0).batch(0, 2)
    return net, cons, batch


def test_consistency_in_the_outer_loop():
    net, cons, batch = _setup(0.5)
    plain = MetaLearner(net, "maml", inner_lr=0.1)
    _, g_plain = plain.meta_gradient(batch)
    with_c = MetaLearner(net, "maml", inner_lr=0.1, consistency=cons)
    _, g_cons = with_c.meta_gradient(batch)
    n_net = len(g_plain)
    leaves = with_c._outer_leaves()
    assert len(g_cons) == n_net + len(list(cons.parameters()))
    assert any(torch.count_nonzero(g) > 0 for g in g_cons[n_net:])  # the consistency heads learn
    names = list(with_c._leaf_params())
    final = [i for i, n in enumerate(names) if n.startswith(f"net.heads.{net.num_exits - 1}.")
             or n.startswith(f"net.blocks.{net.num_exits - 1}.")]
    for i in final:  # the final exit's parameters get nothing from the consistency term
        assert torch.allclose(g_cons[i], g_plain[i], rtol=0, atol=1e-12)
    assert any(not torch.allclose(g_cons[i], g_plain[i]) for i in range(n_net) if i not in final)
    assert leaves[0] is next(iter(with_c._leaf_params().values()))


def test_zero_weight_changes_nothing():
    net, cons, batch = _setup(0.0)
    _, g_plain = MetaLearner(net, "maml", inner_lr=0.1).meta_gradient(batch)
    _, g_cons = MetaLearner(net, "maml", inner_lr=0.1, consistency=cons).meta_gradient(batch)
    for a, b in zip(g_plain, g_cons):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
