"""The batched meta-gradient (episodes under ``torch.func.vmap``, the GPU path) equals the per-episode engine's
(the CPU path) in float64, for every algorithm; and BatchNorm with batch statistics needs the elementary form
under ``vmap`` (torch's batching rule gives wrong second-order gradients)."""

from __future__ import annotations

import pytest
import torch

from metadyn.core.backbones.conv4 import conv4_exits
from metadyn.meta.learner import MetaLearner

IN_SHAPE = (1, 8, 8)


def _batch(t: int = 3, n: int = 3, k: int = 2, q: int = 2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(t, n * k, *IN_SHAPE, generator=g, dtype=torch.float64),
            torch.arange(n).repeat_interleave(k).repeat(t, 1),
            torch.randn(t, n * q, *IN_SHAPE, generator=g, dtype=torch.float64),
            torch.arange(n).repeat_interleave(q).repeat(t, 1))


@pytest.mark.parametrize("algorithm,options", [("maml", {}), ("fomaml", {}), ("anil", {}), ("metasgd", {}),
                                               ("maml", {"share_trunk": True}), ("maml", {"inner_steps": 2}),
                                               ("maml", {"exits": [1, 3], "exit_weights": [0.5, 2.0]})])
def test_batched_meta_gradient_equals_the_per_episode_one(algorithm, options):
    torch.manual_seed(0)
    net = conv4_exits(IN_SHAPE, 3, width=3, norm="batch_episodic").double()
    one = MetaLearner(net, algorithm, inner_lr=0.3, batched=False, **options)
    many = MetaLearner(net, algorithm, inner_lr=0.3, batched=True, batch_chunk=2, **options)  # chunks of 2 and 1
    if algorithm == "metasgd":
        many.inner_lrs.load_state_dict(one.inner_lrs.state_dict())
    batch = _batch()
    va, ga = one.meta_gradient(batch)
    vb, gb = many.meta_gradient(batch)
    torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12)
    assert any(float(g.abs().max()) > 0 for g in ga)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for key in ("query_loss", "query_accuracy"):
        torch.testing.assert_close(torch.tensor(one.last_stats[key]), torch.tensor(many.last_stats[key]))


def test_vmap_needs_the_elementary_batch_norm():
    """Without :func:`~metadyn.meta.functional.vmappable`, torch's own batch norm under vmap gives another
    meta-gradient for the convolution before it: the reason the batched path rewrites it."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.arange(5)
    p = {"w": torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64), "g": torch.rand(4, generator=g,
         dtype=torch.float64) + 0.5, "fw": 0.1 * torch.randn(5, 64, generator=g, dtype=torch.float64)}

    def loss(p, xx):
        h = F.batch_norm(F.conv2d(xx, p["w"], padding=1), None, None, p["g"], None, training=True)
        return F.cross_entropy(F.linear(F.avg_pool2d(h, 2).flatten(1), p["fw"]), y)

    def episode(p, xx):
        d = torch.func.grad(loss)(p, xx)
        return loss({k: p[k] - 0.4 * d[k] for k in p}, xx)

    batched = torch.func.grad(lambda p: torch.func.vmap(lambda xx: episode(p, xx))(x).sum())(p)
    looped = torch.func.grad(lambda p: sum(episode(p, x[t]) for t in range(3)))(p)
    # if this starts to hold, torch fixed its batching rule and vmappable() may go
    assert not torch.allclose(batched["w"], looped["w"], rtol=1e-6, atol=1e-9)
