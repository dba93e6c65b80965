"""attach_exits: exits on a traced static network, run stage by stage without changing its output."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metadyn.core.backbones.attach import AttachedExits, CutPoint, attach_exits, list_cut_points
from metadyn.core.backbones.base import index_state
from metadyn.core.flops import exit_costs
from metadyn.errors import InputError


class Block(nn.Module):
    """A residual block (one ReLU module called twice, as in torchvision's BasicBlock)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class TinyNet(nn.Module):
    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer2 = Block(16)
        self.unused = nn.Linear(2, 2)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        b = x.size(0)  # a shape used after every cut: recomputed in the last stage, never carried
        h = self.layer2(self.down(self.layer1(self.stem(x))))
        h = h.mean(dim=(2, 3)).reshape(b, -1)  # (B, 16)
        return self.fc(h)


def tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    for m in model.modules():  # non-trivial BatchNorm statistics, so eval mode matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def batch(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def attach(model, at=("layer1", "layer2"), **kw) -> AttachedExits:
    return attach_exits(model, list(at), example_input=batch(1), **kw)


def test_final_exit_is_the_static_output_bit_for_bit():
    model = tiny()
    net = attach(model).eval()
    x = batch()
    out = net(x)
    assert net.num_exits == 3 and out.num_exits == 3
    assert net.exit_names == ["layer1", "layer2", "output"]
    assert all(lg.shape == (6, 5) for lg in out.logits)
    with torch.no_grad():
        assert torch.equal(out.logits[-1], model(x))
        assert torch.equal(net.forward_final(x), model(x))


def test_final_features_are_the_input_of_the_last_linear():
    model = tiny()
    net = attach(model).eval()
    seen = []
    model.fc.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x = batch()
    out = net(x)
    assert torch.equal(out.features[-1], seen[-1]) and out.features[-1].shape == (6, 16)


def test_exit_order_follows_execution_not_the_list():
    net = attach(tiny(), at=["layer2", "down.0", "layer1"])
    assert net.exit_names == ["layer1", "down.0", "layer2", "output"]
    assert [h.fc.in_features for h in net.heads] == [8, 16, 16]


@pytest.mark.parametrize("at", [("layer1", "layer2"), ("layer1.conv1", "layer2.bn2")])
def test_stage_by_stage_and_sub_batch_match_forward(at):
    net = attach(tiny(), at=at).eval()
    x = batch()
    with torch.no_grad():
        full = net(x)
        state = net.stem(x)
        for i in range(net.num_exits):
            state = net.stage(i, state)
            lg, ft = net.exit(i, state)
            torch.testing.assert_close(lg, full.logits[i], atol=1e-6, rtol=0)
            torch.testing.assert_close(ft, full.features[i], atol=1e-6, rtol=0)

        idx = torch.tensor([1, 4, 5])
        state = net.stage(0, net.stem(x))
        state = index_state(state, idx)
        for i in range(1, net.num_exits):
            state = net.stage(i, state)
            lg, _ = net.exit(i, state)
            torch.testing.assert_close(lg, full.logits[i][idx], atol=1e-6, rtol=0)


def test_cut_inside_a_residual_block_carries_the_identity():
    model = tiny()
    net = attach(model, at=["layer1.conv1"]).eval()
    x = batch()
    with torch.no_grad():
        identity = model.stem(x)
        state = net.stage(0, net.stem(x))
        assert isinstance(state, tuple)
        assert torch.equal(state[-1], model.layer1.conv1(identity))  # the cut activation is last
        assert any(torch.equal(t, identity) for t in state[:-1])  # the block input rides along
        assert torch.equal(net(x).logits[-1], model(x))


def test_a_stage_computes_only_its_part():
    model = tiny()
    net = attach(model).eval()
    calls = []
    model.layer2.conv1.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        net.exit(0, net.stage(0, net.stem(batch())))
    assert calls == []


def test_trunk_is_shared_not_copied():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = attach(model)
    assert net.trunk is model
    assert all(a is b for a, b in zip(net.trunk.parameters(), model.parameters()))
    trunk_ids = {id(p) for p in model.parameters()}
    assert all(id(p) in trunk_ids for seg in net.segments for p in seg.parameters())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert {k.split(".")[0] for k in net.state_dict()} == {"trunk", "heads"}


def test_freeze_keeps_trunk_in_eval_and_bn_statistics_unchanged():
    model = tiny().train()
    net = attach(model)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    net.train()
    assert net.training and all(h.training for h in net.heads)
    assert not any(m.training for m in model.modules())
    net(batch())
    assert all(torch.equal(b, buffers[k]) for k, b in model.named_buffers())
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.requires_grad for p in net.heads.parameters())


def test_backward_through_exit0_trains_only_its_head():
    net = attach(tiny())
    net.train()
    out = net(batch())
    F.cross_entropy(out.logits[0], torch.arange(6) % 5).backward()
    assert all(p.grad is not None for p in net.heads[0].parameters())
    assert all(p.grad is None for p in net.heads[1].parameters())
    assert all(p.grad is None for p in net.trunk.parameters())


def test_unfrozen_trunk_trains():
    model = tiny()
    net = attach(model, freeze=False)
    mean = model.stem[1].running_mean.clone()
    net.train()
    assert model.training
    out = net(batch())
    assert not torch.equal(model.stem[1].running_mean, mean)
    F.cross_entropy(out.logits[-1], torch.arange(6) % 5).backward()
    assert model.fc.weight.grad is not None


def test_custom_head_and_num_classes():
    seen = []

    class Head(nn.Module):
        def __init__(self, c, n):
            super().__init__()
            seen.append((c, n))
            self.fc = nn.Linear(c, n)

        def forward(self, h):
            f = h.amax(dim=(2, 3))
            return self.fc(f), f

    net = attach(tiny(), head=Head, num_classes=3).eval()
    out = net(batch())
    assert seen == [(8, 3), (16, 3)]
    assert [lg.shape[1] for lg in out.logits] == [3, 3, 5]


def test_deepcopy_gets_its_own_trunk():
    model = tiny()
    net = attach(model).eval()
    twin = copy.deepcopy(net)
    x = batch()
    with torch.no_grad():
        assert torch.equal(twin(x).logits[-1], net(x).logits[-1])
        twin.trunk.fc.bias.add_(1.0)
        assert torch.equal(net(x).logits[-1], model(x))
        torch.testing.assert_close(twin(x).logits[-1], model(x) + 1.0)


class WithConstant(nn.Module):
    """Tensors created inside forward and an optional argument specialised to its default."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, scale=None):
        h = self.bn(self.conv(x)) * torch.tensor([2.0])
        if scale is not None:
            h = h * scale
        return self.fc(h.mean(dim=(2, 3)))


def test_constants_and_optional_args():
    torch.manual_seed(0)
    model = WithConstant().eval()
    net = attach(model, at=["bn"]).eval()
    assert not any(k.startswith("_tensor_constant") for k in vars(model))
    x = batch()
    with torch.no_grad():
        assert torch.equal(net(x).logits[-1], model(x))
        net.double()  # buffers are replaced by .to(): stages must still see the trunk's current ones
        assert model.bn.running_mean.dtype == torch.float64
        assert torch.equal(net(x.double()).logits[-1], model(x.double()))


def test_bad_names_raise():
    model = tiny()
    for at, msg in [
        (["nope"], "not a submodule"),
        (["layer1.relu"], "called 2 times"),
        (["unused"], "not called"),
        ([""], "not called"),
        (["layer1", "layer1"], "repeat"),
        (["down", "down.2"], "same activation"),
    ]:
        with pytest.raises(InputError, match=msg):
            attach(model, at=at)
    with pytest.raises(InputError, match="not called"):
        attach(model, at=["layer1.conv1"], leaf_modules=(Block,))
    with pytest.raises(InputError, match="example_input"):
        attach_exits(model, ["layer1"], example_input=torch.randn(1, 4, 8, 8))


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent control flow


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.gate(self.conv(x)).mean(dim=(2, 3)))


def test_untraceable_model_names_leaf_modules():
    torch.manual_seed(0)
    model = Gated().eval()
    with pytest.raises(InputError, match="Gated.*leaf_modules"):
        attach(model, at=["conv"])
    net = attach(model, at=["conv", "gate"], leaf_modules=(Gate,)).eval()
    x = batch()
    with torch.no_grad():
        assert torch.equal(net(x).logits[-1], model(x))


def test_torchvision_resnet18():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10).eval()
    net = attach_exits(model, ["layer3", "layer1", "layer2"], example_input=torch.randn(1, 3, 64, 64)).eval()
    assert net.exit_names == ["layer1", "layer2", "layer3", "output"]
    assert [h.fc.in_features for h in net.heads] == [64, 128, 256]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        assert torch.equal(out.logits[-1], model(x))
    assert [lg.shape for lg in out.logits] == [(2, 10)] * 4
    assert out.features[-1].shape == (2, 512)


# ----------------------------------------------------------------------------- train mode (freeze=False)


class FunctionalDropout(nn.Module):
    """Dropout written as a function of ``self.training``: only a train-mode trace contains it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = F.dropout(F.relu(self.bn(self.conv(x))), 0.5, training=self.training)
        h = self.conv2(h) * torch.tensor([2.0])
        return self.fc(F.dropout(h.mean(dim=(2, 3)), 0.3, training=self.training))


def test_a_trainable_trunk_runs_its_train_mode_graph_in_train_mode():
    torch.manual_seed(0)
    model = FunctionalDropout().eval()
    torch.manual_seed(1)
    attach(copy.deepcopy(model), at=["bn", "conv2"])
    rng = torch.get_rng_state()  # after initialising the heads
    torch.manual_seed(1)
    net = attach(model, at=["bn", "conv2"], freeze=False)
    assert torch.equal(torch.get_rng_state(), rng) and not model.training  # the train-mode run drew nothing
    assert net.train_segments is not None
    x = batch()
    net.train()
    torch.manual_seed(3)
    out = net(x)
    model.train()
    torch.manual_seed(3)
    ref = model(x)
    assert torch.equal(out.logits[-1], ref)
    net.eval()
    with torch.no_grad():
        assert not torch.equal(net(x).logits[-1], ref)  # eval: no dropout
        assert torch.equal(net(x).logits[-1], model(x))
        twin = copy.deepcopy(net).train()
        torch.manual_seed(3)
        assert torch.equal(twin(x).logits[-1], ref)
    frozen = attach(FunctionalDropout().eval(), at=["bn"])  # frozen: the trunk always runs in eval mode
    assert frozen.train_segments is None
    assert attach(tiny(), freeze=False).train_segments is None  # one graph serves both modes


class TrainOnlyPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        if self.training:
            h = F.avg_pool2d(h, 2)
        return self.fc(self.conv2(h).mean(dim=(2, 3)))


class TrainTwice(TrainOnlyPool):
    def forward(self, x):
        h = self.conv2(self.conv(x))
        if self.training:
            h = self.conv2(h)
        return self.fc(h.mean(dim=(2, 3)))


def test_a_train_mode_graph_that_cuts_differently_is_refused():
    with pytest.raises(InputError, match=r"train and eval mode .*'conv2' returns \[1, 4, 4, 4\], not \[1, 4, 8, 8\]"):
        attach(TrainOnlyPool(), at=["conv2"], freeze=False)
    assert attach(TrainOnlyPool(), at=["conv2"]).num_exits == 2  # frozen: eval mode only, fine
    with pytest.raises(InputError, match="train-mode graph too: 'conv2' is called 2 times"):
        attach(TrainTwice(), at=["conv2"], freeze=False)


# ----------------------------------------------------------------------------- cut points


def test_list_cut_points_in_execution_order_with_shapes_and_cumulative_flops():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cuts = list_cut_points(model, batch(4))
    names = [c.name for c in cuts]
    assert all(isinstance(c, CutPoint) for c in cuts)
    assert names[:4] == ["stem.0", "stem.1", "stem", "stem.2"]  # same activation: the container first
    assert names.index("layer1") < names.index("down.0") < names.index("layer2.conv1") < names.index("layer2")
    assert "layer1.relu" not in names and "unused" not in names and "fc" not in names  # twice, never, the output
    shape = {c.name: c.shape for c in cuts}
    assert shape["layer1"] == (8, 8, 8) and shape["down"] == (16, 4, 4)
    flops = [c.flops for c in cuts]
    assert flops == sorted(flops) and flops[0] > 0
    for c in cuts:
        if c.name not in ("stem", "down"):
            attach(model, at=[c.name])  # every listed name is accepted
    at = ["layer1.conv1", "layer1", "down.1", "layer2"]
    costs = exit_costs(attach(model, at=at), (3, 8, 8))
    by_name = {c.name: c.flops for c in cuts}
    assert [by_name[n] for n in at] == [costs.stem + sum(costs.stages[: i + 1]) for i in range(len(at))]
    assert not model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
