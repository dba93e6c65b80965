"""TorchOpt's MAML, written as its few-shot example does, computes metadyn's meta-gradient (float64): the peer
that ``metadyn bench maml`` times solves the same problem. Skipped when torchopt is not installed (the
``peers`` extra)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from metadyn.core.backbones.conv4 import conv4_exits
from metadyn.meta import MetaLearner

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torchopt = pytest.importorskip("torchopt")


class _Final(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_final(x)


def _torchopt_meta_gradient(model, batch, lr, steps):
    """examples/few-shot/maml_omniglot.py of TorchOpt: MetaSGD inner steps, state recovered after each task,
    one backward of the mean query loss."""
    sx, sy, qx, qy = batch
    inner = torchopt.MetaSGD(model, lr=lr)
    net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner, by="reference")
    losses = []
    for i in range(len(sx)):
        for _ in range(steps):
            inner.step(F.cross_entropy(model(sx[i]), sy[i]))
        losses.append(F.cross_entropy(model(qx[i]), qy[i]))
        torchopt.recover_state_dict(model, net_state)
        torchopt.recover_state_dict(inner, opt_state)
    torch.mean(torch.stack(losses)).backward()
    return _grads(model)


def _grads(module):  # parameters off the final exit's path (earlier heads) have none: zeros
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()])


@pytest.mark.parametrize("steps", [1, 2])
def test_torchopt_meta_gradient_equals_metadyn_in_float64(steps):
    torch.manual_seed(0)
    net = conv4_exits((1, 10, 10), 5, width=4, norm="batch_episodic").double()
    g = torch.Generator().manual_seed(1)
    t, n, q = 3, 5, 2
    batch = (torch.randn(t, n, 1, 10, 10, generator=g, dtype=torch.float64),
             torch.arange(n).repeat(t, 1),
             torch.randn(t, n * q, 1, 10, 10, generator=g, dtype=torch.float64),
             torch.arange(n).repeat_interleave(q).repeat(t, 1))
    learner = MetaLearner(net, "maml", inner_lr=0.4, inner_steps=steps, exits=[net.num_exits - 1])
    learner(batch).backward()
    ref = _grads(net)
    net.zero_grad(set_to_none=True)
    got = _torchopt_meta_gradient(_Final(net), batch, 0.4, steps)
    assert ref.abs().sum() > 0 and torch.isfinite(ref).all()
    assert torch.allclose(got, ref, rtol=1e-9, atol=1e-12), float((got - ref).abs().max())
