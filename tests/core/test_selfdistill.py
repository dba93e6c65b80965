"""IMTA (gradient equilibrium + self-distillation) and BYOT/SCAN losses against hand-computed values."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from metadyn.core.backbones.msdnet import tiny_msdnet
from metadyn.core.backbones.resnet import tiny_resnet_exits
from metadyn.core.callbacks import TrainState
from metadyn.core.losses import (
    GradientEquilibrium,
    _stage_params,
    byot_distillation,
    byot_loss,
    distillation_loss,
    imta_loss,
)
from metadyn.core.outputs import ExitOutput
from metadyn.core.train import fit
from metadyn.errors import InputError
from metadyn.registry import METHODS


def _kl(p_t, p_s):
    """KL(p_t || p_s) of two probability rows, by hand."""
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p_t, p_s))


def _soft(z, tau):
    e = [math.exp(v / tau) for v in z]
    return [v / sum(e) for v in e]


Z = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 3.0]]  # one sample, three exits, three classes


def _out(rows=Z, features=None):
    logits = [torch.tensor([r], dtype=torch.float64, requires_grad=True) for r in rows]
    return ExitOutput(logits, features or [lg for lg in logits])


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("teachers", ["later", "last"])
def test_distillation_loss_by_hand(teachers, reduction):
    tau = 2.0
    p = [_soft(z, tau) for z in Z]
    if teachers == "later":  # exit 0 learns from exits 1 and 2, exit 1 from exit 2, exit 2 from nobody
        want = (0.5 * (_kl(p[1], p[0]) + _kl(p[2], p[0])) + _kl(p[2], p[1])) * tau**2
    else:
        want = (_kl(p[2], p[0]) + _kl(p[2], p[1])) * tau**2
    if reduction == "mean":  # metadyn's earlier variant: L_dist / M
        want /= 3
    out = _out()
    got = distillation_loss(out, tau, teachers, reduction)
    assert got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    assert out.logits[2].grad is None or torch.all(out.logits[2].grad == 0)  # the final exit is never a student
    with pytest.raises(InputError, match="teachers"):
        distillation_loss(out, tau, "all")
    with pytest.raises(InputError, match="reduction"):
        distillation_loss(out, tau, "last", "batchmean")


def test_imta_semi_supervised_uses_only_distillation_on_unlabeled():
    tau = 3.0
    z = [torch.tensor(r, dtype=torch.float64) for r in ([[1.0, 0.0], [0.0, 2.0]], [[0.3, 0.1], [1.0, -1.0]])]
    out = ExitOutput(z, z)
    y = torch.tensor([1, -1])  # the second sample is unlabeled
    loss = imta_loss(tau=tau)
    ce = F.cross_entropy(z[0][:1], y[:1]) + F.cross_entropy(z[1][:1], y[:1])
    p0, p1 = ([_soft(r.tolist(), tau) for r in zi] for zi in z)
    dist = tau**2 * (_kl(p1[0], p0[0]) + _kl(p1[1], p0[1])) / 2  # batch mean, summed over the early exits
    assert loss(out, y).item() == pytest.approx(ce.item() + dist, rel=1e-12)
    # all unlabeled: the distillation term alone
    assert loss(out, torch.tensor([-1, -1])).item() == pytest.approx(dist, rel=1e-12)
    assert METHODS.get("imta") is imta_loss
    with pytest.raises(InputError, match="tau"):
        imta_loss(tau=0.0)
    with pytest.raises(InputError, match="tau"):
        imta_loss(tau="annealed")


class _PortedDistillationBasedLoss:
    """A line-by-line port of ``DistillationBasedLoss.__call__`` (mary-phuong/multiexit-distillation, main.py),
    taking the exits' logits instead of running the network."""

    def __init__(self, C, maxprob, n_exits, Tmult=1.05, global_scale=1.0):
        self.C, self.maxprob, self.Tmult, self.T, self.global_scale = C, maxprob, Tmult, 1.0, global_scale

    def __call__(self, logits_list, y):
        cum_loss = (1.0 - self.C) * F.cross_entropy(logits_list[-1], y)
        prob_t = F.softmax(logits_list[-1].data / self.T, dim=1)
        for logits in logits_list[:-1]:
            logprob_s = F.log_softmax(logits / self.T, dim=1)
            dist_loss = -(prob_t * logprob_s).sum(dim=1).mean()
            cross_ent = 0.0 if self.C == 1.0 else F.cross_entropy(logits, y)
            cum_loss += (1.0 - self.C) * cross_ent
            cum_loss += (self.T ** 2) * self.C * dist_loss
        adj_maxprob = prob_t.max(dim=1)[0].mean()
        if adj_maxprob > self.maxprob:
            self.T *= self.Tmult
        return cum_loss * self.global_scale


@pytest.mark.parametrize("n_exits", [5, 3])
def test_imta_distillation_matches_the_released_code(n_exits):
    """Gradients and temperatures over training steps equal the released code's (C = 0.5, global_scale =
    2 * 5 / M, as in its train_cifar.py) up to the factor 5 / M; its cross-entropy form of the distillation
    differs from our KL by a constant (the teacher's entropy), so gradients are compared, not values."""
    g = torch.Generator().manual_seed(0)
    ported = _PortedDistillationBasedLoss(0.5, 0.5, n_exits, global_scale=2.0 * 5 / n_exits)
    ours = imta_loss(equilibrium=False)
    (cb,) = ours.callbacks(None)
    assert cb is ours.temperature
    temps = []
    for step in range(40):
        scale = 0.5 + 0.2 * step  # sharper and sharper teachers: the temperature must rise, then hold
        base = [torch.randn(16, 7, generator=g, dtype=torch.float64) * scale for _ in range(n_exits)]
        y = torch.randint(7, (16,), generator=g)
        grads = []
        for which in ("released", "ours"):
            lg = [b.clone().requires_grad_(True) for b in base]
            value = ported(lg, y) * n_exits / 5 if which == "released" else ours(ExitOutput(lg, lg), y)
            value.backward()
            grads.append(torch.cat([t.grad.flatten() for t in lg]))
        assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-13), step
        assert float(ours.temperature.tau) == pytest.approx(ported.T, rel=1e-12)
        temps.append(ported.T)
    assert temps[0] == 1.0 and temps[-1] > 1.05 ** 5  # it did anneal
    # no update outside training (no gradients), and the state round-trips through a checkpoint
    before = float(ours.temperature.tau)
    with torch.no_grad():
        ours(ExitOutput(base, base), y)
    assert float(ours.temperature.tau) == before
    cb.load_state_dict({"tau": 2.5})
    assert cb.state_dict() == {"tau": 2.5}


def test_imta_fit_records_and_resumes_the_temperature(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    loss = imta_loss(equilibrium=False)
    fit(tiny_resnet_exits((1, 8, 8), 3), (x, y), loss=loss, epochs=2, batch_size=8, lr=0.1, progress=False,
        callbacks=loss.callbacks(None), checkpoint=tmp_path / "a.pt")
    again = imta_loss(equilibrium=False)
    state = fit(tiny_resnet_exits((1, 8, 8), 3), (x, y), loss=again, epochs=2, batch_size=8, lr=0.1,
                progress=False, callbacks=again.callbacks(None), checkpoint=tmp_path / "a.pt")
    assert state.history[-1]["tau"] == float(loss.temperature.tau) == float(again.temperature.tau)


def test_byot_loss_by_hand():
    alpha, tau, lam = 0.3, 3.0, 0.5
    f = [torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[0.0, 0.5]], dtype=torch.float64),
         torch.tensor([[1.0, 1.0]], dtype=torch.float64, requires_grad=True)]
    out = _out(features=f)
    y = torch.tensor([2])
    p = [_soft(z, tau) for z in Z]
    ce = [-math.log(_soft(z, 1.0)[2]) for z in Z]
    feat = [(1 - 1) ** 2 + (2 - 1) ** 2, (0 - 1) ** 2 + (0.5 - 1) ** 2]
    want = sum((1 - alpha) * c for c in ce) + sum(alpha * tau**2 * _kl(p[2], p[i]) + lam * feat[i] for i in range(2))
    got = byot_distillation(out, y, alpha, tau, lam)
    assert got.item() == pytest.approx(want, rel=1e-12)
    got.backward()
    assert f[2].grad is None  # the final exit's features are the (detached) target
    # an unlabeled sample keeps only the distillation and feature terms
    unl = byot_loss(alpha, tau, lam)(out, torch.tensor([-1]))
    assert unl.item() == pytest.approx(want - sum((1 - alpha) * c for c in ce), rel=1e-12)
    # both released codes weight the deepest classifier's cross-entropy by 1 instead of the paper's 1 - alpha
    code = byot_loss(alpha, tau, lam, final_weight=1.0)(out, y)
    assert code.item() == pytest.approx(want + alpha * ce[2], rel=1e-12)
    with pytest.raises(InputError, match="final_weight"):
        byot_loss(final_weight=-1.0)


def test_byot_feature_sizes_must_match():
    z = torch.zeros(2, 3)
    out = ExitOutput([z, z], [torch.zeros(2, 4), torch.zeros(2, 8)])
    with pytest.raises(InputError, match="scan"):
        byot_distillation(out, torch.tensor([0, 1]))
    assert byot_distillation(out, torch.tensor([0, 1]), lam=0.0).item() == pytest.approx(math.log(3))
    with pytest.raises(InputError, match="alpha"):
        byot_loss(alpha=1.5)


# --------------------------------------------------------------------------- gradient equilibrium


class _Rescale(torch.autograd.Function):
    """The paper's gradient rescaling: identity forward, gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def _rescale(state, scale):
    return tree_map(lambda t: _Rescale.apply(t, scale), state)


def _ge_forward(model, x):
    """GE as Li et al. state it: at exit i's branch point, 1/(K-i) before the classifier, K-i-1 after it."""
    k = model.num_exits
    state = model.stem(x)
    logits, feats = [], []
    for i in range(k):
        state = _rescale(model.stage(i, state), 1.0 / (k - i))
        lg, ft = model.exit(i, state)
        logits.append(lg)
        feats.append(ft)
        state = _rescale(state, float(k - i - 1))
    return ExitOutput(logits, feats)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _ge_check(model, x, y, loss):
    """Literal GE, the callback, and plain backprop on three copies of ``model``."""
    literal, cb, plain = model, copy.deepcopy(model), copy.deepcopy(model)
    loss(_ge_forward(literal, x), y).backward()
    loss(cb(x), y).backward()
    ge = GradientEquilibrium()
    ge.on_after_backward(TrainState(cb, None, batch=(x, y)))
    loss(plain(x), y).backward()
    return _grads(literal), _grads(cb), _grads(plain)


@pytest.mark.parametrize("build", [tiny_resnet_exits, tiny_msdnet])  # MSDNet: a State of several scales
def test_gradient_equilibrium_equals_the_papers_rescaling(build):
    torch.manual_seed(0)
    m = build(in_shape=(1, 8, 8), num_classes=5).double().train()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    literal, cb, plain = _ge_check(m, x, y, imta_loss(tau=2.0))
    k = m.num_exits
    stage_of = {}
    for j, group in enumerate(_stage_params(m, x[:2])):
        stage_of.update({id(p): j for p in group})
    for name, p in m.named_parameters():
        assert torch.allclose(cb[name], literal[name], rtol=1e-10, atol=1e-14), name
        if name.startswith("heads."):
            assert id(p) not in stage_of
            assert torch.allclose(cb[name], plain[name], rtol=1e-12, atol=0), name  # heads: full gradient
        else:
            j = stage_of[id(p)]  # stage j's parameters: the unscaled gradient divided by K - j
            assert torch.allclose(cb[name] * (k - j), plain[name], rtol=1e-10, atol=1e-14), name
    stem_name, stem = next(iter(m.named_parameters()))
    assert stage_of[id(stem)] == 0 and sorted(set(stage_of.values())) == list(range(k))
    assert not torch.allclose(cb[stem_name], plain[stem_name])  # GE did change something


def test_imta_trains_with_its_callback():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 8, 8, generator=g)
    y = x.flatten(1)[:, :3].argmax(1)
    y[::4] = -1  # a quarter unlabeled
    m = tiny_resnet_exits(num_classes=3)
    assert [type(c).__name__ for c in imta_loss().callbacks(m)] == ["GradientEquilibrium", "AdaptiveTemperature"]
    loss = imta_loss(tau=3.0)  # a fixed temperature: the loss values of the epochs are comparable
    cbs = loss.callbacks(m)
    assert len(cbs) == 1 and imta_loss(tau=3.0, equilibrium=False).callbacks(m) == []
    st = fit(m, (x, y), loss=loss, epochs=3, batch_size=16, lr=0.05, device="cpu", callbacks=cbs, progress=False)
    assert st.history[-1]["loss"] < st.history[0]["loss"]
    assert cbs[0].scales and all(0 < s < 1 for _, s in cbs[0].scales)
