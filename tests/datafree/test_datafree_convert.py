"""Data-free conversion: exits trained on impressions by distillation; the teacher never changes."""

from __future__ import annotations

import copy

import pytest
import torch

from metadyn.core.backbones import attach_exits, tiny_conv4_exits
from metadyn.core.outputs import ExitOutput
from metadyn.datafree import (
    SynthesisSettings,
    convert_to_early_exit,
    distill_student,
    exit_distillation_loss,
    synthesize_impressions,
    teacher_distillation_loss,
    teacher_logits,
    tiny_static_cnn,
    train_exits,
)
from metadyn.errors import InputError


@pytest.fixture()
def teacher():
    torch.manual_seed(0)
    net = tiny_static_cnn((1, 8, 8), 10)
    net.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(3):
            net(torch.rand(32, 1, 8, 8))
    return net.eval()


def test_teacher_output_is_bit_identical_after_conversion(teacher):
    probe = torch.rand(50, 1, 8, 8)
    before = teacher(probe).detach().clone()
    state_before = copy.deepcopy(teacher.state_dict())
    imps = synthesize_impressions(teacher, 40, in_shape=(1, 8, 8), device="cpu",
                                  settings=SynthesisSettings(steps=5, batch_size=40))
    net, state = convert_to_early_exit(teacher, ["stages.0"], imps.x, epochs=2, batch_size=16, lr=0.01,
                                       optimizer="adam", device="cpu", progress=False)
    assert net.num_exits == 2 and len(state.history) == 2
    net.eval()
    assert torch.equal(teacher(probe), before)
    assert torch.equal(net(probe).logits[-1], before)
    assert torch.equal(net.forward_final(probe), before)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    net.train()  # the frozen trunk stays in eval mode: BatchNorm statistics never move
    net(torch.rand(16, 1, 8, 8) * 5)
    assert torch.equal(teacher.stages[0][1].running_mean, state_before["stages.0.1.running_mean"])


def test_exits_learn_the_teacher_on_the_transfer_set(teacher):
    x = torch.rand(128, 1, 8, 8)
    torch.manual_seed(1)
    net = attach_exits(teacher, ["stages.0"], example_input=x[:1])
    loss = exit_distillation_loss(tau=1.0)
    with torch.no_grad():
        start = float(loss(net(x), torch.full((128,), -1)))
    state = train_exits(net, x, epochs=15, batch_size=32, lr=0.02, optimizer="adam", weight_decay=0.0,
                        device="cpu", progress=False)
    with torch.no_grad():
        end = float(loss(net(x), torch.full((128,), -1)))
    assert end < 0.5 * start
    assert state.history[-1]["loss"] < state.history[0]["loss"]


def test_exit_distillation_loss_ignores_labels_and_the_final_exit():
    z0, z1 = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    out = ExitOutput([z0, z1], [z0, z1])
    value = exit_distillation_loss(2.0)(out, torch.tensor([0, 1, 2, -1]))
    value.backward()
    assert z1.grad is None and z0.grad is not None
    same = ExitOutput([z1.detach(), z1.detach()], [z1, z1])
    assert float(exit_distillation_loss(2.0)(same, torch.zeros(4))) == pytest.approx(0.0, abs=1e-6)


def test_train_exits_needs_a_frozen_attached_net(teacher):
    x = torch.rand(8, 1, 8, 8)
    unfrozen = attach_exits(copy.deepcopy(teacher), ["stages.0"], example_input=x[:1], freeze=False)
    with pytest.raises(InputError):
        train_exits(unfrozen, x, epochs=1)
    with pytest.raises(InputError):
        train_exits(tiny_conv4_exits((1, 8, 8), 10), x, epochs=1)


def test_distill_student_trains_every_exit(teacher):
    x = torch.rand(96, 1, 8, 8)
    torch.manual_seed(2)
    student = tiny_conv4_exits((1, 8, 8), 10)
    t = teacher_logits(teacher, x)
    loss = teacher_distillation_loss(1.0)
    student.eval()
    with torch.no_grad():
        start = float(loss(student(x), t))
    distill_student(student, teacher, x, epochs=10, batch_size=32, lr=0.01, optimizer="adam", weight_decay=0.0,
                    device="cpu", progress=False)
    student.eval()
    with torch.no_grad():
        assert float(loss(student(x), t)) < 0.7 * start
    with pytest.raises(InputError):
        distill_student(student, teacher, x, epochs=1, augment=lambda v: v)
