"""Second-order MAML meta-steps: metadyn vs learn2learn, higher and TorchOpt, same network, weights and episodes.

Conv-4 (32 channels, per-episode BatchNorm statistics) on 28x28 single-channel glyphs, 5-way 1-shot,
15 queries per class, meta-batch of 8 episodes, 1 inner step (lr 0.4), second order, the final exit.
One timed call is one meta-step: the meta-gradient of the whole meta-batch accumulated into ``.grad``,
each library used as its documentation shows (learn2learn ``MAML.clone()/adapt()`` and higher's
``innerloop_ctx(copy_initial_weights=False)``, one backward per episode; TorchOpt as its MAML example does,
``MetaSGD`` with ``extract_state_dict``/``recover_state_dict`` around each episode and one backward of the
mean query loss). TorchOpt is measured when it is installed (``torchopt``: its version and whether its C++
operators loaded). The meta-gradients are compared (``max_rel_diff``) before timing.

Keys: ``tasks_per_s`` and ``peak_mb`` per method, ``speedup_vs_learn2learn``, ``speedup_vs_higher``,
``device``; ``learn2learn_channels_last`` is learn2learn on a channels-last copy of the inputs and
weights, to show how much of metadyn's speed comes from the memory layout alone.

``peak_mb`` is the peak of the tensor memory a meta-step allocates (inputs and weights excluded): on
CUDA ``torch.cuda.max_memory_allocated``; on the CPU a dispatch-mode tracker that adds every new
tensor storage and subtracts it when freed (``tracemalloc`` cannot be used: it sees only Python's
allocator, not torch's).
"""

from __future__ import annotations

import copy
import warnings
import weakref
from typing import Annotated

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from metadyn.bench._timing import Repeats, Seed, Threads, sync, time_interleaved
from metadyn.config import Check
from metadyn.core.backbones.conv4 import conv4_exits
from metadyn.core.runtime import set_threads
from metadyn.core.train import pick_device
from metadyn.data import ClassPool, EpisodeSampler
from metadyn.meta import MetaLearner, to_channels_last
from metadyn.registry import BENCHMARKS

MetaBatch = Annotated[int, Check(ge=1, le=1024)]
Width = Annotated[int, Check(ge=1, le=1024)]
Positive = Annotated[float, Check(gt=0)]


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the context and alive at the same time (views
    of tensors made outside, such as the inputs, count nothing)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, weakref.finalize] = {}

    def _free(self, key: int, n: int) -> None:
        self.current -= n
        self._live.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = tree_flatten((args, kwargs))[0]
        inputs = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self._live and key not in inputs:  # a view allocates nothing
                    self._live[key] = weakref.finalize(st, self._free, key, n)
                    self.current += n
                    self.peak = max(self.peak, self.current)
        return out


def peak_mb(fn, device: torch.device) -> float:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    tracker = TensorPeak()
    with tracker:
        fn()
    return tracker.peak / 2**20


class _Final(torch.nn.Module):
    """The final exit as a plain module (how the peers see the network)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.forward_final(x)


def _torchopt():
    """TorchOpt, if installed, and how it runs: ``{"version", "cxx_ops"}`` (``cxx_ops``: whether its compiled
    operators load; on torch builds it was not compiled against they do not, and it runs its pure-PyTorch
    path — MAML's MetaSGD uses no compiled operator either way), or ``(None, None)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchopt
    except ImportError:
        return None, None
    try:
        from torchopt import _C  # noqa: F401
        cxx = True
    except ImportError:
        cxx = False
    return torchopt, {"version": torchopt.__version__, "cxx_ops": cxx}


@BENCHMARKS.register("maml")
def run(quick: bool = False, meta_batch: MetaBatch = 8, width: Width = 32, inner_lr: Positive = 0.4,
        repeats: Repeats = None, device: str = "auto", threads: Threads = None, seed: Seed = 0) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import higher
        import learn2learn as l2l
    set_threads(threads)  # None: torch's default; 0: one per idle core
    dev = pick_device(device)
    torch.manual_seed(seed)
    pool = ClassPool.from_glyphs("train", samples_per_class=16 + 4)
    batch = [b.to(dev) for b in EpisodeSampler(pool, 5, 1, 15, seed=seed).batch(0, meta_batch)]
    sx, sy, qx, qy = batch
    t = meta_batch
    net = conv4_exits((1, 28, 28), 5, width=width, norm="batch_episodic").to(dev)
    model = _Final(net)

    learner = MetaLearner(net, "maml", inner_lr=inner_lr, inner_steps=1, exits=[net.num_exits - 1])

    def metadyn_step():
        learner.zero_grad(set_to_none=True)
        learner(batch).backward()

    maml = l2l.algorithms.MAML(model, lr=inner_lr, first_order=False, allow_unused=True)

    def l2l_step(m=maml, xs=(sx, qx)):
        m.zero_grad(set_to_none=True)
        for i in range(t):
            clone = m.clone()
            clone.adapt(F.cross_entropy(clone(xs[0][i]), sy[i]))
            (F.cross_entropy(clone(xs[1][i]), qy[i]) / t).backward()

    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    cl_maml = l2l.algorithms.MAML(cl_model, lr=inner_lr, first_order=False, allow_unused=True)
    cl_x = ([to_channels_last(x) for x in sx], [to_channels_last(x) for x in qx])

    def l2l_cl_step():
        l2l_step(cl_maml, cl_x)

    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)

    def higher_step():
        model.zero_grad(set_to_none=True)
        for i in range(t):
            with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
                diffopt.step(F.cross_entropy(fmodel(sx[i]), sy[i]))
                (F.cross_entropy(fmodel(qx[i]), qy[i]) / t).backward()

    torchopt, torchopt_ops = _torchopt()
    torchopt_step = None
    if torchopt is not None:
        inner = torchopt.MetaSGD(model, lr=inner_lr)  # TorchOpt's MAML example (examples/few-shot/maml_omniglot.py)

        def torchopt_step():
            model.zero_grad(set_to_none=True)
            net_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
            opt_state = torchopt.extract_state_dict(inner, by="reference")
            losses = []
            for i in range(t):
                inner.step(F.cross_entropy(model(sx[i]), sy[i]))
                losses.append(F.cross_entropy(model(qx[i]), qy[i]))
                torchopt.recover_state_dict(model, net_state)
                torchopt.recover_state_dict(inner, opt_state)
            torch.mean(torch.stack(losses)).backward()

    def grads(m):
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in m.parameters()])

    metadyn_step()
    ref = grads(net)
    diffs = {}
    fns = {"metadyn": metadyn_step, "learn2learn": l2l_step, "higher": higher_step,
           "learn2learn_channels_last": l2l_cl_step}
    if torchopt_step is not None:
        fns["torchopt"] = torchopt_step
    for name, step in fns.items():
        if name != "metadyn":
            step()
            diffs[name] = float((grads(cl_model if name == "learn2learn_channels_last" else model) - ref).norm()
                                / ref.norm())

    times = time_interleaved(fns, dev, repeats=repeats or (3 if quick else 9), warmup=1 if quick else 2)
    tps = {k: t / v for k, v in times.items()}
    peaks = {k: peak_mb(f, dev) for k, f in fns.items()}
    return {
        "benchmark": "maml",
        "setup": f"conv4 width {width}, 28x28x1 glyphs, 5-way 1-shot, 15 queries/class, meta-batch {meta_batch}, "
                 "1 inner step, second order, final exit",
        "tasks_per_s": tps,
        "speedup_vs_learn2learn": tps["metadyn"] / tps["learn2learn"],
        "speedup_vs_higher": tps["metadyn"] / tps["higher"],
        "speedup_vs_learn2learn_channels_last": tps["metadyn"] / tps["learn2learn_channels_last"],
        "speedup_vs_torchopt": tps["metadyn"] / tps["torchopt"] if "torchopt" in tps else None,
        "torchopt": torchopt_ops,
        "peak_mb": peaks,
        "max_rel_diff": diffs,
        "median_ms": {k: 1e3 * v for k, v in times.items()},
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
