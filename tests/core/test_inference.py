import copy

import pytest
import torch

from metadyn.core.backbones.conv4 import tiny_conv4_exits
from metadyn.core.backbones.mlp import tiny_mlp_exits
from metadyn.core.backbones.resnet import tiny_resnet_exits
from metadyn.core.inference import dynamic_exit, fold_batchnorm, prepare_for_inference, simulated_exit
from metadyn.core.policies import PatiencePolicy, ThresholdPolicy, fit_thresholds, geometric_fractions, policy_scores


def _trained_like(build):
    m = build(in_shape=(1, 8, 8), num_classes=5).double()
    # put BN statistics somewhere non-trivial
    m.train()
    with torch.no_grad():
        m(torch.randn(64, 1, 8, 8, dtype=torch.float64) * 2 + 0.5)
    return m.eval()


@pytest.mark.parametrize("build", [tiny_mlp_exits, tiny_conv4_exits, tiny_resnet_exits])
@pytest.mark.parametrize("p", [0.3, 1.0, 3.0])
def test_dynamic_equals_picking_from_full_forward(build, p):
    m = _trained_like(build)
    x_val = torch.randn(200, 1, 8, 8, dtype=torch.float64)
    x = torch.randn(300, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        t = fit_thresholds(policy_scores(m(x_val).logits), geometric_fractions(p, m.num_exits))
    policy = ThresholdPolicy(t.tolist())
    ref = simulated_exit(m, x, policy)
    dyn = dynamic_exit(m, x, policy)
    assert torch.equal(dyn.exit_idx, ref.exit_idx)
    assert torch.allclose(dyn.logits, ref.logits, rtol=0, atol=1e-12)
    assert len(torch.unique(dyn.exit_idx)) > 1  # the test exercises real exits


def test_dynamic_applies_scans_ensemble_fallback_like_picking():
    from metadyn.core.policies import EnsembleFallbackPolicy

    m = _trained_like(tiny_resnet_exits)
    x = torch.randn(300, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        conf = torch.stack([lg.softmax(-1).amax(-1) for lg in m(x).logits])  # (K, B)
    pol = EnsembleFallbackPolicy(conf.quantile(0.7, dim=1).tolist())  # 30% leave at each exit if reached
    ref, dyn = simulated_exit(m, x, pol), dynamic_exit(m, x, pol)
    assert torch.equal(dyn.exit_idx, ref.exit_idx)
    assert torch.allclose(dyn.logits, ref.logits, rtol=0, atol=1e-12)
    with torch.no_grad():
        final = m(x).logits[-1]
    fell_back = (ref.exit_idx == m.num_exits - 1) & ~torch.isclose(ref.logits, final).all(-1)
    assert 0 < int(fell_back.sum()) and len(torch.unique(dyn.exit_idx)) > 1  # both cases occur


def test_simulated_exit_runs_in_eval_mode_and_restores_train_mode():
    m = _trained_like(tiny_resnet_exits).train()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64)
    pol = ThresholdPolicy([0.6, 0.6, 0.0])
    sim = simulated_exit(m, x, pol)
    assert m.training and all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # BN stats untouched
    dyn = dynamic_exit(m, x, pol)
    assert torch.equal(sim.exit_idx, dyn.exit_idx) and torch.allclose(sim.logits, dyn.logits, rtol=0, atol=1e-12)


def test_dynamic_with_carry_policy_and_everyone_leaving():
    m = _trained_like(tiny_resnet_exits)
    x = torch.randn(50, 1, 8, 8, dtype=torch.float64)
    pol = PatiencePolicy(1)
    assert torch.equal(dynamic_exit(m, x, pol).exit_idx, simulated_exit(m, x, pol).exit_idx)
    everyone = ThresholdPolicy([0.0, 0.0, 0.0])
    r = dynamic_exit(m, x, everyone)
    assert (r.exit_idx == 0).all()
    with torch.no_grad():
        assert torch.allclose(r.logits, m(x).logits[0])


def test_dynamic_runs_later_stages_only_on_remaining_samples():
    m = _trained_like(tiny_resnet_exits)
    seen = []
    orig = m.stage

    def spy(i, state):
        seen.append((i, state.shape[0]))
        return orig(i, state)

    m.stage = spy
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        scores = policy_scores(m.__class__.forward(m, x).logits)
    seen.clear()
    t = fit_thresholds(scores, torch.tensor([0.5, 0.25, 0.25]))
    r = dynamic_exit(m, x, ThresholdPolicy(t.tolist()))
    counts = torch.bincount(r.exit_idx, minlength=3).tolist()
    assert seen == [(0, 40), (1, 40 - counts[0]), (2, counts[2])]


def test_prepare_for_inference_folds_bn_without_changing_outputs():
    m = _trained_like(tiny_resnet_exits)
    fast = prepare_for_inference(m)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in fast.modules())
    assert any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())  # the original is untouched
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a = m(x).logits
        b = fast(x.contiguous(memory_format=torch.channels_last)).logits
    for u, v in zip(a, b):
        assert torch.allclose(u, v, atol=1e-10)
    bn_free = fold_batchnorm(copy.deepcopy(tiny_mlp_exits()))
    assert isinstance(bn_free, torch.nn.Module)


def test_folding_keeps_the_module_tree_residual_sequentials_and_attached_exit_cuts():
    """fold_batchnorm rebuilt every Sequential as a shorter plain one: a Sequential subclass with its own forward
    lost it (a residual block lost its skip), and an attach_exits network's stages, which call trunk modules by
    path, ran the wrong layers or failed with "no attribute '6'"."""
    from torch import nn

    import metadyn as md

    class Residual(nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    def bn(c):
        b = nn.BatchNorm2d(c)
        b.running_mean.uniform_(-1, 1), b.running_var.uniform_(0.5, 2), b.weight.data.uniform_(0.5, 2)
        return b

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Residual(nn.Conv2d(4, 4, 3, padding=1), bn(4), nn.ReLU()),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval().double()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    p = md.prepare_for_inference(m, channels_last=False)
    assert type(p[1]) is Residual and torch.allclose(p(x), m(x), atol=1e-10)

    trunk = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), bn(4),
                          nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), bn(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).eval().double()
    for cut in ("2", "3"):  # after a BatchNorm's ReLU; at a conv whose BatchNorm is in the next stage
        net = md.attach_exits(copy.deepcopy(trunk), [cut], example_input=x).eval().double()
        fast = md.prepare_for_inference(net, channels_last=False)
        folded = sum(isinstance(mod, nn.BatchNorm2d) for mod in net.modules()) - \
            sum(isinstance(mod, nn.BatchNorm2d) for mod in fast.modules())
        assert folded == (3 if cut == "2" else 2)  # the conv at the cut keeps its BatchNorm
        for u, v in zip(net(x).logits, fast(x).logits):
            assert torch.allclose(u, v, atol=1e-10)
        first = ThresholdPolicy([float("-inf"), float("-inf")])  # everyone leaves at exit 0
        assert torch.allclose(dynamic_exit(fast, x, first).logits, simulated_exit(net, x, first).logits, atol=1e-10)


def test_micro_batched_dynamic_equals_one_batch():
    m = _trained_like(tiny_resnet_exits)
    x = torch.randn(70, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        t = fit_thresholds(policy_scores(m(x).logits), geometric_fractions(1.0, m.num_exits))
    pol = ThresholdPolicy(t.tolist())
    whole = dynamic_exit(m, x, pol)
    sliced = dynamic_exit(m, x, pol, micro_batch=16)
    assert torch.equal(whole.exit_idx, sliced.exit_idx)
    assert torch.allclose(whole.logits, sliced.logits, atol=1e-12)


def test_dynamic_exit_on_attached_network():
    from metadyn.core.backbones.attach import attach_exits

    static = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    ).double().eval()
    net = attach_exits(static, ["1", "3"], example_input=torch.zeros(1, 1, 8, 8, dtype=torch.float64)).double()
    net.eval()
    x = torch.randn(60, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        t = fit_thresholds(policy_scores(net(x).logits), geometric_fractions(1.0, net.num_exits))
    pol = ThresholdPolicy(t.tolist())
    dyn, ref = dynamic_exit(net, x, pol), simulated_exit(net, x, pol)
    assert torch.equal(dyn.exit_idx, ref.exit_idx) and torch.allclose(dyn.logits, ref.logits, atol=1e-12)
    final = dyn.exit_idx == net.num_exits - 1
    with torch.no_grad():
        assert torch.equal(dyn.logits[final], static(x[final]))


def test_a_float64_batch_runs_on_a_float32_model_as_collect_logits_does():
    """dynamic_exit / simulated_exit moved the batch to the model's device but not its dtype: a float64 batch
    failed with "expected scalar type Double but found Float" where collect_logits cast it."""
    m = tiny_resnet_exits().eval()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    pol = ThresholdPolicy([0.4] * m.num_exits)
    for run in (dynamic_exit, simulated_exit):
        assert torch.equal(run(m, x, pol).logits, run(m, x.float(), pol).logits)
