import copy

import pytest
import torch

from metadyn.attention import (
    AttentiveExits,
    NotDeployableError,
    add_detachable,
    detachable_loss,
    exit_mflops,
    prune_later,
    prune_saturated,
    transfer_distances,
)
from metadyn.core.backbones.mlp import tiny_mlp_exits
from metadyn.core.backbones.resnet import tiny_resnet_exits
from metadyn.core.flops import count_flops, exit_costs
from metadyn.core.inference import dynamic_exit, simulated_exit
from metadyn.core.policies import ThresholdPolicy, policy_scores
from metadyn.core.train import fit
from metadyn.errors import InputError

SHAPE = (1, 8, 8)


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *SHAPE, generator=g)
    y = (x[:, 0, :4, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 4:, 4:].mean((1, 2)) > 0).long()
    return x, y


def _net(attention):
    torch.manual_seed(0)
    return AttentiveExits(tiny_resnet_exits(SHAPE, num_classes=4), SHAPE, attention)


def _stage2():
    m = _net("later")
    fit(m, _data(), epochs=1, batch_size=32, device="cpu", progress=False)
    return add_detachable(m)


def test_every_variant_gives_all_exits_and_none_is_the_backbone():
    x, _ = _data(8)
    base = tiny_resnet_exits(SHAPE, num_classes=4)
    wrapped = AttentiveExits(copy.deepcopy(base), SHAPE, "none").eval()
    assert all(torch.equal(a, b) for a, b in zip(wrapped(x).logits, base.eval()(x).logits))
    for attention in ("own", "later"):
        out = _net(attention)(x)
        assert len(out.logits) == 3 and out.logits[0].shape == (8, 4)


def test_later_variant_is_flagged_not_deployable_and_charged_for_the_later_stage():
    m = _net("later").eval()
    assert not m.deployable
    with pytest.raises(NotDeployableError, match="prune_later"):
        dynamic_exit(m, _data(8)[0], ThresholdPolicy([0.0, 0.0, 0.0]))
    with pytest.raises(InputError):
        exit_costs(m, SHAPE)
    static = exit_costs(_net("none"), SHAPE).full / 1e6
    mf = exit_mflops(m, SHAPE)
    assert mf[0] > static and mf[0] < mf[1] < mf[2]  # every exit needs the final stage (source: final)
    nxt = AttentiveExits(tiny_resnet_exits(SHAPE, num_classes=4), SHAPE, "later", source="next")
    assert exit_mflops(nxt, SHAPE)[0] < static  # exit 0 reads stage 1 only


def test_pruning_removes_the_later_modules_and_their_flops():
    m = _stage2().eval()
    x = torch.zeros(1, *SHAPE)
    states, s = [], m.stem(x)
    for i in range(m.num_exits):
        s = m.stage(i, s)
        states.append(s)
    later_cost = sum(count_flops(m.later_mask, i, states) for i in range(m.num_exits - 1))
    assert later_cost > 0
    before_forward = count_flops(m, x)
    before_exits = exit_costs(m, SHAPE).cumulative  # deployable already: exits read their own modules
    prune_later(m)
    assert not any(n.startswith("later") for n, _ in m.named_modules())
    assert not any(k.startswith("later") for k in m.state_dict())
    assert count_flops(m, x) == before_forward - later_cost
    assert exit_costs(m, SHAPE).cumulative == before_exits


def test_detachable_model_runs_dynamic_exit_like_picking_from_the_full_forward():
    m = prune_later(_stage2()).eval()
    x, _ = _data(64)
    with torch.no_grad():
        scores = policy_scores(m(x).logits)
    policy = ThresholdPolicy([float(scores[0].quantile(0.6)), float(scores[1].quantile(0.5)), 0.0])
    dyn, ref = dynamic_exit(m, x, policy), simulated_exit(m, x, policy)
    assert torch.equal(dyn.exit_idx, ref.exit_idx)
    assert torch.allclose(dyn.logits, ref.logits, atol=1e-5)
    assert len(torch.unique(dyn.exit_idx)) == 3


def test_stage_two_trains_only_the_detachable_modules_and_heads_and_pulls_attention_closer():
    m = _stage2()
    frozen = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith(("own", "base.heads.0",
                                                                                     "base.heads.1"))}
    own0 = {k: v.clone() for k, v in m.own.state_dict().items()}
    x, y = _data()
    before = transfer_distances(m, x)
    loss = detachable_loss(beta=20.0)
    state = fit(m, (x, y), loss=loss, epochs=20, batch_size=16, lr=0.01, device="cpu", progress=False)
    after = m.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # trunk, BN statistics, later, final head
    assert any(not torch.equal(v, m.own.state_dict()[k]) for k, v in own0.items())
    assert state.history[-1]["loss"] < state.history[0]["loss"]
    assert sum(transfer_distances(m, x)) < sum(before)  # eval mode: BatchNorm statistics needed the 80 steps


def test_detachable_loss_needs_the_pairs_unless_beta_is_zero():
    x, y = _data(8)
    out = _net("own")(x)
    assert detachable_loss(beta=0.0)(out, y) > 0
    with pytest.raises(InputError, match="add_detachable"):
        detachable_loss(beta=1.0)(out, y)
    with pytest.raises(InputError):
        add_detachable(_net("own"))


def test_a_mask_that_is_one_everywhere_is_removed_with_logits_changing_below_1e4():
    m = _net("own").eval()
    bn = m.own["0"].up[1]
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.fill_(14.0)  # mask = sigmoid(14) = 1 - 8e-7 at every position and channel
    x, _ = _data(32)
    with torch.no_grad():
        before = m(x).logits
    assert prune_saturated(m, x, tol=1e-7) == []  # not within this tolerance
    assert prune_saturated(m, x, tol=1e-5, atol=1e-12) == []  # the logits check puts it back
    assert "own.0" in dict(m.named_modules())
    assert prune_saturated(m, x, tol=1e-5) == ["own.0"]
    names = dict(m.named_modules())
    assert "own.0" not in names and "own.1" in names
    with torch.no_grad():
        after = m(x).logits
    assert max(float((a - b).abs().max()) for a, b in zip(after, before)) < 1e-4
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])
    assert exit_costs(m, SHAPE).heads[0] < exit_costs(_net("own"), SHAPE).heads[0]


def test_bad_inputs_are_input_errors():
    with pytest.raises(InputError, match="feature map"):
        AttentiveExits(tiny_mlp_exits(), SHAPE, "own")
    with pytest.raises(InputError, match="attention"):
        _net("sideways")
    with pytest.raises(InputError, match="source"):
        AttentiveExits(tiny_resnet_exits(SHAPE, num_classes=4), SHAPE, "later", source="previous")
