import pytest
import torch

from metadyn.core.backbones.msdnet import MSDLayer, Transition, msdnet, msdnet_steps, tiny_msdnet
from metadyn.core.flops import exit_costs
from metadyn.core.inference import dynamic_exit, prepare_for_inference, simulated_exit
from metadyn.core.policies import ThresholdPolicy, fit_thresholds, geometric_fractions, policy_scores
from metadyn.errors import InputError
from metadyn.registry import BACKBONES


def _trained_like(m, shape=(1, 8, 8)):
    m = m.double().train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        m(torch.randn(64, *shape, dtype=torch.float64) * 2 + 0.5)
    return m.eval()


def _small(**kw):
    return msdnet((1, 8, 8), 5, **{**dict(blocks=4, step=1, base=1, channels=4, growth=2, head_channels=8), **kw})


def test_steps_even_and_lin_grow():
    assert msdnet_steps(4, "even", 2, 4) == [4, 2, 2, 2]
    assert msdnet_steps(4, "lin_grow", 1, 1) == [1, 2, 3, 4]
    assert msdnet_steps(3, "lin_grow", 2, 3) == [3, 3, 5]
    m = msdnet((1, 8, 8), 5, blocks=3, stepmode="lin_grow", step=1, base=1, channels=4, growth=2, head_channels=8)
    assert [sum(isinstance(x, MSDLayer) for x in b) for b in m.blocks] == [1, 2, 3] == m.steps
    with pytest.raises(InputError, match="stepmode"):
        msdnet_steps(3, "linear", 1, 1)
    with pytest.raises(InputError, match="even"):
        msdnet((1, 8, 8), 5, growth=3, gr_factor=(1, 1, 2))
    assert BACKBONES.get("msdnet") is msdnet


def test_cifar_configuration_drops_scales_like_the_released_code():
    m = msdnet()  # 10 blocks: 4 + 9 * 2 = 22 layers on 3 scales; interval ceil(22 / 3) = 8
    layers = [x for b in m.blocks for x in b if isinstance(x, MSDLayer)]
    assert len(layers) == 22 and m.num_exits == 10
    out_scales = [3 - x.offset for x in layers]
    assert out_scales == [3] * 8 + [2] * 8 + [1] * 6  # layers 9 and 17 drop the finest scale
    assert sum(isinstance(x, Transition) for b in m.blocks for x in b) == 2
    with torch.no_grad():
        s = m.stem(torch.zeros(2, 3, 32, 32))
        assert [t.shape[-1] for t in s] == [32, 16, 8]
        assert [t.shape[1] for t in s] == [16, 32, 64]  # nChannels * grFactor
        for i in range(m.num_exits):
            s = m.stage(i, s)
        assert len(s) == 1 and s[0].shape[-1] == 8  # only the coarsest scale is left


def test_state_is_dense_per_scale():
    m = _trained_like(_small())
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        s0 = m.stem(x)
        s1 = m.stage(0, s0)  # layer 1 keeps all 3 scales and has no transition
    assert [a.shape[1] + 2 * g for a, g in zip(s0, (1, 2, 4))] == [b.shape[1] for b in s1]
    for a, b in zip(s0, s1):  # each scale's old features are carried over verbatim (dense connectivity)
        assert torch.equal(b[:, : a.shape[1]], a)


@pytest.mark.parametrize("build", [tiny_msdnet, lambda **kw: _small(stepmode="lin_grow")])
@pytest.mark.parametrize("p", [0.3, 1.0, 3.0])
def test_dynamic_exit_equals_picking_from_full_forward(build, p):
    m = _trained_like(build())
    x_val, x = torch.randn(200, 1, 8, 8, dtype=torch.float64), torch.randn(300, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        t = fit_thresholds(policy_scores(m(x_val).logits), geometric_fractions(p, m.num_exits))
    policy = ThresholdPolicy(t.tolist())
    ref, dyn = simulated_exit(m, x, policy), dynamic_exit(m, x, policy)
    assert torch.equal(dyn.exit_idx, ref.exit_idx)
    assert torch.allclose(dyn.logits, ref.logits, rtol=0, atol=1e-12)
    assert len(torch.unique(dyn.exit_idx)) > 1


def test_forward_equals_stage_by_stage_and_final():
    m = _trained_like(tiny_msdnet())
    x = torch.randn(7, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = m(x)
        state, xs = x, []
        for conv in m.first:  # the released code's layout: the first layer, then block by block
            state = conv(state)
            xs.append(state)
        for i, block in enumerate(m.blocks):
            for layer in block:
                xs = layer(xs)
            logits, feats = m.heads[i](xs[-1])
            assert torch.equal(logits, out.logits[i]) and torch.equal(feats, out.features[i])
        assert torch.equal(m.forward_final(x), out.logits[-1])
    assert out.features[0].shape == (7, 8)


def test_inference_copy_and_costs():
    m = _trained_like(_small())
    x = torch.randn(40, 1, 8, 8, dtype=torch.float64)
    fast = prepare_for_inference(m)  # BatchNorm folded, channels-last, on a list-of-scales State
    pol = ThresholdPolicy([0.5, 0.5, 0.5, 0.0])
    a = dynamic_exit(m, x, pol)
    b = dynamic_exit(fast, x.contiguous(memory_format=torch.channels_last), pol, micro_batch=16)
    assert torch.equal(a.exit_idx, b.exit_idx) and torch.allclose(a.logits, b.logits, atol=1e-9)
    c = exit_costs(m, (1, 8, 8))
    assert all(u < v for u, v in zip(c.cumulative, c.cumulative[1:]))
    assert c.full < c.cumulative[-1]  # the static network skips the early classifiers
