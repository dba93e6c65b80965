"""Data impressions (ZSKD): class similarity, Dirichlet targets, batched synthesis, priors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metadyn.core.losses import labeled_ce
from metadyn.core.train import fit
from metadyn.data import load_classification
from metadyn.datafree import (
    BatchNormPrior,
    SynthesisSettings,
    class_similarity,
    dirichlet_concentration,
    final_layer_weight,
    sample_targets,
    synthesize_impressions,
    target_kl,
    tiny_static_cnn,
    total_variation,
)
from metadyn.errors import InputError


@pytest.fixture(scope="module")
def teacher():
    """A tiny conv teacher trained on digits for a few epochs (about a second)."""
    torch.manual_seed(0)
    data = load_classification("digits", seed=0)
    net = tiny_static_cnn(data.in_shape, data.num_classes)
    fit(net, data.train, loss=labeled_ce, epochs=8, lr=0.05, device="cpu", progress=False)
    return net.eval()


def test_similarity_matrix_has_unit_diagonal_and_values_in_unit_interval():
    w = torch.randn(7, 12)
    sim = class_similarity(w)
    assert sim.shape == (7, 7)
    assert torch.allclose(sim.diagonal(), torch.ones(7))
    assert sim.min() >= 0 and sim.max() <= 1
    assert torch.allclose(sim.min(dim=1).values, torch.zeros(7))  # min-max per row: the least similar is 0
    assert torch.allclose(class_similarity(w * torch.rand(7, 1) * 5), sim, atol=1e-6)  # cosine: scale-free


def test_similarity_of_a_trained_teacher(teacher):
    sim = class_similarity(final_layer_weight(teacher))
    assert torch.allclose(sim.diagonal(), torch.ones(10))
    assert 0 <= sim.min() and sim.max() <= 1
    with pytest.raises(InputError):
        class_similarity(torch.randn(1, 4))
    with pytest.raises(InputError):
        final_layer_weight(nn.Conv2d(1, 2, 3))


class ClassifierFirst(nn.Module):
    """The classifier is registered before the layer that feeds it, and the data branch ends in a Linear
    that is never run."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)
        self.embed = nn.Linear(4, 8)
        self.spare = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.embed(x).relu())


def test_final_layer_weight_is_the_last_linear_executed_not_registered():
    torch.manual_seed(0)
    model = ClassifierFirst().train()
    assert final_layer_weight(model) is model.fc.weight  # from the fx graph
    assert final_layer_weight(model, torch.zeros(1, 4)) is model.fc.weight  # from hooks on a run
    assert model.training and not model.fc._forward_hooks and not hasattr(model, "_tensor_constant0")


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_dirichlet_sample_means_match_alpha_over_sum(beta):
    sim = class_similarity(torch.randn(5, 8))
    classes = torch.full((20000,), 2)
    alpha = dirichlet_concentration(sim, classes, torch.full((20000,), beta))
    torch.manual_seed(0)
    y = sample_targets(alpha)
    assert torch.allclose(y.sum(-1), torch.ones(20000), atol=1e-5)
    expected = alpha[0] / alpha[0].sum()
    assert (y.mean(0) - expected).abs().max() < 0.01


def test_beta_is_actually_applied():
    """The released code re-normalised the similarity row, so beta = 0.1 drew the same targets as 1.0."""
    sim = class_similarity(torch.randn(10, 16))
    classes = torch.arange(10).repeat(500)
    a1 = dirichlet_concentration(sim, classes, torch.full((5000,), 1.0), min_concentration=1e-4)
    a01 = dirichlet_concentration(sim, classes, torch.full((5000,), 0.1), min_concentration=1e-4)
    assert torch.allclose(a01 - 1e-4, 0.1 * (a1 - 1e-4), atol=1e-7)
    torch.manual_seed(0)
    peak1, peak01 = sample_targets(a1).amax(-1), sample_targets(a01).amax(-1)
    assert peak01.mean() > peak1.mean() + 0.1  # beta = 0.1 gives peakier targets


def test_target_kl_matches_torch_and_vanishes_on_a_match():
    y = torch.softmax(torch.randn(6, 4), -1)
    z = torch.randn(6, 4)
    ref = F.kl_div(F.log_softmax(z / 3.0, -1), y, reduction="none").sum(-1)
    assert torch.allclose(target_kl(y, z, 3.0), ref, atol=1e-6)
    assert target_kl(y, 3.0 * y.log(), 3.0).abs().max() < 1e-5
    one_hot = F.one_hot(torch.tensor([1, 2]), 4).float()  # zeros in the target: 0 log 0 = 0, no NaN
    assert torch.isfinite(target_kl(one_hot, torch.randn(2, 4), 1.0)).all()


def test_default_tau_is_matched_with_clamped_inputs(teacher):
    """At the default temperature, inputs kept in [0, 1] reach the sampled targets."""
    s = SynthesisSettings()
    imps = synthesize_impressions(teacher, 120, in_shape=(1, 8, 8), settings=s, seed=0, device="cpu")
    assert imps.x.shape == (120, 1, 8, 8)
    assert imps.x.min() >= s.bounds[0] and imps.x.max() <= s.bounds[1]
    summary = imps.summary()
    assert summary["tau"] == s.tau
    assert summary["median_kl"] < 0.05
    assert summary["argmax_agreement"] >= 0.95
    assert set(summary["per_beta"]) == {"1", "0.1"}
    # the KL is measured on what is returned
    with torch.no_grad():
        assert torch.allclose(target_kl(imps.targets, teacher(imps.x), s.tau), imps.kl, atol=1e-5)


def test_batches_mix_all_classes_and_betas_and_are_seeded(teacher):
    s = SynthesisSettings(steps=3, batch_size=40)
    teacher.zero_grad(set_to_none=True)
    a = synthesize_impressions(teacher, 100, in_shape=(1, 8, 8), settings=s, seed=3, device="cpu")
    assert set(a.classes[:40].tolist()) == set(range(10))
    assert len(set(a.betas[:40].tolist())) == 2
    b = synthesize_impressions(teacher, 100, in_shape=(1, 8, 8), settings=s, seed=3, device="cpu")
    assert torch.equal(a.x, b.x) and torch.equal(a.targets, b.targets)
    c = synthesize_impressions(teacher, 100, in_shape=(1, 8, 8), settings=s, seed=4, device="cpu")
    assert not torch.equal(a.x, c.x)
    assert teacher.training is False and all(p.grad is None for p in teacher.parameters())  # input grads only


def test_every_batch_starts_fresh(teacher):
    """A batch's result does not depend on the batches before it: the second batch of a run equals a
    one-batch run started from the same random state (fresh noise, fresh Adam state)."""
    s = SynthesisSettings(steps=5, batch_size=20, betas=[1.0])
    torch.manual_seed(0)
    two = synthesize_impressions(teacher, 40, in_shape=(1, 8, 8), settings=s, seed=0, device="cpu")
    # Replay: same targets for the second batch, the noise drawn after the first batch's optimisation.
    from metadyn.datafree.impressions import ImpressionBatch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sample_targets(dirichlet_concentration(class_similarity(final_layer_weight(teacher)), two.classes,
                                               two.betas))
        with ImpressionBatch(teacher, two.targets[:20], (1, 8, 8), s) as first:
            for _ in range(s.steps):
                first.step()
        with ImpressionBatch(teacher, two.targets[20:], (1, 8, 8), s) as second:
            for _ in range(s.steps):
                second.step()
            x2 = second.result()[0]
    assert torch.allclose(x2, two.x[20:])
    assert second.opt is not first.opt


def test_batchnorm_prior_and_total_variation():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), bn, nn.ReLU())
    x = torch.rand(16, 1, 6, 6)
    with torch.no_grad():
        h = net[0](x)
        var, mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    net.eval()
    with BatchNormPrior(net) as prior:
        net(x)
        assert prior.pop() < 1e-5
        net(torch.rand(16, 1, 6, 6) * 3)
        assert prior.pop() > 0.1
    net(x)
    assert prior.terms == []  # hooks removed
    assert total_variation(torch.full((2, 1, 5, 5), 0.3)) == 0
    checker = (torch.arange(25).reshape(5, 5) % 2).float()[None, None]
    assert total_variation(checker) == pytest.approx(2.0)


def test_priors_and_augmentation_run_and_stay_in_range(teacher):
    s = SynthesisSettings(steps=4, batch_size=32, bn_weight=0.05, tv_weight=0.01, jitter=1, flip=True,
                          bounds=[-0.5, 0.5])
    imps = synthesize_impressions(teacher, 32, in_shape=(1, 8, 8), settings=s, device="cpu")
    assert imps.x.min() >= -0.5 and imps.x.max() <= 0.5
    assert torch.isfinite(imps.kl).all()


def test_inputs_start_blank_or_as_uniform_noise(teacher):
    """``init="lower"`` starts every pixel at the lower bound, ``"uniform"`` spreads them over the bounds; one
    Adam step moves a pixel by at most about ``lr``."""
    lo, hi, lr = -0.5, 0.5, 1e-3
    blank = synthesize_impressions(teacher, 20, in_shape=(1, 8, 8), device="cpu",
                                   settings=SynthesisSettings(steps=1, lr=lr, bounds=[lo, hi], init="lower"))
    assert float(blank.x.max()) <= lo + 1.01 * lr
    noise = synthesize_impressions(teacher, 20, in_shape=(1, 8, 8), device="cpu",
                                   settings=SynthesisSettings(steps=1, lr=lr, bounds=[lo, hi], init="uniform"))
    assert float(noise.x.std()) > 0.2 and float(noise.x.mean()) == pytest.approx(0.0, abs=0.1)


def test_paper_preset_keeps_the_papers_random_start():
    s = SynthesisSettings.paper()
    assert (s.tau, s.steps, s.lr, s.batch_size, s.init) == (20.0, 1500, 0.001, 100, "uniform")


@pytest.mark.parametrize("bad", [{"tau": 0.0}, {"steps": 0}, {"betas": []}, {"bounds": [1.0, 0.0]},
                                 {"bn_weight": -1.0}, {"jitter": -1}, {"lr": float("nan")}, {"init": "gaussian"}])
def test_bad_settings_are_input_errors(teacher, bad):
    with pytest.raises(InputError):
        synthesize_impressions(teacher, 8, in_shape=(1, 8, 8), settings=SynthesisSettings(**bad), device="cpu")
