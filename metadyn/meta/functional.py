"""Pure functions of the meta-learning engine: parameter dicts in, parameter dicts out (torch.func).

A model is run on a dict of parameters (:func:`run_exits`, which is :func:`torch.func.functional_call`
with the parameter slots looked up once instead of walking the module tree on every forward); an inner
loop maps a dict to its adapted dict; nothing is cloned. :class:`ExitRunner` lets :func:`run_exits` run
only a prefix of a :class:`~metadyn.core.backbones.base.MultiExitNet` (the trunk up to exit i and head i),
which is what makes "each exit is a task" cheap: exit 0 never computes the deeper blocks.

The batched path for GPUs (:func:`vmapped`): a meta-step on the CPU runs episode after episode (small
operations that a CPU runs back to back at full speed); on a GPU each of those ~19,000 small operations is a
kernel launch, so the episodes of a meta-batch run as one batch with ``torch.func.vmap``, the inner gradients
taken with ``torch.func.grad`` (:func:`inner_loop` with ``functional=True``) and the meta-gradient with
ordinary autograd through both.

References:
    Finn et al., "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", ICML 2017,
    Eq. 1 (inner update) and Eq. 2 (meta-objective); Li et al., "Meta-SGD", 2017, Eq. 3.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metadyn.core.backbones.base import MultiExitNet

Params = dict[str, Tensor]


def to_channels_last(x: Tensor) -> Tensor:
    """``x`` (4-D) in channels-last layout, so that the convolutions reading it run channels-last.

    With one channel the bytes of both layouts coincide and only the strides differ (``.contiguous``
    would keep the NCHW strides): a view with channels-last strides is returned, no copy.
    """
    if x.dim() != 4 or (x.is_contiguous(memory_format=torch.channels_last) and x.stride(1) == 1):
        return x
    n, c, h, w = x.shape
    if c == 1 and x.is_contiguous():
        return x.as_strided((n, c, h, w), (h * w, 1, w, 1), x.storage_offset())
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last).copy_(x)


class ExitRunner(nn.Module):
    """Runs a MultiExitNet up to the exits asked for; its parameters are the net's, prefixed ``net.``.

    ``forward(x, exits, mode)`` with ``exits`` a sorted tuple of exit indices:

    - ``"logits"``: the logits of those exits, computing the trunk once up to the deepest;
    - ``"states"``: the trunk states at those exits (what each exit head reads);
    - ``"head"``: ``x`` is exit ``exits[0]``'s state; returns that head's logits.
    """

    def __init__(self, net: MultiExitNet):
        super().__init__()
        self.net = net
        self._slots: dict[str, list[tuple[nn.Module, str]]] | None = None

    def forget_slots(self) -> None:
        """Drop the cached slots (after the module tree changed); :meth:`slots` finds them again."""
        self._slots = None

    def slots(self) -> dict[str, list[tuple[nn.Module, str]]]:
        """Where each parameter lives: ``name -> [(module, attribute), ...]`` (several for tied weights),
        found once, so that :func:`run_exits` swaps parameters without walking the module tree. The cache
        is not refreshed by itself: call :meth:`forget_slots` after replacing a submodule or parameter
        (:class:`~metadyn.meta.learner.MetaLearner` does at every meta-step)."""
        if self._slots is None:
            first: dict[int, str] = {}
            slots: dict[str, list[tuple[nn.Module, str]]] = {}
            for mod_name, mod in self.named_modules(remove_duplicate=False):
                for attr, p in mod._parameters.items():
                    if p is not None:
                        key = first.setdefault(id(p), f"{mod_name}.{attr}" if mod_name else attr)
                        slots.setdefault(key, []).append((mod, attr))
            self._slots = slots
        return self._slots

    def forward(self, x, exits: tuple[int, ...], mode: str = "logits") -> list[Tensor]:
        if mode == "head":
            return [self.net.exit(exits[0], x)[0]]
        state = self.net.stem(x)
        out = []
        for i in range(exits[-1] + 1):
            state = self.net.stage(i, state)
            if i in exits:
                out.append(state if mode == "states" else self.net.exit(i, state)[0])
        return out


@contextmanager
def swapped_parameters(runner: ExitRunner, params: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, the runner's parameters named in ``params`` are those tensors; afterwards the
    module's own parameters are back, also when the block raises.

    The same as ``torch.func.functional_call``'s swap (tied weights are swapped together), with the slots
    looked up once instead of on every call. It also restores a module that appears twice in the tree,
    which ``functional_call`` with its default ``tie_weights=True`` does not do in torch 2.14.1: the passed
    tensor stays in the module after the call. Keys that are not parameters of the runner raise a
    ``KeyError``.
    """
    slots = runner.slots()
    saved = []
    try:
        for k, v in params.items():
            for mod, attr in slots[k]:
                saved.append((mod, attr, mod._parameters[attr]))
                mod._parameters[attr] = v
        yield
    finally:
        for mod, attr, old in reversed(saved):
            mod._parameters[attr] = old


def run_exits(runner: ExitRunner, params: Mapping[str, Tensor], x, exits: tuple[int, ...],
              mode: str = "logits") -> list[Tensor]:
    """``runner(x, exits, mode)`` with the parameters ``params`` (buffers are the runner's own)."""
    with swapped_parameters(runner, params):
        return runner(x, exits, mode)


def inner_loop(loss_fn: Callable[[Params], Tensor], params: Params, keys: Sequence[str],
               lrs: Mapping[str, float | Tensor], steps: int, second_order: bool, functional: bool = False) -> Params:
    """Gradient steps on the parameters ``keys`` of ``params``; the others are used as they are.

    ``theta_{s+1} = theta_s - alpha * grad_theta L_support(theta_s)`` (MAML's Eq. 1; with a tensor
    ``alpha`` per parameter it is Meta-SGD's Eq. 3). With ``second_order`` the adapted parameters stay
    differentiable functions of ``params`` through the gradients (MAML); without, the gradients are
    constants (first-order MAML, Finn et al. Sec. 5.2). A parameter that does not reach the loss gets
    a zero gradient. Works under ``torch.no_grad`` too (evaluation: nothing is kept for an outer loop).
    With ``functional`` the gradients are taken with ``torch.func.grad`` (which ``torch.func.vmap`` can
    batch; ordinary autograd then differentiates through them, as with ``create_graph``).

    Returns:
        A new dict with every key of ``params``.
    """
    fast = dict(params)
    if functional:
        for _ in range(steps):
            grads = torch.func.grad(lambda sub: loss_fn({**fast, **sub}))({k: fast[k] for k in keys})
            if not second_order:
                grads = {k: g.detach() for k, g in grads.items()}
            fast.update({k: fast[k] - lrs[k] * grads[k] for k in keys})
        return fast
    for _ in range(steps):
        with torch.enable_grad():
            sub = [fast[k] if fast[k].requires_grad else fast[k].detach().requires_grad_() for k in keys]
            loss = loss_fn({**fast, **dict(zip(keys, sub))})
            grads = torch.autograd.grad(loss, sub, create_graph=second_order, allow_unused=True)
        fast.update({k: p - lrs[k] * g for k, p, g in zip(keys, sub, grads) if g is not None})
    return fast


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct arg-max predictions (a 0-d tensor)."""
    return (logits.argmax(-1) == y).float().mean()


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits, y)


def _elementary_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Batch normalisation with batch statistics written with elementary operations (see :func:`vmapped`)."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    y = (x - mean) * torch.rsqrt(var + self.eps)
    if self.weight is not None:
        y = y * self.weight.view(shape) + self.bias.view(shape)
    return y


@contextmanager
def vmappable(module: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm of ``module`` that uses batch statistics only (``batch_episodic``)
    computes them with elementary operations. In torch 2.14.1, ``vmap``'s batching rule for the double backward
    of ``batch_norm`` with a learnt weight gives wrong gradients for the layers before it (the meta-gradient of a
    Conv-4's convolutions was off by up to 5%; tests/device/test_batched_maml.py checks the batched path against the
    per-episode one in float64)."""
    patched = [m for m in module.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats]
    try:
        for m in patched:
            m.forward = _elementary_batch_norm.__get__(m)
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


def vmapped(fn: Callable[..., tuple[Tensor, ...]], module: nn.Module, *tensors: Tensor) -> tuple[Tensor, ...]:
    """``fn`` applied to every episode of ``tensors`` (stacked on dimension 0) at once with ``torch.func.vmap``;
    ``module``'s BatchNorm layers run as :func:`vmappable` makes them."""
    with vmappable(module):
        return torch.func.vmap(fn)(*tensors)
