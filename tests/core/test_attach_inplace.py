"""attach_exits on networks with in-place ops: the heads read the value at the cut, the State never splits a
tensor that a later in-place op writes, and networks without in-place ops pay nothing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metadyn.core.backbones.attach import attach_exits
from metadyn.core.heads import ExitHead
from metadyn.core.inference import dynamic_exit, simulated_exit
from metadyn.errors import InputError


def mlp(inplace: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(inplace=inplace), nn.Linear(8, 8),
                         nn.ReLU(inplace=inplace), nn.Linear(8, 3))


class SharedRelu(nn.Module):
    """``b = relu_(a)`` is ``a`` itself; both are used after the cut and ``b`` is written in place."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a = self.c1(x)
        b = self.act(a)
        c = self.c2(b)
        b.add_(c)
        return self.fc((a + b).mean((2, 3)))


class SharedReluIadd(SharedRelu):
    def forward(self, x):  # fx traces ``b += c`` as ``b = b + c``: the graph would not write ``a``
        a = self.c1(x)
        b = self.act(a)
        c = self.c2(b)
        b += c
        return self.fc((a + b).mean((2, 3)))


class ViewWritten(nn.Module):
    """A view (the flattened cut) crosses the cut next to its base, which is then written in place."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 64, 5)

    def forward(self, x):
        a = self.c1(x)
        f = self.flat(a)
        a.relu_()
        return self.fc(f) + a.mean((1, 2, 3)).unsqueeze(1)


class FirstLeaves:
    """Policy: sample 0 leaves at every exit, everyone else goes on."""

    def __call__(self, i, logits, carry=None):
        leave = torch.zeros(len(logits), dtype=torch.bool)
        leave[0] = True
        return leave, carry


def test_head_reads_the_cut_value_before_a_later_inplace_relu():
    model = mlp()
    x = torch.randn(6, 1, 4, 4)
    net = attach_exits(model, ["1", "3"], example_input=x)
    with torch.no_grad():
        out = net(x)
        pre = model[1](model[0](x))  # the first cut: the Linear's output, before the in-place ReLU
        assert torch.equal(out.logits[-1], model(x))  # the trunk's output is unchanged, bit for bit
    assert out.features[0].min() < 0  # not the post-ReLU values
    assert torch.equal(out.logits[0], net.heads[0](pre)[0])
    assert "clone" in net.segments[1].code and "clone" in net.segments[2].code


def test_training_through_a_cut_before_an_inplace_relu():
    net = attach_exits(mlp(), ["1", "3"], example_input=torch.randn(2, 1, 4, 4), freeze=False).train()
    out = net(torch.randn(6, 1, 4, 4))
    sum(lg.sum() for lg in out.logits).backward()  # was: modified by an inplace operation
    assert all(p.grad is not None for p in net.heads.parameters())
    assert net.trunk[1].weight.grad is not None


def test_fit_through_a_cut_before_an_inplace_relu():
    from metadyn import fit

    x = torch.randn(6, 1, 4, 4)
    net = attach_exits(mlp(), ["1", "3"], example_input=x)
    fit(net, (x, torch.zeros(6, dtype=torch.long)), epochs=1, device="cpu", progress=False)


def test_torchvision_resnet18_cut_before_its_inplace_relu():
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    net = attach_exits(model, ["layer1.0.bn1"], example_input=x[:1], freeze=False,
                       head=lambda c, n: ExitHead(c, n, conv_channels=8))
    net.train()
    sum(lg.sum() for lg in net(x).logits).backward()
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x).logits[-1], model(x))


def test_no_inplace_op_no_copy():
    x = torch.randn(6, 1, 4, 4)
    for model, at in [(mlp(inplace=False), ["1", "3"]), (mlp(), ["2", "4"])]:  # after the ReLU: nothing writes it
        net = attach_exits(model, at, example_input=x).eval()
        assert not any("clone" in seg.code for seg in net.segments)
        with torch.no_grad():
            out = net(x)
            assert torch.equal(out.logits[-1], model(x))
            assert torch.equal(out.logits[0], net.heads[0](model[: int(at[0]) + 1](x))[0])


def test_dynamic_exit_keeps_one_tensor_under_two_names():
    torch.manual_seed(0)
    model = SharedRelu().eval()
    net = attach_exits(model, ["act"], example_input=torch.randn(2, 3, 8, 8)).eval()
    x = torch.randn(6, 3, 8, 8)
    dyn, sim = dynamic_exit(net, x, FirstLeaves()), simulated_exit(net, x, FirstLeaves())
    assert torch.equal(dyn.exit_idx, sim.exit_idx)
    torch.testing.assert_close(dyn.logits, sim.logits)  # was 0.17 apart for the samples that stayed
    dyn = dynamic_exit(net, x, FirstLeaves(), micro_batch=2)
    torch.testing.assert_close(dyn.logits, sim.logits)
    assert len(net.stage(0, net.stem(x))) == 1  # ``a`` and ``act`` are one tensor, carried once
    with torch.no_grad():
        assert torch.equal(net(x).logits[-1], model(x.clone()))


def test_a_view_written_after_the_cut_is_refused():
    with pytest.raises(InputError, match="'c1' and 'flat' cross the exit after 'flat' sharing memory.*move that exit"):
        attach_exits(ViewWritten().eval(), ["flat"], example_input=torch.randn(2, 3, 8, 8))


def test_an_iadd_fx_runs_out_of_place_is_refused():
    with pytest.raises(InputError, match="computes another output"):
        attach_exits(SharedReluIadd().eval(), ["act"], example_input=torch.randn(2, 3, 8, 8))


def test_an_inplace_dropout_that_writes_only_in_train_mode_gets_a_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.5, inplace=True), nn.Linear(8, 3))
    net = attach_exits(model, ["1"], example_input=torch.randn(2, 1, 4, 4), freeze=False)
    assert "clone" in net.segments[1].code
    net.train()
    sum(lg.sum() for lg in net(torch.randn(6, 1, 4, 4)).logits).backward()
