"""The functional MAML engine: equality with higher and learn2learn, finite differences, exit tasks."""

import warnings

import pytest
import torch
import torch.nn.functional as F

from metadyn.core.backbones.conv4 import conv4_exits
from metadyn.core.backbones.mlp import mlp_exits
from metadyn.errors import InputError
from metadyn.meta import MetaLearner

T, N, K, Q = 2, 3, 2, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread (two threads only spin-wait on a busy 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _episodes(shape=(1, 10, 10), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sx = torch.randn(T, N * K, *shape, generator=g, dtype=dtype)
    qx = torch.randn(T, N * Q, *shape, generator=g, dtype=dtype)
    sy = torch.arange(N).repeat_interleave(K).repeat(T, 1)
    qy = torch.arange(N).repeat_interleave(Q).repeat(T, 1)
    return sx, sy, qx, qy


def _conv(norm="batch_episodic"):
    torch.manual_seed(0)
    return conv4_exits((1, 10, 10), N, width=4, norm=norm).double()


def _flat_grads(module):
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def _ours(net, batch, algorithm="maml", **kw):
    learner = MetaLearner(net, algorithm, **kw)
    learner.zero_grad()
    learner(batch).backward()
    return learner


class _Final(torch.nn.Module):
    """The final exit as a plain module, as a peer library sees the network."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_final(x)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _l2l():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("learn2learn")


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_learn2learn(first_order):
    l2l = _l2l()
    net, batch = _conv(), _episodes()
    _ours(net, batch, "fomaml" if first_order else "maml", inner_lr=0.3, inner_steps=2, exits=[3])
    ours = _flat_grads(net)
    maml = l2l.algorithms.MAML(_Final(net), lr=0.3, first_order=first_order, allow_unused=True)
    net.zero_grad()
    sx, sy, qx, qy = batch
    for t in range(T):
        clone = maml.clone()
        for _ in range(2):
            clone.adapt(F.cross_entropy(clone(sx[t]), sy[t]))
        (F.cross_entropy(clone(qx[t]), qy[t]) / T).backward()
    theirs = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                        for p in net.parameters()])
    assert _rel(ours, theirs) < 1e-6


def test_second_order_meta_gradient_equals_higher():
    higher = pytest.importorskip("higher")
    net, batch = _conv(), _episodes()
    _ours(net, batch, inner_lr=0.3, inner_steps=2, exits=[3])
    ours = _flat_grads(net)
    model = _Final(net)
    inner_opt = torch.optim.SGD(model.parameters(), lr=0.3)
    net.zero_grad()
    sx, sy, qx, qy = batch
    for t in range(T):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(2):
                diffopt.step(F.cross_entropy(fmodel(sx[t]), sy[t]))
            (F.cross_entropy(fmodel(qx[t]), qy[t]) / T).backward()
    theirs = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                        for p in net.parameters()])
    assert _rel(ours, theirs) < 1e-6


def test_metasgd_rates_start_at_random_as_in_the_paper():
    torch.manual_seed(0)
    net = mlp_exits((1, 3, 3), N, hidden=(6,)).double()
    rates = torch.cat([r.detach().flatten() for r in MetaLearner(net, "metasgd").inner_lrs.values()])
    assert rates.dtype == torch.float64 and rates.numel() == sum(p.numel() for p in net.parameters())
    assert 0.005 <= float(rates.min()) < float(rates.max()) <= 0.1  # Li et al. 2017, Sec. 4: U[0.005, 0.1]
    assert len(set(rates.tolist())) == rates.numel()
    assert abs(float(rates.mean()) - 0.0525) < 0.01  # the mean of U[0.005, 0.1]
    const = torch.cat([r.flatten() for r in MetaLearner(net, "metasgd", inner_lr=0.3,
                                                        metasgd_init="constant").inner_lrs.values()])
    assert torch.all(const == 0.3)
    narrow = MetaLearner(net, "metasgd", metasgd_range=(0.2, 0.2)).inner_lrs.values()
    assert all(torch.all(r == 0.2) for r in narrow)
    with pytest.raises(InputError, match="metasgd_init"):
        MetaLearner(net, "metasgd", metasgd_init="normal")
    with pytest.raises(InputError, match="metasgd_range"):
        MetaLearner(net, "metasgd", metasgd_range=(0.1, 0.01))


def test_metasgd_equals_learn2learn():
    l2l = _l2l()
    torch.manual_seed(0)
    net = mlp_exits((1, 3, 3), N, hidden=(6,)).double()  # learn2learn's MetaSGD needs every parameter used
    batch = _episodes((1, 3, 3))
    learner = _ours(net, batch, "metasgd")  # random per-parameter rates (the paper's initialisation)
    ours = torch.cat([_flat_grads(net), *(p.grad.flatten() for p in learner.inner_lrs.values())])
    meta = l2l.algorithms.MetaSGD(_Final(net), lr=0.3).double()
    with torch.no_grad():  # learn2learn starts from one constant rate: give it ours
        for theirs_rate, our_rate in zip(meta.lrs, learner.inner_lrs.values()):
            theirs_rate.copy_(our_rate)
    meta.zero_grad()
    sx, sy, qx, qy = batch
    for t in range(T):
        clone = meta.clone()
        clone.adapt(F.cross_entropy(clone(sx[t]), sy[t]))
        (F.cross_entropy(clone(qx[t]), qy[t]) / T).backward()
    theirs = torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros_like(p).flatten()
                        for p in (*net.parameters(), *meta.lrs)])
    assert _rel(ours, theirs) < 1e-6


def test_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    net = mlp_exits((1, 3, 3), N, hidden=(5, 4)).double()
    batch = _episodes((1, 3, 3))
    learner = MetaLearner(net, "maml", inner_lr=0.5, inner_steps=2, exits=[1])
    learner.zero_grad()
    learner(batch).backward()
    eps = 1e-6
    for p in net.parameters():
        for idx in [(0,) * p.dim(), tuple(s - 1 for s in p.shape)]:
            old = p.data[idx].item()
            p.data[idx] = old + eps
            up = learner.meta_gradient(batch)[0].item()
            p.data[idx] = old - eps
            down = learner.meta_gradient(batch)[0].item()
            p.data[idx] = old
            fd = (up - down) / (2 * eps)
            assert abs(fd - p.grad[idx].item()) < 1e-6 * max(1.0, abs(fd))


def test_first_order_differs_from_second_order():
    net, batch = _conv(), _episodes()
    _ours(net, batch, "maml", exits=[3])
    second = _flat_grads(net)
    _ours(net, batch, "fomaml", exits=[3])
    assert _rel(_flat_grads(net), second) > 1e-4


def test_exit_task_leaves_other_parameters_with_exactly_zero_gradient():
    net, batch = _conv(), _episodes()
    learner = _ours(net, batch, exits=[1])
    paths = learner.exit_paths(batch[0][0])
    assert paths[1][1] == ["net.heads.1.fc.weight", "net.heads.1.fc.bias"]
    for name, p in net.named_parameters():
        on_path = name.startswith(("blocks.0.", "blocks.1.", "heads.1."))
        if not on_path:
            assert torch.count_nonzero(p.grad) == 0, name
        elif name.endswith("0.weight"):
            assert p.grad.abs().sum() > 0, name


def test_exits_as_tasks_are_the_weighted_sum_of_single_exit_tasks():
    net, batch = _conv(), _episodes()
    _ours(net, batch, exits=[0, 3], inner_lr=[0.2, 0.4], inner_steps=[1, 2], exit_weights=[0.5, 2.0])
    both = _flat_grads(net)
    _ours(net, batch, exits=[0], inner_lr=0.2, inner_steps=1)
    first = _flat_grads(net)
    _ours(net, batch, exits=[3], inner_lr=0.4, inner_steps=2)
    assert _rel(both, 0.5 * first + 2.0 * _flat_grads(net)) < 1e-10


def test_shared_trunk_with_one_exit_is_maml_and_with_many_differs():
    net, batch = _conv(), _episodes()
    _ours(net, batch, exits=[3], share_trunk=True)
    shared = _flat_grads(net)
    _ours(net, batch, exits=[3])
    assert _rel(shared, _flat_grads(net)) < 1e-12
    _ours(net, batch, share_trunk=True)
    joint = _flat_grads(net)
    _ours(net, batch)
    assert _rel(joint, _flat_grads(net)) > 1e-4


def test_anil_adapts_heads_only_and_meta_learns_the_trunk():
    net, batch = _conv(), _episodes()
    learner = _ours(net, batch, "anil", inner_lr=0.5, inner_steps=3)
    assert net.blocks[0][0].weight.grad.abs().sum() > 0
    sx, sy, qx, _ = batch
    with torch.no_grad():
        before = [z.clone() for z in net(qx[0]).logits]
    after = learner.predict(sx[0], sy[0], qx[0])
    assert not torch.allclose(after[0].double(), before[0])
    # ANIL's adapted features are the unadapted trunk's: the head alone moved
    learner_maml = MetaLearner(net, "maml", inner_lr=0.0)
    same = learner_maml.predict(sx[0], sy[0], qx[0])
    assert all(torch.allclose(a.double(), b) for a, b in zip(same, before))


def test_float32_channels_last_matches_default_layout():
    net, batch = _conv(), _episodes()
    net = net.float()
    batch = tuple(b.float() if b.is_floating_point() else b for b in batch)
    _ours(net, batch, channels_last=True)
    cl = _flat_grads(net)
    _ours(net, batch, channels_last=False)
    assert _rel(cl, _flat_grads(net)) < 1e-4


def test_bad_options_are_input_errors():
    with pytest.raises(InputError, match="per-episode normalisation"):
        MetaLearner(conv4_exits((1, 10, 10), N, width=4, norm="batch"))
    net = _conv("group")
    with pytest.raises(InputError, match="unknown meta-learning algorithm"):
        MetaLearner(net, "reptile")
    with pytest.raises(InputError, match="inner_lr has 2 entries"):
        MetaLearner(net, inner_lr=[0.1, 0.2])
    with pytest.raises(InputError, match="exits must be"):
        MetaLearner(net, exits=[3, 1])
    with pytest.raises(InputError, match="share_trunk needs one inner_steps"):
        MetaLearner(net, inner_steps=[1, 1, 2, 2], share_trunk=True)


def test_run_exits_equals_functional_call_with_tied_weights():
    """The engine's parameter swap is ``torch.func.functional_call``: same outputs and gradients, tied
    weights swapped together, and the module's own parameters restored afterwards."""
    from torch.func import functional_call

    from metadyn.meta.functional import ExitRunner, run_exits

    net = _conv()
    net.heads[0].fc = net.heads[1].fc  # a tied head
    runner = ExitRunner(net)
    own = {n: p.detach().clone() for n, p in runner.named_parameters()}
    params = {n: (p + 0.1 * torch.randn_like(p)).requires_grad_() for n, p in runner.named_parameters()}
    x = _episodes()[0][0]
    ours = run_exits(runner, params, x, (0, 1, 3))
    assert all(torch.equal(p, own[n]) for n, p in runner.named_parameters())
    ref = functional_call(runner, params, (x, (0, 1, 3)))
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
    g1 = torch.autograd.grad(sum(z.sum() for z in ours), list(params.values()), allow_unused=True)
    g2 = torch.autograd.grad(sum(z.sum() for z in ref), list(params.values()), allow_unused=True)
    assert [a is None for a in g1] == [b is None for b in g2] and None in g1  # head 2 is not run
    for a, b in zip(g1, g2):
        assert a is None or torch.equal(a, b)
    assert "net.heads.1.fc.weight" not in params  # the tie is listed once, under its first name


def test_a_head_replaced_between_meta_steps_is_the_one_meta_learned():
    net = _conv()
    batch = _episodes()
    learner = _ours(net, batch, exits=[0])  # one meta-step caches the parameter slots
    torch.manual_seed(1)
    net.heads[0].fc = torch.nn.Linear(4, N).double()
    learner.zero_grad()
    learner(batch).backward()
    got = [p.grad.clone() for p in net.parameters()]
    fresh = _ours(net, batch, exits=[0])  # a learner built after the change
    assert fresh is not learner
    for a, p in zip(got, net.parameters()):
        assert torch.equal(a, p.grad)
    assert torch.count_nonzero(net.heads[0].fc.weight.grad) > 0
