"""Every core path on a second device, on a CPU-only machine: backbones, methods (losses), gating, inference,
threshold fitting, meta-learners and impressions run with their tensors on the ``meta`` device of
:mod:`fake_device` (tensors that report ``meta`` and compute on the CPU), so a CPU tensor mixed in fails here as
it would on a GPU, and the host synchronisations a GPU would see are counted."""

from __future__ import annotations

import pytest
import torch
from fake_device import DeviceMix, counting, fake_device, is_on_device, on_device

from metadyn.core import gating
from metadyn.core.backbones.resnet import tiny_resnet_exits
from metadyn.core.flops import exit_costs
from metadyn.core.inference import collect_logits, dynamic_exit, prepare_for_inference, simulated_exit
from metadyn.core.policies import ThresholdPolicy, accuracy_at_budgets, budgeted_curve, fit_thresholds, pick_exits
from metadyn.core.train import fit
from metadyn.registry import BACKBONES, METHODS
from metadyn.runner.specs import build_method

IN_SHAPE, CLASSES = (1, 8, 8), 5


def _backbone(name: str):
    return BACKBONES.get(name)(in_shape=IN_SHAPE, num_classes=CLASSES, **BACKBONES.example(name))


def _median_policy(logits) -> ThresholdPolicy:
    conf = [lg.softmax(-1).amax(-1) for lg in logits]
    return ThresholdPolicy([float(c.median()) for c in conf[:-1]] + [0.0])


def test_the_harness_catches_a_cpu_tensor_and_counts_syncs():
    with fake_device() as fd:
        x = on_device(torch.randn(4, 3))
        with pytest.raises(DeviceMix):
            x + torch.ones(3)
        with pytest.raises(DeviceMix):
            torch.where(x > 0, x, torch.zeros(4, 3))
        assert is_on_device(x[torch.tensor([0, 1])]) and fd.uploads  # CUDA takes CPU indices too (a copy)
        y = x * torch.tensor(2.0)  # a 0-dim CPU tensor is a scalar, as on CUDA
        assert is_on_device(torch.tensor([1.0, 2.0], device=x.device))
        assert is_on_device(y) and is_on_device(torch.zeros(2, device=x.device))
        with counting(fd) as seen:
            int((y > 0).sum()), y.tolist(), y[y > 0], y.cpu()
        assert len(seen) == 4


@pytest.mark.parametrize("name", BACKBONES.names())
def test_backbone_trains_costs_and_exits_on_the_device(name):
    torch.manual_seed(0)
    ref = _backbone(name).double()
    x = torch.randn(24, *IN_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        ref_logits = ref.eval()(x).logits
    policy = _median_policy(ref_logits)
    ref_exit = dynamic_exit(ref, x, policy)
    with fake_device() as fd:
        net = _backbone(name).double()
        net.load_state_dict(ref.state_dict())
        net.to("meta")
        assert all(is_on_device(p) for p in net.parameters())
        xd = on_device(x)
        net.eval()
        assert exit_costs(net, IN_SHAPE).cumulative == exit_costs(ref, IN_SHAPE).cumulative
        with counting(fd) as seen:
            res = dynamic_exit(net, xd, policy)
        assert len(seen) == net.num_exits - 1, seen  # one host sync per early exit, none per sample
        assert torch.equal(res.exit_idx.cpu(), ref_exit.exit_idx)
        torch.testing.assert_close(res.logits.cpu(), ref_exit.logits, rtol=1e-10, atol=1e-10)
        sim = simulated_exit(net, xd, policy)
        assert torch.equal(sim.exit_idx.cpu(), ref_exit.exit_idx)
        logits = collect_logits(net, x, batch_size=10)  # CPU inputs are put on the model's device
        assert all(lg.device.type == "cpu" for lg in logits)
        torch.testing.assert_close(logits[-1], ref_logits[-1].float(), rtol=1e-5, atol=1e-5)
        out = net.train()(xd)
        loss = sum(torch.nn.functional.cross_entropy(lg, on_device(torch.arange(24) % CLASSES)) for lg in out.logits)
        loss.backward()
        assert all(p.grad is None or is_on_device(p.grad) for p in net.parameters())


def test_prepared_network_and_micro_batches_on_the_device():
    torch.manual_seed(0)
    with fake_device() as fd:
        net = tiny_resnet_exits(IN_SHAPE, CLASSES).to("meta").eval()
        x = on_device(torch.rand(40, *IN_SHAPE))
        fast = prepare_for_inference(net)
        policy = ThresholdPolicy([0.3, 0.3, 0.0][: net.num_exits - 1] + [0.0])
        with counting(fd) as seen:
            res = dynamic_exit(fast, x.contiguous(memory_format=torch.channels_last), policy, micro_batch=16)
        assert is_on_device(res.logits) and len(seen) <= net.num_exits - 1


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_trains_one_epoch_on_the_device(name):
    """fit with device=None trains where the model is; the data, on the CPU, is put on the device once."""
    make = METHODS.example(name)
    torch.manual_seed(0)
    with fake_device() as fd:
        model = (make() if make is not None else tiny_resnet_exits(IN_SHAPE, CLASSES)).to("meta")
        loss = build_method(name, {}, model, IN_SHAPE)
        before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        x, y = torch.rand(32, *IN_SHAPE), torch.arange(32) % CLASSES
        with counting(fd) as seen:
            state = fit(model, (x, y), loss=loss, epochs=1, batch_size=8, lr=0.05, progress=False)
        assert all(is_on_device(p) for p in model.parameters())
        after = model.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
        assert state.history[-1]["loss"] == state.history[-1]["loss"]  # finite, not NaN
    # four batches: the loop's own syncs are per epoch, a method's per batch at most
    assert len(seen) <= 12, seen


def test_fit_puts_the_data_on_the_device_once_and_syncs_per_epoch_not_per_batch():
    def syncs(n: int) -> list[str]:
        torch.manual_seed(0)
        with fake_device() as fd:
            model = tiny_resnet_exits(IN_SHAPE, CLASSES).to("meta")
            x, y = torch.rand(n, *IN_SHAPE), torch.arange(n) % CLASSES
            with counting(fd) as seen:
                fit(model, (x, y), epochs=2, batch_size=8, progress=False, log_every=1000)
        return seen

    assert syncs(16) == syncs(64)  # 2 or 8 batches an epoch: the same host syncs


def test_gated_networks_on_the_device_sync_once_per_batch_for_blockdrop():
    torch.manual_seed(0)
    with fake_device() as fd:
        backbone = tiny_resnet_exits(IN_SHAPE, CLASSES).to("meta")
        policy = gating.PolicyNet(IN_SHAPE, len(backbone.blocks), width=4)  # built on the CPU, as a task kind does
        net = gating.BlockDropNet(backbone, policy)
        assert all(is_on_device(p) for p in net.policy.parameters())
        costs = gating.gated_costs(net, IN_SHAPE)
        x = on_device(torch.rand(30, *IN_SHAPE))
        net.eval()
        with torch.no_grad(), counting(fd) as seen:
            out = net(x)
        assert len(seen) == 1, seen  # every block's samples found at once
        assert is_on_device(out.logits)
        net.mode, net.learn_last = "sample", 2
        net.train()
        out = net(x)
        gating.blockdrop_loss(1.0)(out, on_device(torch.arange(30) % CLASSES)).backward()
        y = torch.arange(30) % CLASSES
        res = gating.evaluate_gated(net, x.cpu(), y, costs, batch_size=16)
        assert 0 <= res["accuracy"] <= 1 and res["logits"].device.type == "cpu"
        skip = gating.GatedResNet(tiny_resnet_exits(IN_SHAPE, CLASSES)).to("meta").eval()
        with torch.no_grad(), counting(fd) as seen:
            skip(x)
        assert len(seen) == len(skip.backbone.blocks)  # SkipNet decides block by block
        gating.evaluate_gated(skip, x, y, gating.gated_costs(skip, IN_SHAPE))


def test_skip_plan_equals_blockwise_skipping():
    torch.manual_seed(0)
    net = tiny_resnet_exits(IN_SHAPE, CLASSES).double().eval()
    x = torch.rand(20, *IN_SHAPE, dtype=torch.float64)
    actions = (torch.rand(20, len(net.blocks)) < 0.5).double()
    actions[:, 0] = 1.0
    actions[:, -1] = 0.0
    plan = gating.execution.skip_plan(actions)
    with torch.no_grad():
        a = b = net.stem(x)
        for k, block in enumerate(net.blocks):
            a = gating.run_block(block, a, actions[:, k])
            b = gating.run_block(block, b, actions[:, k], plan[k])
    assert torch.equal(a, b)


def test_threshold_fitting_with_scores_on_the_device():
    torch.manual_seed(0)
    val = [torch.randn(60, CLASSES) * s for s in (0.5, 1.0, 2.0)]
    test = [torch.randn(40, CLASSES) * s for s in (0.5, 1.0, 2.0)]
    y = torch.arange(40) % CLASSES
    costs = [1.0, 2.0, 3.0]
    ref_curve = budgeted_curve(val, test, y, costs, ps=[0.3, 0.7])
    ref_budget = accuracy_at_budgets(val, test, y, costs, [1.5, 2.5])
    with fake_device():
        vd, td, yd = [on_device(v) for v in val], [on_device(t) for t in test], on_device(y)
        assert budgeted_curve(vd, td, yd, costs, ps=[0.3, 0.7]) == ref_curve
        assert accuracy_at_budgets(vd, td, yd, costs, [1.5, 2.5]) == ref_budget
        idx, _ = pick_exits(td, _median_policy(val))
        assert is_on_device(idx)


def test_fit_thresholds_with_scores_on_the_device():
    """Thresholds are fitted on a float64 CPU copy: the same values whatever device the scores are on."""
    scores, fractions = torch.rand(3, 50), torch.tensor([0.3, 0.3, 0.4])
    with fake_device():
        on_dev = fit_thresholds(on_device(scores), on_device(fractions))
    assert torch.equal(on_dev, fit_thresholds(scores, fractions))


def _episodes(t: int = 3):
    from metadyn.data import ClassPool, EpisodeSampler

    g = torch.Generator().manual_seed(0)
    pool = ClassPool(torch.rand(60, *IN_SHAPE, generator=g), torch.arange(60) % 6)
    return EpisodeSampler(pool, n_way=3, k_shot=2, n_query=3, seed=0)


@pytest.mark.parametrize("algorithm,options", [("maml", {}), ("fomaml", {}), ("anil", {}), ("metasgd", {}),
                                               ("maml", {"share_trunk": True})])
def test_meta_learners_on_the_device(algorithm, options):
    from metadyn.core.backbones.conv4 import conv4_exits
    from metadyn.meta.evaluate import evaluate_episodes
    from metadyn.meta.learner import MetaLearner
    from metadyn.meta.train import episode_stream

    sampler = _episodes()
    torch.manual_seed(0)
    with fake_device() as fd:
        net = conv4_exits(IN_SHAPE, 3, width=4, norm="batch_episodic").to("meta")
        learner = MetaLearner(net, algorithm, inner_lr=0.1, batched=False, **options)
        stream = episode_stream(sampler, iterations=2, meta_batch=2, device=torch.device("meta"))
        batch, _ = next(iter(stream(0)))
        assert all(is_on_device(b) for b in batch)
        with counting(fd) as seen:
            value, grads = learner.meta_gradient(batch)
        assert not seen, seen  # a meta-step never waits for the device
        assert all(is_on_device(g) for g in grads)
        fit(learner, stream, loss=lambda v, _: v, epochs=1, lr=0.01, optimizer="adam", momentum=0.0,
            weight_decay=0.0, schedule="constant", progress=False)
        res = evaluate_episodes(learner, sampler, 2)  # on the learner's device by default
        assert res.accuracy.shape == (2, net.num_exits) and learner.last_stats["query_accuracy"]


def test_prototypical_exits_on_the_device():
    from metadyn.core.backbones.conv4 import conv4_exits
    from metadyn.meta.evaluate import evaluate_episodes
    from metadyn.meta.protonet import ProtoExits
    from metadyn.meta.train import episode_stream

    sampler = _episodes()
    with fake_device():
        proto = ProtoExits(conv4_exits(IN_SHAPE, 3, width=4, norm="batch")).to("meta")
        stream = episode_stream(sampler, iterations=2, meta_batch=2, device=torch.device("meta"))
        fit(proto, stream, loss=lambda v, _: v, epochs=1, lr=0.01, optimizer="adam", momentum=0.0,
            weight_decay=0.0, schedule="constant", progress=False)
        assert evaluate_episodes(proto, sampler, 2).accuracy.shape == (2, 4)


@pytest.mark.parametrize("bn_weight", [0.0, 0.05])
def test_impressions_on_the_device(bn_weight):
    from metadyn.datafree.impressions import SynthesisSettings, synthesize_impressions

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                  torch.nn.Flatten(), torch.nn.Linear(4 * 64, CLASSES)).eval()
    s = SynthesisSettings(steps=3, batch_size=10, bn_weight=bn_weight, jitter=1, flip=True, tv_weight=0.01)
    ref = synthesize_impressions(teacher, 12, in_shape=IN_SHAPE, settings=s, seed=0)
    with fake_device():
        teacher.to("meta")
        imps = synthesize_impressions(teacher, 12, in_shape=IN_SHAPE, settings=s, seed=0)  # where the teacher is
        assert all(is_on_device(p) for p in teacher.parameters())
    assert imps.x.device.type == "cpu"
    torch.testing.assert_close(imps.x, ref.x)


def test_impressions_move_the_teacher_to_the_device_asked_for_and_back():
    from metadyn.datafree.impressions import SynthesisSettings, synthesize_impressions

    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, CLASSES))
    with fake_device():
        teacher.to("meta")
        synthesize_impressions(teacher, 6, in_shape=IN_SHAPE, settings=SynthesisSettings(steps=2), device="cpu")
        assert all(is_on_device(p) for p in teacher.parameters())  # back where it was


def test_meta_learner_with_consistency_in_the_outer_loop_on_the_device():
    from metadyn.consistency.losses import consistency_method
    from metadyn.core.backbones.conv4 import conv4_exits
    from metadyn.meta.learner import MetaLearner
    from metadyn.meta.train import episode_stream

    sampler = _episodes()
    torch.manual_seed(0)
    with fake_device() as fd:
        net = conv4_exits(IN_SHAPE, 3, width=4, norm="batch_episodic").to("meta")
        consistency = consistency_method(net, IN_SHAPE, kind="byol", hidden=8).to("meta")
        learner = MetaLearner(net, "maml", inner_lr=0.1, consistency=consistency)
        batch, _ = next(iter(episode_stream(sampler, 1, 2, torch.device("meta"))(0)))
        with counting(fd) as seen:
            _, grads = learner.meta_gradient(batch)
        assert not seen and all(is_on_device(g) for g in grads)
        assert any(float(g.abs().max()) > 0 for g in grads[-len(list(consistency.parameters())):])
