"""Contract tests parametrized over the registries, not hand lists: a new backbone, method or task file is
tested the moment it is registered (or shipped)."""

from __future__ import annotations

import pytest
import torch

from metadyn.config import load_task, task_names
from metadyn.core.flops import exit_costs
from metadyn.core.inference import dynamic_exit
from metadyn.core.policies import ThresholdPolicy, pick_exits
from metadyn.core.train import fit
from metadyn.registry import BACKBONES, METHODS, TASK_KINDS
from metadyn.runner import run_task
from metadyn.runner.specs import build_method

IN_SHAPE, CLASSES = (1, 8, 8), 5


def _tiny_backbone(name: str):
    options = BACKBONES.example(name)
    assert options is not None, f"backbone {name!r}: register it with example=<tiny options for a (1, 8, 8) input>"
    return BACKBONES.get(name)(in_shape=IN_SHAPE, num_classes=CLASSES, **options)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_forward_is_its_stage_by_stage_run(name):
    net = _tiny_backbone(name).double().eval()
    x = torch.randn(6, *IN_SHAPE, dtype=torch.float64)
    out = net(x)
    state = net.stem(x)
    for i in range(net.num_exits):
        state = net.stage(i, state)
        assert torch.equal(net.exit(i, state)[0], out.logits[i]), f"exit {i}"
    assert torch.equal(net.forward_final(x), out.logits[-1])


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_dynamic_exit_equals_picking_from_the_full_forward(name):
    net = _tiny_backbone(name).double().eval()
    x = torch.randn(40, *IN_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        logits = net(x).logits
    conf = [lg.softmax(-1).max(-1).values for lg in logits]
    policy = ThresholdPolicy([float(c.median()) for c in conf[:-1]] + [0.0])  # about half leave at each exit
    idx, picked = pick_exits(logits, policy)
    assert 0 < int((idx == 0).sum()) < len(x)  # the policy really splits the batch
    dyn = dynamic_exit(net, x, policy)
    assert torch.equal(dyn.exit_idx, idx)
    torch.testing.assert_close(dyn.logits, picked, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_exit_costs_increase(name):
    cum = exit_costs(_tiny_backbone(name), IN_SHAPE).cumulative
    assert all(a < b for a, b in zip(cum, cum[1:])) and cum[0] > 0


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_a_tiny_model_one_step(name):
    make = METHODS.example(name)
    torch.manual_seed(0)
    model = make() if make is not None else _tiny_backbone("resnet")
    loss = build_method(name, {}, model, IN_SHAPE)
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    x, y = torch.rand(16, *IN_SHAPE), torch.arange(16) % CLASSES
    state = fit(model, (x, y), loss=loss, epochs=1, batch_size=16, lr=0.05, device="cpu", progress=False)
    assert torch.isfinite(torch.tensor(state.history[-1]["loss"]))
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{name}: one step changed no parameter"


@pytest.mark.parametrize("task", task_names())
def test_every_shipped_task_validates(task):
    cfg = load_task(task)
    assert cfg.kind in TASK_KINDS and load_task(task, quick=True).kind == cfg.kind


@pytest.mark.slow
@pytest.mark.parametrize("task", task_names())
def test_every_shipped_task_runs_quick(task, tmp_path):
    from metadyn.data.local import MissingDataError

    try:
        out, m = run_task(task, quick=True, out=tmp_path / task, progress=False)
    except MissingDataError as e:  # a data set read from disk that this machine does not have
        pytest.skip(str(e))
    assert m["rows"] and all(r["accuracy"] is None or 0 <= r["accuracy"] <= 1 for r in m["rows"])
    assert (out / "report.md").is_file() and (out / "metrics.json").is_file()
