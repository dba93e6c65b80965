"""Convert your own network: a user's torchvision / registered / function-built classifier, loaded from a state
dict, becomes an early-exit network from one call (``md.convert``) and from a task file; bad specs are one line."""

from __future__ import annotations

import pytest
import torch

import metadyn as md
from metadyn.cli import main
from metadyn.core.backbones.attach import auto_cut_points, list_cut_points
from metadyn.datafree import InputSpace, PriorSettings, SynthesisSettings, build_teacher, synthesize_impressions
from metadyn.datafree.priors import ImagePrior, make_prior, resolve_prior
from metadyn.errors import InputError
from metadyn.runner import run_task

pytest.importorskip("torchvision")

VIT = "torchvision.models.vision_transformer:VisionTransformer"
TINY_VIT = {"image_size": 8, "patch_size": 4, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
# (builder, options, exits.at): tiny random-weight instances for 1x8x8 digits, 10 classes
TEACHERS = {
    "resnet": ("resnet18", {}, "auto"),
    "mobilenet_v3": ("mobilenet_v3_small", {}, "auto"),
    "vit": (VIT, {**TINY_VIT, "num_classes": 10}, ["encoder.layers.encoder_layer_0"]),
}
QUICK_SYNTH = SynthesisSettings(steps=2, batch_size=32)


def _teacher(kind: str, in_channels: int = 1) -> torch.nn.Module:
    builder, options, _ = TEACHERS[kind]
    torch.manual_seed(0)
    net = build_teacher(builder, options, num_classes=10, in_channels=in_channels)
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()):  # non-trivial running statistics
        net.train()
        with torch.no_grad():
            net(torch.rand(16, in_channels, 8, 8))
    return net.eval()


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_one_call_converts_a_torchvision_classifier(kind):
    teacher = _teacher(kind, in_channels=3)
    at = TEACHERS[kind][2]
    x = torch.randn(40, 3, 8, 8)
    before = teacher(x).detach().clone()
    y = torch.arange(40) % 10
    net, report = md.convert(teacher, at, example_input=x[:2], exits=2, num_impressions=40, synthesis=QUICK_SYNTH,
                             mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], data=(x, y), epochs=1, batch_size=16)
    k = 3 if at == "auto" else 2
    assert net.num_exits == k and len(report.at) == k - 1 and len(report.mflops) == k
    assert torch.equal(net.eval()(x).logits[-1], before)  # the teacher's own output, bit for bit
    assert torch.equal(teacher(x), before)
    assert report.prior == ("image" if kind == "vit" else "bn")
    assert all(a < b for a, b in zip(report.mflops, report.mflops[1:]))
    assert report.agreement[-1] == 1.0 and len(report.accuracy) == k and report.data_size == 40
    assert report.accuracy[-1] == pytest.approx(float((before.argmax(-1) == y).float().mean()))
    for b in report.budgets:  # thresholds fitted on held-out impressions meet the budget there
        if b["thresholds"] is not None:
            assert b["impression_mflops"] <= b["budget_mflops"] + 1e-9 and b["accuracy"] is not None
    assert "agreement with the teacher" in str(report)


def test_without_data_the_report_has_thresholds_but_no_accuracy():
    teacher = _teacher("resnet")
    net, report = md.convert(teacher, example_input=torch.rand(1, 1, 8, 8), exits=2, num_impressions=20,
                             synthesis=QUICK_SYNTH, epochs=1, prior="none")
    assert report.accuracy is None and report.prior == "none" and report.data_size == 0
    assert any(b["thresholds"] is not None and "accuracy" not in b for b in report.budgets)


def test_impressions_stay_in_the_teachers_valid_input_range():
    teacher = _teacher("resnet", in_channels=2)
    space = InputSpace((0.0, 1.0), mean=[0.2, 0.7], std=[0.5, 0.1])
    imps = synthesize_impressions(space.synthesis_model(teacher), 32, in_shape=(2, 8, 8), seed=0,
                                  settings=SynthesisSettings(steps=3, batch_size=32, lr=0.5))
    x = space.to_teacher(imps.x)
    mean, std = torch.tensor([0.2, 0.7]), torch.tensor([0.5, 0.1])
    lo, hi = (0 - mean) / std, (1 - mean) / std
    per_channel = x.transpose(0, 1).flatten(1)
    assert (per_channel.min(1).values >= lo - 1e-5).all() and (per_channel.max(1).values <= hi + 1e-5).all()
    assert (per_channel.max(1).values > 0).all()  # they moved into the normalised space
    with pytest.raises(InputError, match="both mean and std"):
        InputSpace((0, 1), mean=[0.5])
    with pytest.raises(InputError, match="std positive"):
        InputSpace((0, 1), mean=[0.5], std=[0.0])


def test_the_image_prior_is_used_for_a_network_without_batchnorm():
    vit, resnet = _teacher("vit"), _teacher("resnet")
    assert resolve_prior("auto", vit) == "image" and resolve_prior("auto", resnet) == "bn"
    assert isinstance(make_prior("auto", vit), ImagePrior)
    x = torch.rand(4, 1, 8, 8)
    with make_prior("image", vit) as prior:
        vit(x)
        term = prior.pop()
    tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    assert float(term) == pytest.approx(float(tv + x.pow(2).mean()))
    with pytest.raises(InputError, match="prior"):
        PriorSettings(prior="magic").check()
    # the synthesis uses it: smoother impressions than without a prior, same seed
    base = SynthesisSettings(steps=20, batch_size=20, lr=0.1, init="uniform")
    plain = synthesize_impressions(vit, 20, in_shape=(1, 8, 8), settings=base, seed=0)
    smooth = synthesize_impressions(vit, 20, in_shape=(1, 8, 8), seed=0,
                                    settings=PriorSettings(**{**vars(base), "bn_weight": 5.0, "prior": "image"}))
    tv_of = lambda z: float((z[..., 1:, :] - z[..., :-1, :]).abs().mean())  # noqa: E731
    assert tv_of(smooth.x) < tv_of(plain.x)


def test_auto_cut_points_split_the_flops_evenly_on_the_main_path():
    resnet = _teacher("resnet")
    x = torch.randn(1, 1, 28, 28)
    assert auto_cut_points(resnet, x, 3) == ["layer1", "layer2", "layer3"]  # the least nested name at a level
    points = {p.name: p for p in list_cut_points(resnet, x)}
    assert points["layer1"].shape == (64, 7, 7) and 0 < points["layer1"].flops < points["layer2"].flops
    assert points["layer1.1.bn2"].flops == points["layer1"].flops  # inside the block: same FLOPs, not on the path
    mobile = _teacher("mobilenet_v3", in_channels=3)
    x = torch.randn(1, 3, 32, 32)
    names = auto_cut_points(mobile, x, 2)
    assert all(".block." not in n for n in names)  # never inside a block (a squeeze-excitation branch)
    flops = {p.name: p.flops for p in list_cut_points(mobile, x)}
    assert flops[names[0]] < flops[names[1]]
    with pytest.raises(InputError, match="fewer than"):
        auto_cut_points(_teacher("vit"), torch.rand(1, 1, 8, 8), 50)
    with pytest.raises(InputError, match="positive integer"):
        auto_cut_points(resnet, x, 0)


# --------------------------------------------------------------------------- task files


def _task(tmp_path, builder, options, at, checkpoint, extra=""):
    at_yaml = at if isinstance(at, str) else "[" + ", ".join(at) + "]"
    text = f"""task: convert_test
kind: datafree
seeds: [0]
device: cpu
data: {{name: digits, val_fraction: 0.05, calib_fraction: 0.05, test_fraction: 0.1}}
eval: {{calibrate: false}}
teacher: {{builder: {builder!r}, options: {options!r}, checkpoint: {str(checkpoint)!r}}}
exits: {{at: {at_yaml}, count: 2, train: {{epochs: 1, batch_size: 64}}}}
impressions: {{num: 32, holdout: 16, prior: auto, synth: {{steps: 2, batch_size: 32}}}}
conditions: [impressions_bn, noise]
{extra}"""
    path = tmp_path / "convert_test.yaml"
    path.write_text(text.replace("'", '"'))
    return path


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_a_users_checkpoint_converts_from_a_task_file(kind, tmp_path):
    builder, options, at = TEACHERS[kind]
    teacher = _teacher(kind)
    ck = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), ck)
    out, m = run_task(_task(tmp_path, builder, options, at, ck), out=tmp_path / "run", progress=False)
    data = md.load_classification("digits", seed=0, val_fraction=0.05, calib_fraction=0.05, test_fraction=0.1)
    expected = float((teacher(data.test.x).argmax(-1) == data.test.y).double().mean())
    k = 3 if at == "auto" else 2
    for group in ("impressions_bn", "noise"):
        rows = [r for r in m["rows"] if r["group"] == group]
        assert len(rows) == k and rows[-1]["accuracy"] == pytest.approx(expected)  # the loaded teacher, unchanged
    assert m["extra"]["teacher_test_accuracy"][0] == pytest.approx(expected)
    assert len(m["extra"]["exits_at"]) == k - 1
    free = m["extra"]["budgets_datafree"]
    assert {b["group"] for b in free} == {"impressions_bn", "noise"}
    report = (out / "report.md").read_text()
    assert "Fully data-free mode" in report and "held-out impressions" in report
    prior = "image prior" if kind == "vit" else "BatchNorm prior"
    assert f"data impressions + {prior}" in report
    assert not (out / "checkpoints" / "seed0_teacher.pt").exists()  # loaded, not trained


def test_a_builder_without_checkpoint_is_trained_by_the_task(tmp_path):
    path = _task(tmp_path, VIT, {**TINY_VIT, "num_classes": 10}, ["encoder.layers.encoder_layer_0"], "x")
    path.write_text(path.read_text().replace(', checkpoint: "x"', ", train: {epochs: 1}"))
    out, m = run_task(path, out=tmp_path / "run", progress=False)
    assert (out / "checkpoints" / "seed0_teacher.pt").is_file() and m["rows"]


def _bad_checkpoints(tmp_path):
    resnet = _teacher("resnet")
    paths = {}
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    paths["list"] = (tmp_path / "list.pt", "is not a state dict")
    torch.save(_teacher("vit").state_dict(), tmp_path / "vit.pt")
    paths["other_net"] = (tmp_path / "vit.pt", "does not fit")
    state = resnet.state_dict()
    state["fc.weight"] = torch.zeros(3, state["fc.weight"].shape[1])
    torch.save(state, tmp_path / "shape.pt")
    paths["shape"] = (tmp_path / "shape.pt", "has shape")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    paths["garbage"] = (tmp_path / "garbage.pt", "cannot be read safely")
    paths["missing"] = (tmp_path / "nope.pt", "does not exist")
    return paths


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    for name, (ck, msg) in _bad_checkpoints(tmp_path).items():
        with pytest.raises(InputError, match=msg):
            build_teacher("resnet18", {}, ck, num_classes=10, in_channels=1)
        path = _task(tmp_path, "resnet18", {}, "auto", ck)
        with pytest.raises(InputError, match=msg):
            run_task(path, out=tmp_path / f"run_{name}", progress=False)
        assert not (tmp_path / f"run_{name}").exists()


@pytest.mark.parametrize("teacher, msg", [
    ("{builder: resnet_nineteen}", "unknown teacher builder"),
    ("{builder: 'nowhere.module:make'}", "cannot be imported"),
    ("{builder: 'torch.nn:Identity'}", "Identity"),
    ("{builder: resnet18, options: {bogus: 1}}", "options"),
    ("{builder: 'torchvision.models:resnet18', options: {bogus: 1}}", "bogus"),
    ("{checkpoint: teacher.pt}", "needs teacher.builder"),
    ("{builder: resnet18, mean: [0.5]}", "both mean and std"),
    ("{builder: resnet18, mean: [0.5, 0.5, 0.5], std: [1, 1, 1]}", "1 or 1 values"),
])
def test_bad_teacher_specs_are_one_line_errors(tmp_path, monkeypatch, capsys, teacher, msg):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(f"kind: datafree\nseeds: [0]\ndata: {{name: digits}}\nteacher: {teacher}\nexits: {{at: auto}}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metadyn: error: ") and err.count("\n") == 1
    import re

    assert re.search(msg, err), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", ["exits.at=somewhere", "exits.count=0", "impressions.prior=magic",
                                 "impressions.holdout=-1"])
def test_bad_exit_and_prior_settings_are_refused(tmp_path, bad):
    path = _task(tmp_path, "resnet18", {}, "auto", "x")
    path.write_text(path.read_text().replace(', checkpoint: "x"', ""))
    with pytest.raises(InputError):
        run_task(path, [bad], out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_registered_backbone_is_a_teacher_through_its_final_exit(tmp_path):
    torch.manual_seed(0)
    net = build_teacher("conv4", {"width": 8}, in_shape=(1, 8, 8), num_classes=5).eval()
    torch.save(net.state_dict(), tmp_path / "conv4.pt")
    loaded = build_teacher("conv4", {"width": 8}, tmp_path / "conv4.pt", in_shape=(1, 8, 8), num_classes=5).eval()
    x = torch.rand(6, 1, 8, 8)
    assert torch.equal(loaded(x), net.net.forward_final(x))
    assert auto_cut_points(loaded, x[:1], 2) == ["net.blocks.0", "net.blocks.1"]
    exits, report = md.convert(loaded, "auto", example_input=x[:1], exits=2, num_impressions=20, epochs=1,
                               synthesis=QUICK_SYNTH)
    assert torch.equal(exits.eval()(x).logits[-1], loaded(x)) and report.at == ["net.blocks.0", "net.blocks.1"]
    with pytest.raises(InputError, match="in_shape and num_classes"):
        build_teacher("conv4", {})
