"""A second device on a CPU-only machine, to find device bugs and host synchronisations without a GPU.

Tensors "on the device" are :class:`OnDevice` wrappers: they report the ``meta`` device and hold their data in
a CPU tensor, so every operation really computes (unlike plain ``meta`` tensors, which have no data and cannot
run ``.item()``, ``nonzero`` or a data-dependent branch). Within :func:`fake_device`:

* a factory asked for the ``meta`` device (``torch.zeros(3, device=x.device)``, ``module.to("meta")``,
  ``t.to("meta")``) makes a wrapper;
* an operation that mixes a wrapper with a CPU tensor of one or more dimensions raises :class:`DeviceMix`, as
  CUDA would (a 0-dim CPU tensor is allowed, and so are CPU indices of ``t[idx]`` and ``t[idx] = v``, as CUDA
  allows them; they are recorded in :attr:`FakeDevice.uploads`); ``copy_`` and ``.to`` move data explicitly;
* ``torch.tensor(data, device="meta")`` and ``torch.as_tensor`` make wrappers too;
* every operation that makes the host wait for the device (``.item()``/``bool()``/``int()``/``float()``,
  ``.tolist()``, ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, copies to the CPU, ...)
  is recorded in :attr:`FakeDevice.syncs`.

So a function that runs here computes on the device it was given, and its syncs are counted as a GPU would
see them. ``torch.func`` transforms (``vmap``) do not take such wrappers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

META = torch.device("meta")


class DeviceMix(RuntimeError):
    """A CPU tensor was mixed with tensors on the device."""


class OnDevice(torch.Tensor):
    """A tensor on the fake device: reports ``meta``, computes with the CPU tensor it holds (``inner``)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                   storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                   device=META, requires_grad=inner.requires_grad)

    def __init__(self, inner: torch.Tensor):
        self.inner = inner

    def __repr__(self, *, tensor_contents=None):
        return f"OnDevice({self.inner!r})"

    def tolist(self):
        _record("tolist")
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        raise DeviceMix("numpy() of a tensor on the device: move it to the CPU first")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


_ACTIVE: list[FakeDevice] = []

SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
            "aten::_unique2", "aten::unique_consecutive", "aten::equal", "aten::is_nonzero", "aten::bincount",
            "aten::histc", "aten::nonzero_static"}


INDEX_OPS = ("aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_")


def _record(what: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1].syncs.append(what)


def _is_meta(dev) -> bool:
    return dev is not None and torch.device(dev).type == "meta"


def _run(func, args, kwargs):
    wrapped, plain = [], []

    def unwrap(t):
        if isinstance(t, OnDevice):
            wrapped.append(t)
            return t.inner
        if isinstance(t, torch.Tensor):
            plain.append(t)
        return t

    a, k = tree_map(unwrap, (args, kwargs))
    name = func._schema.name
    dev = k.get("device")
    to_meta = _is_meta(dev)
    if to_meta:
        k["device"] = torch.device("cpu")
    moves = name in ("aten::_to_copy", "aten::copy_", "aten::lift_fresh", "aten::_has_compatible_shallow_copy_type")
    indices = {id(i) for i in (args[1] if name in INDEX_OPS and len(args) > 1 else ()) if isinstance(i, torch.Tensor)}
    if wrapped and indices:
        for i in args[1]:
            if isinstance(i, torch.Tensor) and not isinstance(i, OnDevice) and _ACTIVE:
                _ACTIVE[-1].uploads.append(f"{name} index {tuple(i.shape)}")
    if wrapped and not moves:
        bad = [t for t in plain if t.device.type == "cpu" and t.dim() > 0 and id(t) not in indices]
        if bad:
            shapes = ", ".join(str(tuple(t.shape)) for t in bad[:2])
            raise DeviceMix(f"{name}: CPU tensor(s) {shapes} mixed with tensors on the device")
    if wrapped:
        if name in SYNC_OPS:
            _record(name)
        elif name in INDEX_OPS:
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in (a[1] if len(a) > 1 else [])):
                _record(f"{name} (boolean mask)")
        elif name == "aten::repeat_interleave" and func._overloadname.startswith("Tensor") \
                and k.get("output_size") is None:
            _record(name)
    to_cpu = name == "aten::_to_copy" and dev is not None and torch.device(dev).type == "cpu" and wrapped
    if to_cpu or (name == "aten::copy_" and wrapped and not isinstance(args[0], OnDevice)):
        _record("copy to the CPU")
    out = func(*a, **k)
    mutated = _mutated(func, args, kwargs)
    if mutated is not None:
        return mutated  # an in-place operation returns the tensor it changed (its data changed inside)
    if to_meta or (wrapped and not to_cpu):
        out = tree_map(lambda t: OnDevice(t) if isinstance(t, torch.Tensor) and not isinstance(t, OnDevice) else t,
                       out)
    return out


def _mutated(func, args, kwargs):
    """The argument an in-place operation (``add_``, ``copy_``, ``out=``) writes and returns, or None."""
    rets = func._schema.returns
    if len(rets) != 1 or rets[0].alias_info is None or not rets[0].alias_info.is_write:
        return None
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            return args[i] if i < len(args) else kwargs.get(arg.name)
    return None


class FakeDevice(TorchDispatchMode):
    """The mode that makes factories for ``meta`` produce :class:`OnDevice` tensors; ``syncs`` lists the host
    synchronisations seen while it is active."""

    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []
        self.uploads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(issubclass(t, OnDevice) for t in types):
            return NotImplemented  # the wrapper's own dispatch
        if _is_meta(kwargs.get("device")):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


def _from_data(make):
    """``torch.tensor`` / ``torch.as_tensor`` that build a wrapper for the ``meta`` device (torch builds a tensor
    from Python data below the dispatcher, so a mode never sees it)."""

    def build(data, *args, device=None, **kwargs):
        if _is_meta(device):
            if isinstance(data, OnDevice):
                return make(data, *args, **kwargs)
            return make(data, *args, **kwargs).to(META)
        return make(data, *args, device=device, **kwargs)

    return build


@contextlib.contextmanager
def fake_device() -> Iterator[FakeDevice]:
    """Within the block, ``"meta"`` is a device with data (module docstring)."""
    mode = FakeDevice()
    _ACTIVE.append(mode)
    saved = torch.tensor, torch.as_tensor
    torch.tensor, torch.as_tensor = _from_data(saved[0]), _from_data(saved[1])
    try:
        with mode:
            yield mode
    finally:
        torch.tensor, torch.as_tensor = saved
        _ACTIVE.pop()


@contextlib.contextmanager
def counting(mode: FakeDevice) -> Iterator[list[str]]:
    """The syncs recorded within the block (a fresh list, filled as they happen)."""
    start = len(mode.syncs)
    seen: list[str] = []
    try:
        yield seen
    finally:
        seen.extend(mode.syncs[start:])


def on_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the fake device (call within :func:`fake_device`)."""
    return t.to(META)


def is_on_device(t) -> bool:
    return isinstance(t, OnDevice)
