"""What only a GPU can show (marked ``cuda``: skipped without one; ``scripts/gpu_check.sh`` runs them): dynamic
exit against the simulated reference within a tolerance (TF32 convolutions can move a score across a threshold),
host synchronisations counted by CUDA itself, autocast, a GPU checkpoint resumed on the CPU, BlockDrop with a
policy network built on the CPU, impressions from a CPU teacher, and the batched MAML path."""

from __future__ import annotations

import warnings

import pytest
import torch

from metadyn.core import gating
from metadyn.core.backbones.resnet import tiny_resnet_exits
from metadyn.core.flops import exit_costs
from metadyn.core.inference import collect_logits, dynamic_exit, simulated_exit
from metadyn.core.policies import ThresholdPolicy, policy_for_budget
from metadyn.core.train import fit

pytestmark = pytest.mark.cuda

IN_SHAPE, CLASSES = (1, 8, 8), 5
CUDA = torch.device("cuda")


def _trained(device="cuda", **kw):
    torch.manual_seed(0)
    net = tiny_resnet_exits(IN_SHAPE, CLASSES)
    x, y = torch.rand(128, *IN_SHAPE), torch.arange(128) % CLASSES
    fit(net, (x, y), epochs=2, batch_size=32, device=device, progress=False, **kw)
    return net.eval()


def syncs(fn) -> int:
    """How many synchronising CUDA operations ``fn()`` makes (CUDA's own sync debug mode)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


def test_dynamic_exit_agrees_with_the_simulated_reference_within_a_tolerance():
    net = _trained()
    x = torch.rand(512, *IN_SHAPE, device=CUDA)
    cum = exit_costs(net, IN_SHAPE).cumulative
    policy = policy_for_budget(collect_logits(net, torch.rand(256, *IN_SHAPE)), cum, 0.6 * cum[-1])
    dyn, sim = dynamic_exit(net, x, policy), simulated_exit(net, x, policy)
    same = dyn.exit_idx == sim.exit_idx
    assert float(same.double().mean()) >= 0.99
    torch.testing.assert_close(dyn.logits[same], sim.logits[same], rtol=1e-3, atol=1e-3)


def test_host_syncs_one_per_exit_and_one_per_blockdrop_batch():
    net = _trained()
    x = torch.rand(256, *IN_SHAPE, device=CUDA)
    policy = ThresholdPolicy([0.5] * (net.num_exits - 1) + [0.0])
    dynamic_exit(net, x, policy)  # warm-up
    assert syncs(lambda: dynamic_exit(net, x, policy)) <= net.num_exits - 1
    bd = gating.BlockDropNet(tiny_resnet_exits(IN_SHAPE, CLASSES).to(CUDA),
                             gating.PolicyNet(IN_SHAPE, len(net.blocks), width=4)).eval()
    with torch.no_grad():
        bd(x)
        assert syncs(lambda: bd(x)) == 1


def test_bf16_inference_uses_thresholds_fitted_in_bf16():
    net = _trained(precision="bf16")
    val = torch.rand(256, *IN_SHAPE)
    cum = exit_costs(net, IN_SHAPE).cumulative
    logits = collect_logits(net, val, precision="bf16")
    policy = policy_for_budget(logits, cum, 0.6 * cum[-1])
    dyn = dynamic_exit(net, val.to(CUDA), policy, precision="bf16")
    sim = simulated_exit(net, val.to(CUDA), policy, precision="bf16")
    assert float((dyn.exit_idx == sim.exit_idx).double().mean()) >= 0.98


def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    net = tiny_resnet_exits(IN_SHAPE, CLASSES)
    x, y = torch.rand(64, *IN_SHAPE), torch.arange(64) % CLASSES
    fit(net, (x, y), epochs=1, device="cuda", checkpoint=tmp_path / "ck.pt", progress=False, schedule="constant")
    cpu = tiny_resnet_exits(IN_SHAPE, CLASSES)
    state = fit(cpu, (x, y), epochs=2, device="cpu", checkpoint=tmp_path / "ck.pt", progress=False,
                schedule="constant")
    assert [h["epoch"] for h in state.history] == [1, 2] and next(cpu.parameters()).device.type == "cpu"


def test_blockdrop_with_a_cpu_policy_on_a_gpu_backbone():
    backbone = _trained()
    net = gating.BlockDropNet(backbone, gating.PolicyNet(IN_SHAPE, len(backbone.blocks), width=4))
    costs = gating.gated_costs(net, IN_SHAPE)
    res = gating.evaluate_gated(net, torch.rand(64, *IN_SHAPE), torch.arange(64) % CLASSES, costs)
    assert 0 <= res["accuracy"] <= 1


def test_impressions_from_a_cpu_teacher_on_the_gpu():
    from metadyn.datafree.impressions import SynthesisSettings, synthesize_impressions

    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, CLASSES))
    imps = synthesize_impressions(teacher, 20, in_shape=IN_SHAPE, settings=SynthesisSettings(steps=5), device="cuda")
    assert imps.x.device.type == "cpu" and next(teacher.parameters()).device.type == "cpu"
    synthesize_impressions(teacher, 20, in_shape=IN_SHAPE, settings=SynthesisSettings(steps=5), device="cuda",
                           precision="bf16")


def test_batched_maml_on_the_gpu_equals_the_per_episode_engine():
    from metadyn.core.backbones.conv4 import conv4_exits
    from metadyn.meta.learner import MetaLearner

    torch.manual_seed(0)
    net = conv4_exits((1, 28, 28), 5, width=8, norm="batch_episodic").double().to(CUDA)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 5, 1, 28, 28, generator=g, dtype=torch.float64).to(CUDA),
             torch.arange(5).repeat(4, 1).to(CUDA),
             torch.randn(4, 10, 1, 28, 28, generator=g, dtype=torch.float64).to(CUDA),
             torch.arange(5).repeat_interleave(2).repeat(4, 1).to(CUDA))
    _, a = MetaLearner(net, "maml", batched=False).meta_gradient(batch)
    _, b = MetaLearner(net, "maml", batched=True).meta_gradient(batch)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-9)
