"""Where and how tensors compute: a module's device, the numeric precision (float32, or bfloat16 autocast), the
kernel switches (cuDNN autotuning, TF32, deterministic algorithms) and what a result depends on.

Every API that computes takes ``device=`` (``None``: the device of the model it is given, so a model moved to a
GPU computes there and nothing is moved behind the caller's back) and ``precision=`` (``None``: the ambient
precision of :func:`default_precision`, float32 unless ``metadyn run --precision bf16`` set it). Exit thresholds
must be fitted at the precision used for inference: :func:`~metadyn.core.inference.collect_logits` and
:func:`~metadyn.core.inference.dynamic_exit` read the same ambient default.

Kernel switches (:func:`configure_kernels`, ``metadyn run --kernels``):

* ``default``: torch's own (cuDNN picks algorithms by heuristics, TF32 in convolutions but not in matrix
  multiplications on Ampere and later GPUs);
* ``fast``: cuDNN autotuning (``cudnn.benchmark``) and TF32 in convolutions and matrix multiplications;
* ``deterministic``: deterministic algorithms only, no autotuning, no TF32 (``CUBLAS_WORKSPACE_CONFIG`` set).
  Bit-identical resume on a GPU holds only with these; on the CPU it holds with any.

:func:`kernel_settings` and :func:`environment` report them; ``metrics.json`` (``settings``) and every bench JSON
record them.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch
from torch import nn

from metadyn.errors import InputError

PRECISIONS = ("fp32", "bf16")
KERNELS = ("default", "fast", "deterministic")

_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("metadyn_precision", default="fp32")


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for a module that holds no tensor."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {str(precision)[:40]!r}; choose from: {', '.join(PRECISIONS)}")
    return precision


def resolve_precision(precision: str | None) -> str:
    """``precision`` checked, or the ambient default (:func:`default_precision`) when it is None."""
    return _PRECISION.get() if precision is None else check_precision(precision)


@contextlib.contextmanager
def default_precision(precision: str) -> Iterator[None]:
    """Within the block, APIs given ``precision=None`` compute at ``precision`` (``"fp32"`` or ``"bf16"``)."""
    token = _PRECISION.set(check_precision(precision))
    try:
        yield
    finally:
        _PRECISION.reset(token)


def autocast(device: torch.device, precision: str | None = None) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` for ``"bf16"`` (parameters and optimizer state stay float32; matrix
    multiplications and convolutions run in bfloat16, reductions such as softmax and losses in float32);
    nothing for ``"fp32"``. A device without autocast (``meta``) computes in float32."""
    if resolve_precision(precision) == "bf16" and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fits_on(device: torch.device, nbytes: int, share: float = 0.25) -> bool:
    """Whether ``nbytes`` may live on ``device`` for a whole run: always on the CPU; on a GPU when they take at
    most ``share`` of its free memory (the rest is for activations)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= share * free


def configure_kernels(kernels: str = "default") -> None:
    """Set the process's kernel switches: ``"default"``, ``"fast"`` or ``"deterministic"`` (module docstring)."""
    if kernels not in KERNELS:
        raise InputError(f"unknown kernels {str(kernels)[:40]!r}; choose from: {', '.join(KERNELS)}")
    fast, det = kernels == "fast", kernels == "deterministic"
    if det:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's deterministic workspaces
    torch.use_deterministic_algorithms(det)
    torch.backends.cudnn.deterministic = det
    torch.backends.cudnn.benchmark = fast
    torch.backends.cuda.matmul.fp32_precision = "tf32" if fast else "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee" if det else "tf32"


def kernel_settings() -> dict:
    """The kernel switches in force (see :func:`configure_kernels`) and the ambient precision."""
    return {"precision": _PRECISION.get(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "matmul_fp32_precision": _fp32(torch.backends.cuda.matmul.fp32_precision),
            "conv_fp32_precision": _fp32(torch.backends.cudnn.conv.fp32_precision)}


def _fp32(value: str) -> str:
    return "ieee" if value == "none" else value  # "none": inherits the global default, IEEE float32


def environment(device: torch.device | str) -> dict:
    """What a timing or a result depends on besides the code: the device's name, torch, CUDA and cuDNN
    versions, threads and the kernel switches."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    return {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if cuda else _cpu_name(),
            "torch": torch.__version__, "cuda": torch.version.cuda if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None,
            "threads": torch.get_num_threads(), **kernel_settings()}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"
