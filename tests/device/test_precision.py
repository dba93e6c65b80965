"""bfloat16 autocast in fit, inference and impressions (on the CPU here; the cuda tests repeat the inference check
on a GPU), thresholds fitted at the inference precision, the kernel switches and what runs record."""

from __future__ import annotations

import json

import pytest
import torch

from metadyn.cli import main
from metadyn.core.backbones.resnet import tiny_resnet_exits
from metadyn.core.device import (
    configure_kernels,
    default_precision,
    environment,
    kernel_settings,
    module_device,
    resolve_precision,
)
from metadyn.core.flops import exit_costs
from metadyn.core.inference import collect_logits, dynamic_exit
from metadyn.core.policies import pick_exits, policy_for_budget
from metadyn.core.train import fit
from metadyn.errors import InputError

IN_SHAPE, CLASSES = (1, 8, 8), 5


def _trained(precision: str):
    torch.manual_seed(0)
    net = tiny_resnet_exits(IN_SHAPE, CLASSES)
    x, y = torch.rand(64, *IN_SHAPE), torch.arange(64) % CLASSES
    state = fit(net, (x, y), epochs=2, batch_size=16, precision=precision, progress=False)
    return net, state


def test_bf16_fit_keeps_float32_weights_and_differs_from_fp32():
    a, sa = _trained("fp32")
    b, sb = _trained("bf16")
    assert all(p.dtype == torch.float32 for p in b.parameters())
    la, lb = sa.history[-1]["loss"], sb.history[-1]["loss"]
    assert lb == lb and la != lb  # finite, and bf16 really ran


def test_thresholds_fitted_at_the_inference_precision_give_the_same_exits():
    net, _ = _trained("fp32")
    net.eval()
    val = torch.rand(80, *IN_SHAPE)
    cum = exit_costs(net, IN_SHAPE).cumulative
    with default_precision("bf16"):
        logits = collect_logits(net, val)
        policy = policy_for_budget(logits, cum, 0.6 * cum[-1])
        res = dynamic_exit(net, val, policy)  # the same ambient precision
    fp32 = collect_logits(net, val, precision="fp32")
    assert any(not torch.equal(a, b) for a, b in zip(logits, fp32))  # the logits are bf16's
    idx, _ = pick_exits(logits, policy)
    assert torch.equal(res.exit_idx, idx)  # the exits the thresholds were fitted for
    assert torch.equal(collect_logits(net, val, precision="bf16")[0], logits[0])


def test_precision_and_kernels_are_checked_and_recorded():
    assert resolve_precision(None) == "fp32"
    with default_precision("bf16"):
        assert resolve_precision(None) == "bf16" and kernel_settings()["precision"] == "bf16"
    with pytest.raises(InputError, match="precision"):
        resolve_precision("fp16")
    with pytest.raises(InputError, match="kernels"):
        configure_kernels("fastest")
    try:
        configure_kernels("fast")
        k = kernel_settings()
        assert k["cudnn_benchmark"] and k["matmul_fp32_precision"] == "tf32" and not k["deterministic_algorithms"]
        configure_kernels("deterministic")
        k = kernel_settings()
        assert k["deterministic_algorithms"] and k["cudnn_deterministic"] and k["conv_fp32_precision"] == "ieee"
    finally:
        configure_kernels("default")
    k = kernel_settings()
    assert not k["cudnn_benchmark"] and not k["deterministic_algorithms"] and k["matmul_fp32_precision"] == "ieee"
    env = environment("cpu")
    assert env["device"] == "cpu" and env["device_name"] and env["cuda"] is None and env["torch"] == torch.__version__


def test_apis_default_to_the_models_device():
    net = tiny_resnet_exits(IN_SHAPE, CLASSES)
    assert module_device(net) == torch.device("cpu") and module_device(torch.nn.ReLU()) == torch.device("cpu")


def test_impressions_in_bf16():
    from metadyn.datafree.impressions import SynthesisSettings, synthesize_impressions

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, CLASSES))
    s = SynthesisSettings(steps=5, batch_size=10)
    a = synthesize_impressions(teacher, 10, in_shape=IN_SHAPE, settings=s, precision="bf16")
    b = synthesize_impressions(teacher, 10, in_shape=IN_SHAPE, settings=s)
    assert a.x.dtype == torch.float32 and not torch.equal(a.x, b.x)


# --------------------------------------------------------------------------- the switches on the command line

FAST = ["--set", "train.epochs=1", "--set", "model.options={depth: 8, exits: [1, 2], width: 4}", "--no-progress"]


def test_run_device_precision_kernels_switches(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "digits_anytime", "--quick", "--out", str(out), "--device", "cpu", "--precision", "bf16",
                 "--kernels", "deterministic", *FAST]) == 0
    configure_kernels("default")
    s = json.loads((out / "metrics.json").read_text())["settings"]
    assert s["device"] == "cpu" and s["precision"] == "bf16" and s["deterministic_algorithms"] and s["world_size"] == 1
    assert {"device_name", "cuda", "cudnn", "matmul_fp32_precision", "conv_fp32_precision", "cudnn_benchmark"} <= set(s)
    # the device is not part of the run's identity: the same run resumes elsewhere (here: auto, the CPU); its
    # precision is (a resumed run never mixes precisions)
    assert main(["run", "digits_anytime", "--quick", "--out", str(out), "--set", "device=auto", "--precision", "bf16",
                 *FAST]) == 0
    assert "different config" not in capsys.readouterr().err
    for bad, word in ((["--device", "meta"], "meta"), (["--device", "tpu"], "tpu"), (["--precision", "fp16"], "fp16"),
                      (["--kernels", "fastest"], "fastest")):
        assert main(["run", "digits_anytime", "--quick", "--out", str(tmp_path / "bad"), *bad, *FAST]) == 2
        err = capsys.readouterr().err
        assert word in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_bench_json_records_the_environment(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "impressions", "--quick", "--device", "cpu", "--json", str(out), "--set", "batch=16",
                 "--set", "repeats=1"]) == 0
    env = json.loads(out.read_text())["environment"]
    assert env["device"] == "cpu" and env["device_name"] and {"torch", "cuda", "cudnn", "cudnn_benchmark",
                                                                "matmul_fp32_precision", "precision"} <= set(env)
