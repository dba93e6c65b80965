import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metadyn.core.backbones.resnet import resnet_exits, tiny_resnet_exits
from metadyn.core.flops import exit_costs
from metadyn.core.gating import (
    BlockDropNet,
    Curriculum,
    GatedOutput,
    GatedResNet,
    PolicyNet,
    bernoulli_log_prob,
    blockdrop_loss,
    blockdrop_reward,
    bound_probs,
    curriculum_forced,
    execution,
    gated_ce,
    gated_costs,
    policy_counts,
    reinforce_loss,
    skip_block,
    skipnet_loss,
    skipnet_returns,
)
from metadyn.core.inference import prepare_for_inference
from metadyn.core.outputs import ExitOutput
from metadyn.core.train import fit, load_checkpoint
from metadyn.errors import InputError
from metadyn.registry import METHODS

# ----------------------------------------------------------------------------- rewards and losses (hand-computed)


def test_skipnet_returns_hand_computed():
    actions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    loss = torch.tensor([0.5, 1.0])
    r = skipnet_returns(actions, loss, alpha=0.3)  # alpha / N = 0.1
    # row 0 skips blocks 1, 2: reward-to-go 2, 2, 1; row 1 skips block 0 only: 1, 0, 0
    assert torch.allclose(r, torch.tensor([[-0.3, -0.3, -0.4], [-0.9, -1.0, -1.0]]))


def test_reinforce_loss_value_and_gradient():
    p = torch.tensor([[0.8, 0.3], [0.5, 0.9]], requires_grad=True)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    adv = torch.tensor([2.0, -1.0])
    lp = bernoulli_log_prob(p, a)
    expected = -((torch.log(torch.tensor(0.8)) + torch.log(torch.tensor(0.7))) * 2.0
                 + (torch.log(torch.tensor(0.5)) + torch.log(torch.tensor(0.9))) * -1.0) / 2
    value = reinforce_loss(lp, adv)
    assert torch.allclose(value, expected)
    value.backward()
    # d/dp of -(1/B) A log p (a=1) is -A / (B p); of -(1/B) A log(1-p) (a=0) is A / (B (1-p))
    grad = torch.tensor([[-2.0 / (2 * 0.8), 2.0 / (2 * 0.7)], [-1.0 / (2 * 0.5), 1.0 / (2 * 0.9)]])
    assert torch.allclose(p.grad, grad)
    # masked decisions contribute nothing
    masked = reinforce_loss(bernoulli_log_prob(p, a), adv, torch.tensor([False, True]))
    assert torch.allclose(masked, -(torch.log(torch.tensor(0.7)) * 2.0 + torch.log(torch.tensor(0.9)) * -1.0) / 2)


def test_skipnet_loss_hand_computed():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 0])
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.4]])
    actions = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    out = GatedOutput(logits, probs, actions)
    ce = F.cross_entropy(logits, y, reduction="none")
    alpha = 0.4  # alpha / N = 0.2
    r = torch.stack([-ce[0] + 0.2 * torch.tensor([1.0, 1.0]), -ce[1] + 0.2 * torch.tensor([2.0, 1.0])])
    lp = torch.log(torch.tensor([[0.9, 0.8], [0.4, 0.6]]))
    expected = ce.mean() - (lp * r).sum(1).mean()
    assert torch.allclose(skipnet_loss(alpha)(out, y), expected)


def test_blockdrop_reward_hand_computed():
    logits = torch.tensor([[3.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1])
    actions = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    r = blockdrop_reward(logits, y, actions, gamma=2.0)
    assert torch.allclose(r, torch.tensor([1 - 0.5**2, -2.0, 0.0]))


def test_blockdrop_loss_self_critical_and_curriculum_mask():
    y = torch.tensor([0, 0])
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # sampled: right, wrong
    base_logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # greedy: right, right
    actions = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    base_actions = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    probs = torch.tensor([[0.7, 0.4, 0.2], [0.6, 0.5, 0.3]])
    learn = torch.tensor([False, True, True])
    out = GatedOutput(logits, probs, actions, base_logits, base_actions, learn)
    gamma = 1.5
    adv = torch.tensor([(1 - (1 / 3) ** 2) - 0.0, -gamma - (1 - (2 / 3) ** 2)])
    lp = torch.log(torch.tensor([[0.7, 0.6, 0.8], [0.6, 0.5, 0.7]]))
    expected = -((lp[:, 1:] * adv[:, None]).sum(1)).mean()
    assert torch.allclose(blockdrop_loss(gamma, entropy=0.0)(out, y), expected)
    joint = blockdrop_loss(gamma, joint=True, entropy=0.0)(out, y)
    assert torch.allclose(joint, expected + F.cross_entropy(logits, y))
    # the released curriculum code's entropy bonus: beta * sum over all blocks of -p log p, per sample
    ent = -(probs * torch.log(probs)).sum(1).mean()
    assert torch.allclose(blockdrop_loss(gamma)(out, y), expected - 0.1 * ent)
    with pytest.raises(InputError, match="sample"):
        blockdrop_loss(gamma)(GatedOutput(logits, probs, actions), y)
    with pytest.raises(InputError, match="entropy"):
        blockdrop_loss(gamma, entropy=-0.1)


def test_blockdrop_curriculum_loss_equals_the_released_code():
    """Value and policy-network gradient against a port of ``train()`` in Tushar-N/blockdrop's cl_training.py
    (reward, self-critical advantage, curriculum mask, entropy bonus with beta = 0.1, division by the batch)."""
    from torch.distributions import Bernoulli

    g = torch.Generator().manual_seed(0)
    b, k, cl_step, alpha, beta, penalty = 6, 5, 2, 0.8, 0.1, -1.0
    raw = torch.rand(b, k, generator=g, dtype=torch.float64)
    y = torch.randint(3, (b,), generator=g)
    preds_sample, preds_map = torch.randn(b, 3, generator=g), torch.randn(b, 3, generator=g)
    policy_map = (raw >= 0.5).double()
    policy_map[:, :-cl_step] = 1
    policy = torch.bernoulli(torch.full((b, k), 0.5, dtype=torch.float64), generator=g)
    policy[:, :-cl_step] = 1

    def get_reward(preds, policy_):
        reward = 1.0 - (policy_.sum(1) / policy_.size(1)) ** 2
        reward[preds.argmax(1) != y] = penalty
        return reward.unsqueeze(1)

    s_ref = raw.clone().requires_grad_(True)
    probs = s_ref * alpha + (1 - s_ref) * (1 - alpha)
    advantage = get_reward(preds_sample, policy) - get_reward(preds_map, policy_map)
    mask = torch.ones(b, k, dtype=torch.float64)
    mask[:, :-cl_step] = 0
    loss = (mask * (-Bernoulli(probs).log_prob(policy) * advantage.expand_as(policy))).sum()
    probs = probs.clamp(1e-15, 1 - 1e-15)
    ref = (loss - beta * (-probs * torch.log(probs)).sum()) / b
    ref.backward()

    s_ours = raw.clone().requires_grad_(True)
    learn = torch.zeros(k, dtype=torch.bool)
    learn[-cl_step:] = True
    out = GatedOutput(preds_sample, bound_probs(s_ours, alpha), policy, preds_map, policy_map, learn)
    ours = blockdrop_loss(-penalty)(out, y)
    ours.backward()
    assert torch.allclose(ours, ref, rtol=1e-10) and torch.allclose(s_ours.grad, s_ref.grad, rtol=1e-9)


def test_bound_probs():
    s = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(bound_probs(s, 0.8), torch.tensor([0.2, 0.5, 0.8]))


def test_curriculum_keeps_first_k_minus_t_blocks_on():
    assert curriculum_forced(5, 2).tolist() == [True, True, True, False, False]
    assert curriculum_forced(5, 1).tolist() == [True, True, True, True, False]
    assert not curriculum_forced(5, 5).any() and not curriculum_forced(5, 9).any()
    net = _blockdrop().train()
    net.mode = "sample"
    k = net.num_blocks
    x = torch.randn(64, 1, 8, 8, dtype=torch.float64)
    for t in range(1, k + 1):
        net.learn_last = t
        out = net(x)
        assert (out.actions[:, : k - t] == 1).all() and (out.baseline_actions[:, : k - t] == 1).all()
        assert out.learn.tolist() == [False] * (k - t) + [True] * t
    assert (out.actions == 0).any()  # with every block learnt, the sampled policy does drop blocks


def test_curriculum_callback_steps_with_epochs():
    net = _blockdrop()
    net.freeze_backbone()
    net.mode = "sample"
    seen = []

    class Spy(Curriculum):
        def on_epoch_start(self, state):
            super().on_epoch_start(state)
            seen.append(self.net.learn_last)

    x, y = torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (32,))
    before = [p.clone() for p in net.backbone.parameters()]
    fit(net, (x, y), loss=blockdrop_loss(1.0), epochs=3, batch_size=16, lr=1e-3, optimizer="adam", device="cpu",
        callbacks=[Spy(net)], progress=False)
    assert seen == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(before, net.backbone.parameters()))  # frozen ResNet
    assert not net.backbone.training


# ----------------------------------------------------------------------------- networks


def _trained_like(m):
    m = m.double().train()
    with torch.no_grad():  # BatchNorm statistics somewhere non-trivial
        m(torch.randn(64, 1, 8, 8, dtype=torch.float64) * 2 + 0.5)
    return m.eval()


def _gated(gate="ff"):
    torch.manual_seed(0)
    net = GatedResNet(resnet_exits((1, 8, 8), 5, depth=14, exits=(6,), width=4), gate=gate)
    net = _trained_like(net)
    last = net.gate.fcs if gate == "ff" else [net.gate.proj]
    x = torch.randn(200, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():  # centre the gate logits so that about half the decisions are "on"
        if gate == "ff":
            h = net.backbone.stem(x)
            for i, block in enumerate(net.backbone.blocks):
                last[i].bias -= torch.median(net.gate(i, h, None)[0])
                h = block(h)
        else:
            last[0].bias -= torch.median(torch.logit(net(x).probs))
    return net


def _blockdrop():
    torch.manual_seed(0)
    bb = resnet_exits((1, 8, 8), 5, depth=14, exits=(6,), width=4)
    return _trained_like(BlockDropNet(bb, PolicyNet((1, 8, 8), 6, width=4, downsample=2)))


@pytest.mark.parametrize("gate", ["ff", "rnn"])
def test_skipping_on_a_batch_equals_each_sample_alone(gate):
    net = _gated(gate)
    x = torch.randn(24, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        batch = net(x)
        alone = [net(x[n : n + 1]) for n in range(len(x))]
    assert torch.equal(batch.actions, torch.cat([a.actions for a in alone]))
    assert torch.allclose(batch.logits, torch.cat([a.logits for a in alone]), atol=1e-5, rtol=0)
    on = batch.actions.mean(0)
    assert ((on > 0) & (on < 1)).sum() >= 3  # several blocks really see a strict subset of the batch
    assert len(policy_counts(batch.actions)) > 5  # per-sample policies differ
    masked = net(x)  # autograd on: every block on every sample, mixed by the gate
    assert torch.equal(masked.actions, batch.actions)
    assert torch.allclose(masked.logits, batch.logits, atol=1e-10)


def test_blockdrop_skipping_equals_each_sample_alone():
    net = _blockdrop()
    with torch.no_grad():  # centre the policy so that about half the blocks are kept
        s = net.policy(torch.randn(200, 1, 8, 8, dtype=torch.float64))
        net.policy.net.heads[-1].fc.bias -= torch.logit(torch.median(s, 0)[0])
    x = torch.randn(24, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        batch = net(x)
        alone = [net(x[n : n + 1]) for n in range(len(x))]
    assert torch.equal(batch.actions, torch.cat([a.actions for a in alone]))
    assert torch.allclose(batch.logits, torch.cat([a.logits for a in alone]), atol=1e-5, rtol=0)
    assert len(policy_counts(batch.actions)) > 5
    assert torch.allclose(net(x).logits, batch.logits, atol=1e-10)  # masked (autograd on) agrees


@pytest.mark.parametrize("gate", ["ff", "rnn"])
def test_always_on_gate_reproduces_the_ungated_network(gate):
    net = _gated(gate)
    with torch.no_grad():
        for fc in net.gate.fcs if gate == "ff" else [net.gate.proj]:
            fc.bias.fill_(50.0)
    x = torch.randn(30, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = net(x)
        ref = net.backbone.forward_final(x)
    assert (out.actions == 1).all()
    assert torch.equal(out.logits, ref)
    assert torch.equal(net(x).logits, ref)  # the training-time (masked) path too


def test_blockdrop_always_on_policy_reproduces_the_ungated_network():
    net = _blockdrop()
    with torch.no_grad():
        net.policy.net.heads[-1].fc.bias.fill_(50.0)
        x = torch.randn(30, 1, 8, 8, dtype=torch.float64)
        assert torch.equal(net(x).logits, net.backbone.forward_final(x))


def test_skip_block_runs_only_on_gated_samples_and_keeps_layout():
    net = _trained_like(tiny_resnet_exits(num_classes=5))
    seen = []
    for b in (0, 1):  # block 1 downsamples (stride 2, option-A shortcut)
        block = net.blocks[b]
        block.residual.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
        x = torch.randn(10, block.residual[0].in_channels, 8 // (b + 1), 8 // (b + 1),
                        dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        keep = x.clone()
        on = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
        seen.clear()
        with torch.no_grad():
            out = skip_block(block, x, on)
            assert seen == [4]
            assert torch.equal(x, keep)  # not inplace: the input is untouched
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert torch.allclose(out[on], block(x[on]), atol=1e-12)
            assert torch.equal(out[~on], block.shortcut(x)[~on])
            assert torch.equal(skip_block(block, x, torch.zeros(10, dtype=torch.bool)), block.shortcut(x))
            assert torch.equal(skip_block(block, x, torch.ones(10, dtype=torch.bool)), block(x))


def test_prepared_gated_network_matches():
    net = _gated("ff")
    fast = prepare_for_inference(net)
    x = torch.randn(20, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a, b = net(x), fast(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(a.actions, b.actions) and torch.allclose(a.logits, b.logits, atol=1e-8)


def test_relaxed_gates_get_straight_through_gradients_and_sampled_ones_reinforce():
    net = _gated("ff").train()
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (16,))
    net.mode = "relaxed"
    out = net(x)
    assert set(out.actions.detach().unique().tolist()) <= {0.0, 1.0}
    gated_ce(out, y).backward()
    assert all(fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0 for fc in net.gate.fcs)
    net.zero_grad()
    net.mode = "sample"
    F.cross_entropy(net(x).logits, y).backward()  # sampled decisions are constants: no gradient to the gates
    assert all(fc.weight.grad is None or fc.weight.grad.abs().sum() == 0 for fc in net.gate.fcs)
    skipnet_loss(0.5)(net(x), y).backward()
    assert all(fc.weight.grad.abs().sum() > 0 for fc in net.gate.fcs)


def test_gated_costs():
    net = _gated("rnn")
    costs = gated_costs(net, (1, 8, 8))
    full = exit_costs(net.backbone, (1, 8, 8)).full
    assert sum(costs.blocks) < full and costs.fixed > full - sum(costs.blocks)  # the gates cost something
    assert costs.full - full == costs.fixed - (full - sum(costs.blocks))
    acts = torch.tensor([[1.0] * 6, [0.0] * 6, [1, 0, 1, 0, 1, 0]])
    m = costs.mflops(acts)
    assert torch.allclose(m, torch.tensor([costs.full, costs.fixed, costs.fixed + sum(costs.blocks[::2])],
                                          dtype=torch.float64) / 1e6)
    bd = _blockdrop()
    assert gated_costs(bd, (1, 8, 8)).fixed > full - sum(costs.blocks)  # the policy network is counted


def test_policy_counts():
    acts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    assert policy_counts(acts) == [("10", 2), ("00", 1), ("11", 1)]


def test_bad_input():
    bb = tiny_resnet_exits()
    with pytest.raises(InputError, match="unknown gate 'lstm'"):
        GatedResNet(bb, gate="lstm")
    with pytest.raises(InputError, match="Linear cannot be gated, it lacks stem, exit, num_exits"):
        GatedResNet(torch.nn.Linear(2, 2))
    net = GatedResNet(bb)
    with pytest.raises(InputError, match="unknown gate mode"):
        net.mode = "soft"
    with pytest.raises(InputError, match="downsample"):
        PolicyNet((1, 8, 8), 3, downsample=16)
    bd = BlockDropNet(bb, PolicyNet((1, 8, 8), 3))
    with pytest.raises(InputError, match="no relaxed mode"):
        bd.mode = "relaxed"
    with pytest.raises(InputError, match="alpha"):
        BlockDropNet(bb, PolicyNet((1, 8, 8), 3), alpha=0.2)


# ----------------------------------------------------------------------------- the gated-backbone contract


class Residual(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.in_channels = c
        self.body = nn.Conv2d(c, c, 3, padding=1)
        if shortcut:
            self.shortcut = nn.Identity()

    def forward(self, x):
        return x + self.body(x)


class Plain(nn.Module):
    """Not a ResNetExits: a stem, residual blocks and a head, as the contract asks."""

    num_exits = 1

    def __init__(self, shortcut: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.blocks = nn.ModuleList(Residual(4, shortcut) for _ in range(3))
        self.fc = nn.Linear(4, 5)

    def stem(self, x):
        return self.conv(x)

    def exit(self, i, h):
        f = h.mean(dim=(2, 3))
        return self.fc(f), f

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.exit(0, h)[0]


def test_any_network_with_the_contract_can_be_gated():
    torch.manual_seed(0)
    bb = Plain().eval()
    net = GatedResNet(bb).eval()
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        for fc in net.gate.fcs:
            fc.bias.fill_(50.0)
        assert torch.equal(net(x).logits, bb(x))  # always on: the backbone
        for fc in net.gate.fcs:
            fc.bias.fill_(-50.0)
        skipped = net(x)
        assert (skipped.actions == 0).all() and torch.equal(skipped.logits, bb.exit(0, bb.stem(x))[0])
    bd = BlockDropNet(bb, PolicyNet((1, 8, 8), 3, width=4))
    assert bd.run_policy(x, torch.ones(6, 3)).shape == (6, 5)
    costs = gated_costs(net, (1, 8, 8))
    assert len(costs.blocks) == 3 and costs.blocks[0] > 0
    with pytest.raises(InputError, match=r"Plain cannot be gated, it lacks blocks\[0\].shortcut"):
        GatedResNet(Plain(shortcut=False))


def test_the_losses_are_registered_methods():
    assert METHODS.get("skipnet") is skipnet_loss and METHODS.get("blockdrop") is blockdrop_loss
    out = ExitOutput([torch.zeros(2, 3)], [torch.zeros(2, 3)])
    with pytest.raises(InputError, match="GatedResNet"):
        METHODS.get("skipnet")(alpha=0.2)(out, torch.zeros(2, dtype=torch.long))
    with pytest.raises(InputError, match="BlockDropNet"):
        METHODS.get("blockdrop")(gamma=1.0, joint=True)(out, torch.zeros(2, dtype=torch.long))


def test_frozen_backbone_stays_frozen_in_a_copy_and_thaws():
    net = _blockdrop()
    net.freeze_backbone()
    twin = copy.deepcopy(net).train()
    assert twin.frozen and not twin.backbone.training and twin.policy.training
    net.freeze_backbone(False)
    assert not net.frozen and all(p.requires_grad for p in net.backbone.parameters())
    net.train()
    assert net.backbone.training


def test_curriculum_state_is_restored_on_resume(tmp_path):
    x, y = torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 5, (32,))
    ck = tmp_path / "curriculum.pt"
    runs = []
    for _ in range(2):  # the second run finds the finished checkpoint: no epoch runs, the state comes back
        net = _blockdrop().freeze_backbone()
        net.mode = "sample"
        fit(net, (x, y), loss=blockdrop_loss(1.0), epochs=2, batch_size=16, lr=1e-3, optimizer="adam", device="cpu",
            callbacks=[Curriculum(net)], checkpoint=ck, progress=False)
        runs.append(net.learn_last)
    assert runs == [2, 2]
    assert load_checkpoint(ck)["callbacks"] == [{"learn_last": 2}]


@pytest.mark.parametrize("distinct", [2, 5, 24])
def test_grouped_blockdrop_execution_equals_masked_and_each_sample_alone(distinct):
    """Samples sorted by policy and run in slices (few distinct policies) or gathered (many): the same logits
    as every block on every sample mixed by the decisions, and as each sample alone, in the batch's order."""
    torch.manual_seed(distinct)
    net = _blockdrop()
    bb = net.backbone
    k = len(bb.blocks)
    policies = (torch.rand(distinct, k) < 0.5).double()
    policies[0] = 1.0  # the always-on policy is one of them
    actions = policies[torch.randint(0, distinct, (24,))]
    x = torch.randn(24, 1, 8, 8, dtype=torch.float64)
    plan = execution.skip_schedule(actions, min_run=4)
    kinds = {kind for kind, _ in plan.steps}
    assert sorted(plan.order.tolist()) == list(range(24))
    if distinct <= 5:
        assert "runs" in kinds  # grouped: slices of the sorted batch
    else:
        assert "rows" in kinds  # scattered decisions: gathered samples
    with torch.no_grad():
        grouped = net.run_policy(x, actions)
        alone = torch.cat([net.run_policy(x[n : n + 1], actions[n : n + 1]) for n in range(24)])
    masked = net.run_policy(x, actions)  # autograd on: the training path
    assert torch.allclose(grouped, masked, atol=1e-10, rtol=0)
    assert torch.allclose(grouped, alone, atol=1e-10, rtol=0)


def test_skip_schedule_sorts_by_policy_and_plans_slices():
    actions = torch.tensor([[0, 1], [1, 0], [1, 1], [0, 1], [1, 1]], dtype=torch.float64)
    plan = execution.skip_schedule(actions, min_run=1)
    assert actions[plan.order].tolist() == [[1, 1], [1, 1], [1, 0], [0, 1], [0, 1]]
    assert plan.steps[0] == ("runs", [(0, 3)]) and plan.steps[1] == ("runs", [(0, 2), (3, 5)])
    plan = execution.skip_schedule(actions, min_run=3)  # block 1: 4 samples in 2 slices < 3 each
    assert plan.steps[1][0] == "rows" and plan.steps[1][1].tolist() == [0, 1, 3, 4]
    ones = execution.skip_schedule(torch.ones(3, 2))
    assert ones.steps == [("all", None), ("all", None)]
    assert execution.skip_schedule(torch.zeros(3, 2)).steps == [("none", None), ("none", None)]


def test_row_gather_and_scatter_keep_layout_and_values():
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64)
    idx = torch.tensor([0, 2, 5])
    for t in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, ::2]):  # the last: a strided view
        got = execution.take_rows(t, idx)
        assert torch.equal(got, t[idx]) and got.stride() == t[idx].stride()
        out = torch.zeros_like(t)
        execution.put_rows(out, idx, t[idx])
        ref = torch.zeros_like(t)
        ref[idx] = t[idx]
        assert torch.equal(out, ref)


def test_real_skipping_never_writes_over_the_callers_input():
    """A gateable backbone may return its input from ``stem`` (an identity stem); SkipNet's real skipping wrote the
    skipped blocks' shortcut into that tensor in place, so the caller's batch changed."""
    net = _gated("ff")
    net.backbone.stem = lambda x: x  # identity stem: the blocks read the input itself (4 channels)
    x = torch.randn(24, 4, 8, 8, dtype=torch.float64)
    x0 = x.clone()
    with torch.no_grad():
        net.gate.fcs[0].bias -= torch.median(net.gate(0, x, None)[0])  # the first block runs on half the batch
        out = net(x)
    assert 0 < float(out.actions[:, 0].mean()) < 1  # so it writes into its input on some rows
    assert torch.equal(x, x0)
    assert torch.allclose(out.logits, net(x0.clone()).logits, atol=1e-10)  # the mixed path (autograd on) agrees
