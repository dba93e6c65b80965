"""Hostile inputs to the library's pieces (issue 14): each test pins one group of the hostile-input run, and
each failed on main before its fix. The run folder, CLI and pipeline groups are in test_hostile_runs.py."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import metadyn as md
from metadyn.config import MAX_TASK_BYTES, load_task, parse_override
from metadyn.core.backbones.resnet import tiny_resnet_exits
from metadyn.core.inference import dynamic_exit, simulated_exit
from metadyn.core.policies import ThresholdPolicy, fit_thresholds_for_budget, pick_exits
from metadyn.core.train import fit, save_checkpoint
from metadyn.errors import InputError, NonFiniteLossError

BOMB = "\n".join(["a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")]) + "\n"


def _write(tmp_path, text, name="t.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


# --------------------------------------------------------------------------- group 3: 16-bit PNGs


def test_16bit_png_is_scaled_by_its_range(tmp_path):
    from PIL import Image

    from metadyn.data import load_classification

    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(6):
            Image.fromarray(np.full((8, 8), 6553 * (c + 1), np.uint16)).save(tmp_path / f"c{c}" / f"{i}.png")
    assert Image.open(tmp_path / "c0" / "0.png").mode == "I;16"
    data = load_classification("folder", root=str(tmp_path), size=8, val_fraction=0.2, calib_fraction=0.2,
                               test_fraction=0.2)
    x = torch.cat([data.train.x, data.val.x, data.calib.x, data.test.x])
    y = torch.cat([data.train.y, data.val.y, data.calib.y, data.test.y])
    for c in range(3):  # raw means 0.1, 0.2, 0.3 (read as ~1.0 when 16-bit values were clipped to 8 bits)
        assert float(x[y == c].mean()) == pytest.approx(0.1 * (c + 1), abs=1e-3)
    rgb = load_classification("folder", root=str(tmp_path), size=4, grayscale=False, val_fraction=0.2,
                              calib_fraction=0.2, test_fraction=0.2)
    assert rgb.in_shape == (3, 4, 4) and float(rgb.train.x.max()) <= 0.3 + 1e-3


def test_float_images_are_refused_with_one_line(tmp_path):
    from PIL import Image

    from metadyn.data import load_classification

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(tmp_path / f"c{c}" / "0.tif")
    with pytest.raises(InputError, match="mode 'F'"):
        load_classification("folder", root=str(tmp_path), size=8)


# --------------------------------------------------------------------------- group 9: decompression bombs


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_decompression_bomb_png_is_one_line(tmp_path):
    from metadyn.data import load_classification

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        (tmp_path / f"c{c}" / "0.png").write_bytes(_png_header_only(20000, 12000))
    assert len((tmp_path / "c0" / "0.png").read_bytes()) < 200
    with pytest.raises(InputError, match="decompression bomb") as e:
        load_classification("folder", root=str(tmp_path), size=8)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- group 4: dynamic_exit in train mode


def test_dynamic_exit_leaves_a_train_mode_model_as_it_was():
    net = tiny_resnet_exits((1, 8, 8), 10)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.train()
        net(torch.randn(32, 1, 8, 8))
    x = torch.randn(16, 1, 8, 8)
    policy = ThresholdPolicy([0.3, 0.3, 0.0])
    net.eval()
    expected = dynamic_exit(net, x, policy)
    net.train()
    net.heads[0].eval()  # a mixed-mode model: every module's own mode must come back
    modes = {n: m.training for n, m in net.named_modules()}
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    got = dynamic_exit(net, x, policy)
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert all(torch.equal(buffers[k], v) for k, v in net.state_dict().items())  # 21 BN buffers changed before
    assert torch.equal(got.exit_idx, expected.exit_idx) and torch.allclose(got.logits, expected.logits)


# --------------------------------------------------------------------------- group 5: ThresholdPolicy


@pytest.mark.parametrize("kwargs, message", [
    ({"thresholds": []}, "got none"),
    ({"thresholds": "0.9"}, "must be a list of numbers, got str"),
    ({"thresholds": ["0.9", "0.9"]}, "must be numbers, got str"),
    ({"thresholds": [0.5, float("nan"), 0.0]}, "must not be NaN"),
    ({"thresholds": [0.5, 0.5, 0.0], "temperatures": [1.0, 0.0, 1.0]}, "positive and finite"),
    ({"thresholds": [0.5, 0.5, 0.0], "temperatures": [1.0, float("inf"), 1.0]}, "positive and finite"),
    ({"thresholds": [0.5, True, 0.0]}, "must be numbers, got bool"),
])
def test_threshold_policy_validates_at_construction(kwargs, message):
    with pytest.raises(InputError, match=message):
        ThresholdPolicy(**kwargs)


def test_threshold_policy_count_is_checked_against_the_exits():
    net = tiny_resnet_exits((1, 8, 8), 10).eval()  # 3 exits
    x = torch.randn(8, 1, 8, 8)
    for thresholds in ([0.9], [0.9, 0.9, 0.9, 0.9, 0.9]):  # an IndexError / silently truncated before
        policy = ThresholdPolicy(thresholds)
        for run in (lambda p: dynamic_exit(net, x, p), lambda p: simulated_exit(net, x, p)):
            with pytest.raises(InputError, match=f"{len(thresholds)} thresholds for a network with 3 exits"):
                run(policy)
    with pytest.raises(InputError, match="2 temperatures"):
        pick_exits(list(net(x).logits), ThresholdPolicy([0.9, 0.9, 0.0], temperatures=[1.0, 1.0]))
    ok = ThresholdPolicy(torch.tensor([0.5, float("inf"), float("-inf")]))  # a tensor; +-inf mean none / all
    assert ok.thresholds == (0.5, float("inf"), float("-inf"))
    assert dynamic_exit(net, x, ok).exit_idx.tolist() == simulated_exit(net, x, ok).exit_idx.tolist()


# --------------------------------------------------------------------------- group 7: rounding with a tiny val split


def test_budget_of_the_first_exit_is_met_with_five_validation_samples():
    scores = torch.rand(3, 5, generator=torch.Generator().manual_seed(0))
    costs = [48544.0, 80000.0, 120000.0]
    t = fit_thresholds_for_budget(scores, costs, costs[0])  # "below the cheapest achievable 52707" before
    assert t[0] == float("-inf")  # every sample leaves at the first exit: cost exactly costs[0]
    with pytest.raises(InputError, match="below the cheapest exit's cost"):
        fit_thresholds_for_budget(scores, costs, costs[0] - 1)


# --------------------------------------------------------------------------- group 8: YAML bombs


@pytest.mark.parametrize("text, message", [
    (BOMB + "seed: *i\n", "more than 10000 values once its aliases are expanded"),
    (BOMB + "quick: {x: *i}\n", "more than 10000 values once its aliases are expanded"),
    ("a: &a [*a]\n", "refers to itself"),
    ("seed: " + "[" * 100 + "]" * 100 + "\n", "nested"),
    ("seed: 1" + "0" * 5000 + "\n", "cannot be read"),
])
def test_yaml_bombs_are_refused_fast_in_one_short_line(tmp_path, text, message):
    start = time.perf_counter()
    with pytest.raises(InputError, match=message) as e:
        load_task(_write(tmp_path, text))
    assert time.perf_counter() - start < 5  # 56 s and a MemoryError, or more than 150 s, before
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def test_big_task_file_and_override_are_refused_before_parsing(tmp_path):
    big = _write(tmp_path, "seeds:\n" + "- 1\n" * (MAX_TASK_BYTES // 4 + 1))
    start = time.perf_counter()
    with pytest.raises(InputError, match="a task file holds at most"):
        load_task(big)
    assert time.perf_counter() - start < 1
    with pytest.raises(InputError, match="at most"):
        parse_override("seed=" + "1" * (MAX_TASK_BYTES + 1))


def test_a_long_value_is_cut_in_error_messages(tmp_path):
    with pytest.raises(InputError) as e:
        load_task(_write(tmp_path, "train: {epochs: [" + ", ".join(["1"] * 5000) + "]}\n"))
    assert "'train.epochs' must be an integer" in str(e.value) and len(str(e.value)) < 200


def test_aliases_are_copies_so_an_override_changes_one_key(tmp_path):
    p = _write(tmp_path, "kind: skipnet\npretrain: &t {epochs: 2}\nhybrid: *t\n")
    cfg = load_task(p, ["pretrain.epochs=5"])
    assert cfg.pretrain.epochs == 5 and cfg.hybrid.epochs == 2


# --------------------------------------------------------------------------- group 10: corrupt checkpoints


def _tiny_fit(ck, epochs=1):
    torch.manual_seed(0)
    net = tiny_resnet_exits((1, 8, 8), 10)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    return fit(net, (x, y), epochs=epochs, batch_size=16, device="cpu", checkpoint=ck, progress=False)


@pytest.mark.parametrize("content, message", [
    ({}, "not a training checkpoint"),
    (torch.zeros(3), "holds a Tensor"),
    ("wrong shapes", "does not fit this model"),
    ("epoch str", "'epoch' must be int"),
    ("inf buffer", "non-finite values"),
    ("bad optimizer", "does not fit this optimizer"),
])
def test_corrupt_but_loadable_checkpoints_are_one_line(tmp_path, content, message):
    ck = tmp_path / "checkpoint.pt"
    if isinstance(content, str):
        _tiny_fit(ck)
        good = torch.load(ck, weights_only=True)
        if content == "wrong shapes":
            good["model"]["heads.0.fc.weight"] = torch.zeros(3, 3)
        elif content == "epoch str":
            good["epoch"] = "2"
        elif content == "inf buffer":
            good["model"]["blocks.0.residual.1.running_var"].fill_(float("inf"))
        else:
            good["optimizer"]["param_groups"][0]["lr"] = "fast"
        content = good
    save_checkpoint(content, ck) if isinstance(content, dict) else torch.save(content, ck)
    with pytest.raises(InputError, match=message) as e:
        _tiny_fit(ck, epochs=2)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- group 2: a good checkpoint is finite


def test_divergence_with_a_finite_loss_stops_and_keeps_a_finite_checkpoint(tmp_path):
    from metadyn.core.callbacks import Callback

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))  # any model: the loop checks buffers too
    x, y = torch.randn(64, 4), torch.randint(0, 8, (64,))
    ck = tmp_path / "ck.pt"

    class Blowup(Callback):  # the loss stays finite; the BatchNorm statistics blow up in the second epoch
        def on_batch_end(self, state):
            if state.epoch == 1:
                with torch.no_grad():
                    net[1].running_var.fill_(float("inf"))

    with pytest.raises(NonFiniteLossError, match="running_var became NaN or infinite in epoch 2"):
        fit(net, (x, y), loss=lambda o, t: nn.functional.cross_entropy(o, t), epochs=3, batch_size=16,
            device="cpu", checkpoint=ck, progress=False, callbacks=[Blowup()])
    kept = torch.load(ck, weights_only=True)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_initially_infinite_buffers_are_not_divergence(tmp_path):
    net = nn.Sequential(nn.Linear(4, 3))
    net.register_buffer("mask", torch.full((3,), float("-inf")))  # e.g. a traced graph's constant
    fit(net, (torch.randn(16, 4), torch.randint(0, 3, (16,))), loss=lambda o, y: nn.functional.cross_entropy(o, y),
        epochs=2, batch_size=8, device="cpu", checkpoint=tmp_path / "ck.pt", progress=False)
    fit(net, (torch.randn(16, 4), torch.randint(0, 3, (16,))), loss=lambda o, y: nn.functional.cross_entropy(o, y),
        epochs=2, batch_size=8, device="cpu", checkpoint=tmp_path / "ck.pt", progress=False)  # resumes


# --------------------------------------------------------------------------- group 16: n_way = 1


def test_one_way_episodes_are_refused():
    from metadyn.data import ClassPool, EpisodeSampler

    pool = ClassPool(torch.randn(20, 1, 4, 4), torch.arange(20) % 4)
    with pytest.raises(InputError, match="n_way must be at least 2"):
        EpisodeSampler(pool, 1, 1, 1)


# --------------------------------------------------------------------------- group 14 (library side): widths


@pytest.mark.parametrize("backbone, options, message", [
    ("resnet", {"width": 0}, "resnet width must be a positive integer"),
    ("resnet", {"depth": 8, "exits": "12"}, "resnet exits must be a list"),
    ("conv4", {"width": 0}, "conv4 width must be a positive integer"),
    ("mlp", {"hidden": []}, "mlp hidden must be a non-empty list"),
    ("mlp", {"hidden": [8, 0]}, "mlp hidden width must be a positive integer"),
    ("msdnet", {"channels": 0}, "channels 0"),
    ("msdnet", {"growth": -1}, "growth -1"),
    ("msdnet", {"head_channels": 0}, "head_channels 0"),
    ("msdnet", {"gr_factor": [1, -2, 4]}, "gr_factor"),
    ("msdnet", {"reduction": 0.01, "channels": 4, "growth": 2}, "leaves no channel"),
])
def test_backbone_options_are_validated(backbone, options, message):
    from metadyn.registry import BACKBONES

    with pytest.raises(InputError, match=message):
        BACKBONES.get(backbone)(in_shape=(1, 8, 8), num_classes=10, **options)


def test_any_integer_seed_trains():
    from metadyn.core.backbones.mlp import tiny_mlp_exits
    from metadyn.core.train import seed_everything

    seed_everything(2**70)  # "Overflow when unpacking long long" before (kinds' seed lists have no upper bound)
    fit(tiny_mlp_exits(), (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))), epochs=1, seed=2**70,
        device="cpu", progress=False)


@pytest.mark.parametrize("call, message", [
    (lambda lg, y: md.ece(lg, y + 10), "labels must lie in 0..9"),
    (lambda lg, y: md.ece(lg, y, n_bins=0), "n_bins must be a positive integer"),
    (lambda lg, y: md.ece(lg[:0], y[:0]), "no samples"),
    (lambda lg, y: md.fit_temperatures([lg], y[:10]), r"labels must be \(50,\)"),
    (lambda lg, y: md.fit_temperatures([lg], y.float()), "integer class indices"),
    (lambda lg, y: md.anytime_accuracy([lg], y - 1), "labels must lie in 0..9"),
    (lambda lg, y: md.budgeted_curve([lg, lg], [lg, lg], y + 1, [1.0, 2.0]), "labels must lie in 0..9"),
    (lambda lg, y: md.policy_for_budget([lg, lg], [1.0, 2.0], float("nan")), "finite number"),
    (lambda lg, y: md.policy_for_budget([lg, lg, lg], [1.0, 2.0], 1.5), "3 finite cumulative costs"),
    (lambda lg, y: md.policy_for_budget([lg, lg], [2.0, 1.0], 1.5), "non-decreasing"),
    (lambda lg, y: md.policy_for_budget([lg[:0], lg[:0]], [1.0, 2.0], 1.5), "validation logits are empty"),
    (lambda lg, y: md.keep_labels(y, -1, 0), "per_class must be an integer of at least 0"),
])
def test_evaluation_helpers_refuse_labels_and_budgets_that_would_give_a_silent_number(call, message):
    """Each of these returned a number before (labels out of range counted as errors, n_bins=0 meant one bin, a
    NaN budget gave thresholds, keep_labels(-1) kept all but one label per class)."""
    lg, y = torch.randn(50, 10), torch.randint(0, 10, (50,))
    with pytest.raises(InputError, match=message):
        call(lg, y)


def test_mean_std_of_a_nan_is_nan_not_a_crash():
    m, s = md.mean_std([float("nan"), 1.0])
    assert m != m and s != s


def _teacher():
    torch.manual_seed(0)
    return md.static_cnn((1, 8, 8), 10, [4, 4], 1).eval()


_CONVERT = dict(example_input=torch.rand(1, 1, 8, 8), exits=1, num_impressions=8,
                synthesis=md.SynthesisSettings(steps=1), epochs=1)


@pytest.mark.parametrize("call, message", [
    # convert: a NaN budget gave a report row without thresholds; three means for a 1-channel teacher a torch error
    (lambda: md.convert(_teacher(), budgets=(float("nan"),), **_CONVERT), "budgets must be positive"),
    (lambda: md.convert(_teacher(), budgets=(0.5, 0.0), **_CONVERT), "budgets must be positive"),
    (lambda: md.convert(_teacher(), budgets=0.5, **_CONVERT), "budgets must be positive"),
    (lambda: md.convert(_teacher(), mean=[0.5] * 3, std=[0.2] * 3, **_CONVERT), "need 1 or 1 values"),
    # thresholds: iters=0 returned thresholds that ignore the budget; a NaN budget in the GA a TypeError
    (lambda: fit_thresholds_for_budget(torch.rand(3, 20), [1.0, 2.0, 3.0], 2.0, iters=0), "iters >= 1"),
    (lambda: md.ga_thresholds(torch.rand(3, 20), torch.rand(3, 20) > 0.5, [1.0, 2.0, 3.0], float("nan")),
     "finite number"),
    # fewer temperatures than exits: an IndexError deep in scoring
    (lambda: md.policy_scores([torch.randn(4, 3)] * 2, temperatures=[1.0]), "1 temperatures for a network with 2"),
    # a temperature of 0 gave a NaN loss; a NaN consistency weight or a 0-wide projector built a network
    (lambda: md.kd_loss(torch.randn(4, 3), torch.randn(4, 3), tau=0.0), "positive, finite temperature"),
    (lambda: md.ExitConsistency([8, 8], weight=float("nan")), "weight must be a finite number"),
    (lambda: md.ExitConsistency([8, 8], hidden=0), "hidden width"),
])
def test_library_calls_refuse_arguments_that_gave_a_silent_number(call, message):
    with pytest.raises(InputError, match=message):
        call()


def _tiny_meta_net():
    return md.conv4_exits((1, 8, 8), num_classes=3, width=4, norm="group")


_NAN, _INF = float("nan"), float("inf")


def _row(exit_: int, accuracy: float) -> dict:
    return {"group": "a", "exit": exit_, "accuracy": accuracy}


@pytest.mark.parametrize("call, message", [
    # operating_point: (N, 1) labels broadcast to N x N, out-of-range labels scored 0, no error
    (lambda lg, y: md.operating_point(tiny_resnet_exits().eval(), [lg, lg], [lg, lg], torch.randn(50, 1, 8, 8),
                                      y[:, None], [1.0, 2.0], 2.0), r"labels must be \(50,\)"),
    (lambda lg, y: md.operating_point(tiny_resnet_exits().eval(), [lg, lg], [lg, lg], torch.randn(50, 1, 8, 8),
                                      y + 10, [1.0, 2.0], 2.0), "labels must lie in 0..9"),
    (lambda lg, y: md.operating_point(tiny_resnet_exits().eval(), [lg, lg], [lg, lg], torch.randn(10, 1, 8, 8),
                                      y, [1.0, 2.0], 2.0), "10 samples in x but 50 rows"),
    # all-NaN validation logits gave thresholds (-inf, inf, -inf): every test sample out at exit 0
    (lambda lg, y: md.policy_for_budget([lg * _NAN] * 3, [1.0, 2.0, 3.0], 2.0), "not all finite"),
    (lambda lg, y: md.budgeted_curve([lg * _NAN] * 2, [lg] * 2, y, [1.0, 2.0]), "not all finite"),
    (lambda lg, y: md.budgeted_curve([lg] * 2, [lg] * 2, y, [1.0, 2.0], ps=[0.0]), "finite p > 0"),
    # NaN logits: T = 1.0 quietly, ECE NaN; int32 labels a torch dtype error
    (lambda lg, y: md.fit_temperatures([lg * _NAN], y), "not all finite"),
    (lambda lg, y: md.ece(lg * _INF, y), "non-finite probabilities"),
    # GA: a NaN cost or no samples a TypeError, decreasing costs a wrong message, a float population a torch error
    (lambda lg, y: md.ga_thresholds(torch.rand(3, 20), torch.rand(3, 20) > 0.5, [1.0, _NAN, 3.0], 1.5),
     "finite cumulative costs"),
    (lambda lg, y: md.ga_thresholds(torch.rand(3, 20), torch.rand(3, 20) > 0.5, [3.0, 2.0, 1.0], 1.5),
     "non-decreasing"),
    (lambda lg, y: md.ga_thresholds(torch.rand(3, 0), torch.rand(3, 0) > 0.5, [1.0, 2.0, 3.0], 1.5),
     "validation logits are empty"),
    (lambda lg, y: md.ga_thresholds(torch.rand(3, 20), torch.rand(3, 20) > 0.5, [1.0, 2.0, 3.0], 1.5,
                                    population=4.5), "population >= 4"),
    (lambda lg, y: md.BudgetPolicy.from_budget([], 1.0), "needs the exits' costs"),
    # statistics: rows paired by position across runs, NaN p-values poisoning Holm, inf differences
    (lambda lg, y: md.aggregate([[_row(0, 0.5), _row(1, 0.6)], [_row(1, 0.9), _row(0, 0.1)]]), "differ in"),
    (lambda lg, y: md.aggregate([[_row(0, 0.5)], [_row(0, 0.5), _row(1, 0.6)]]), "differ in"),
    (lambda lg, y: md.aggregate([[{"group": "a", "exit": 0}]]), "without the key"),
    (lambda lg, y: md.holm([{"difference": 1, "p": 0.001}, {"difference": 1, "p": _NAN}]), r"lie in \[0, 1\]"),
    (lambda lg, y: md.holm([{"difference": 1, "p": -0.1}]), r"lie in \[0, 1\]"),
    (lambda lg, y: md.paired([0.1, _INF, 0.2]), "finite numbers"),
    # meta-learner: NaN rates and weights accepted, a fractional exit index cut to an integer
    (lambda lg, y: md.MetaLearner(_tiny_meta_net(), inner_lr=_NAN), "inner_lr must be a finite"),
    (lambda lg, y: md.MetaLearner(_tiny_meta_net(), inner_lr=_INF), "inner_lr must be a finite"),
    (lambda lg, y: md.MetaLearner(_tiny_meta_net(), exit_weights=[_NAN] * 4), "exit_weights must be a finite"),
    (lambda lg, y: md.MetaLearner(_tiny_meta_net(), exits=[1.7]), "integer exit indices"),
    (lambda lg, y: md.MetaLearner(_tiny_meta_net(), exit_weights=[0, 0, 0, 0]), "all zero"),
    (lambda lg, y: md.ExitConsistency([8, 8], ce_weights=[-1.0, 1.0]), "exit weights must be finite, non-negative"),
    # impressions: a similarity of another class count a size-mismatch error, a fractional number an IndexError
    (lambda lg, y: md.synthesize_impressions(_teacher(), 4, in_shape=(1, 8, 8), similarity=torch.eye(3),
                                             progress=False), r"\(10, 10\) matrix"),
    (lambda lg, y: md.synthesize_impressions(_teacher(), 2.5, in_shape=(1, 8, 8), progress=False),
     "integer of at least 1"),
])
def test_front_door_calls_refuse_what_gave_a_wrong_number_or_a_torch_error(call, message):
    """Found by probing the front door (sixth session): each returned a silently wrong number or failed inside torch
    or the standard library with a message that does not name the problem."""
    torch.manual_seed(0)
    lg, y = torch.randn(50, 10), torch.randint(0, 10, (50,))
    with pytest.raises(InputError, match=message):
        call(lg, y)


def test_int32_labels_fit_a_temperature_and_inf_gives_a_nan_spread():
    lg, y = torch.randn(50, 10), torch.randint(0, 10, (50,))
    assert md.fit_temperatures([lg], y.int()) == md.fit_temperatures([lg], y)
    m, s = md.mean_std([_INF, 1.0])
    assert m == _INF and s != s
