"""What a run produces, in one schema for every task kind (``metrics.json``).

``rows``: one per (group, exit) — ``{group, exit, accuracy, mflops, ...}`` where ``group`` names the method,
variant or condition (``"model"`` when a kind trains one network) and optional keys are ``accuracy_std``
and ``n`` (over seeds), ``ci95`` (over episodes), ``ece``, ``ece_calibrated``, ``temperature``, ``val_accuracy``.
``curves``: accuracy-vs-MFLOPs points ``{group, mflops, accuracy, ...}``. ``budgets``: accuracy at a share of
the static FLOPs ``{group, budget_fraction, accuracy, mflops, ...}``. ``comparisons``: paired differences
``{group, against, at, difference, se, n, p, p_holm, verdict}`` (see :mod:`metadyn.core.stats`).
``extra``: what only this kind has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class Results:
    dataset: str
    rows: list[dict]
    curves: list[dict] = field(default_factory=list)
    budgets: list[dict] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def groups(self) -> list[str]:
        return list(dict.fromkeys(r["group"] for r in self.rows))

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "rows": self.rows, "curves": self.curves, "budgets": self.budgets,
                "comparisons": self.comparisons, "extra": self.extra}


def settings(device) -> dict:
    """What a figure depends on besides the config: device (and its name; CUDA and cuDNN versions on a GPU),
    intra-op threads (the summation order of a CPU convolution depends on how many threads split it, so a
    different count can change a few predictions), the kernel switches (deterministic algorithms, cuDNN
    autotuning, TF32 in matrix multiplications and convolutions: :func:`metadyn.core.device.configure_kernels`),
    the precision of fits and inference, the number of processes, and versions. A run is bit-reproducible when
    all of these agree (on a GPU, only with deterministic kernels)."""
    import torch

    from metadyn.core import distributed
    from metadyn.core.device import environment

    env = environment(device)
    return {"device": str(device), "device_name": env["device_name"], "cuda": env["cuda"], "cudnn": env["cudnn"],
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "deterministic_algorithms": env["deterministic_algorithms"],
            "cudnn_deterministic": env["cudnn_deterministic"], "cudnn_benchmark": env["cudnn_benchmark"],
            "matmul_fp32_precision": env["matmul_fp32_precision"], "conv_fp32_precision": env["conv_fp32_precision"],
            "precision": env["precision"], "world_size": distributed.world_size(),
            "dtype": str(torch.get_default_dtype()), "torch": torch.__version__,
            "reuse_freed_memory": os.environ.get("METADYN_REUSE_MEMORY", "1") != "0"}
