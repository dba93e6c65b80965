"""Tracing a static network for exits: its fx graph in one mode, what each node produced on an example
input, which graph value each watched submodule returned, and (optionally) the FLOPs run up to each node."""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from metadyn.errors import InputError


class ExitTracer(fx.Tracer):
    """An fx tracer that treats ``leaf_types`` as leaves and records the output of each call of the
    modules in ``watch`` (name -> module)."""

    def __init__(self, watch: dict[str, nn.Module], leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types
        self.calls: dict[str, list[Any]] = {name: [] for name in watch}
        self._names: dict[int, list[str]] = {}
        for name, m in watch.items():
            self._names.setdefault(id(m), []).append(name)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from metadyn.core.heads import ExitHead  # branches on its input's rank: a leaf (a registered backbone's head)

        return isinstance(m, (*self.leaf_types, ExitHead)) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        for name in self._names.get(id(m), ()):
            self.calls[name].append(out)
        return out


@dataclass
class ValueInfo:
    """What the example run produced at one node: whether it is a tensor, and its tensor leaves.

    ``storages``: the memory its tensor leaves live in, one id per distinct storage (two nodes with a
    common id share memory: a view, or the very tensor an in-place op returned)."""

    is_tensor: bool
    shapes: list[torch.Size]
    dtype: torch.dtype | None
    device: torch.device | None
    storages: frozenset[int] = frozenset()


def _tensors(val: Any) -> list[Tensor]:
    return [t for t in tree_leaves(val) if isinstance(t, Tensor)]


def _version(t: Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


class Recorder(fx.Interpreter):
    """Runs a traced graph on the original module and records a :class:`ValueInfo` per node and, when a
    ``counter`` is given, the FLOPs it has counted once each node has run (cumulative, in graph order).

    It also records which nodes wrote to one of their inputs in place (``writes``: {(writer, input)}, seen
    from the input's version counter) and which returned one of their inputs itself (``same``: node ->
    input, as an in-place op returns its argument)."""

    def __init__(self, module: nn.Module, graph: fx.Graph, counter: FlopCounterMode | None = None):
        super().__init__(module, graph=graph)
        self.info: dict[fx.Node, ValueInfo] = {}
        self.flops: dict[fx.Node, int] = {}
        self.counter = counter
        self.writes: set[tuple[fx.Node, fx.Node]] = set()
        self.same: dict[fx.Node, fx.Node] = {}
        # storage ids: a data pointer names one storage only while some tensor holding it lives (weakrefs)
        self._storage: dict[int, tuple[int, list[weakref.ref]]] = {}
        self._next_sid = 0

    def _storage_id(self, t: Tensor) -> int | None:
        try:
            if t.numel() == 0:
                return None
            ptr = t.untyped_storage().data_ptr()
            ref = weakref.ref(t)
        except (RuntimeError, TypeError, NotImplementedError):  # sparse and other storage-less tensors
            return None
        if ptr == 0:  # no memory (meta tensors)
            return None
        sid, refs = self._storage.get(ptr, (-1, []))
        if sid < 0 or all(r() is None for r in refs):  # a new storage (perhaps where a freed one was)
            sid, refs = self._next_sid, []
            self._next_sid += 1
            self._storage[ptr] = (sid, refs)
        refs.append(ref)
        return sid

    def run_node(self, n: fx.Node) -> Any:
        inputs = [(u, t, _version(t)) for u in n.all_input_nodes for t in _tensors(self.env.get(u))]
        val = super().run_node(n)
        for u, t, before in inputs:
            if before is not None and _version(t) != before:
                self.writes.add((n, u))
        if isinstance(val, Tensor):
            for u in n.all_input_nodes:
                if self.env.get(u) is val:
                    self.same[n] = u
                    break
        leaves = _tensors(val)
        first = leaves[0] if leaves else None
        self.info[n] = ValueInfo(
            isinstance(val, Tensor),
            [t.shape for t in leaves],
            first.dtype if first is not None else None,
            first.device if first is not None else None,
            frozenset(s for s in map(self._storage_id, leaves) if s is not None),
        )
        if self.counter is not None:
            self.flops[n] = int(self.counter.get_total_flops())
        return val


@dataclass
class Trace:
    """A network's graph in one mode and what the example input produced in it.

    Attributes:
        graph: the fx graph (``train`` mode or eval mode).
        calls: for each watched name, the graph values (fx Proxies) its module returned, one per call.
        info: per node, the :class:`ValueInfo` of the example run.
        lifted: tensors (and other values) the tracer lifted out of ``forward`` (``_tensor_constant0``),
            removed from the model; the graph reads them with ``get_attr``.
        flops: per node, FLOPs counted from the input up to and including that node (with ``count_flops``).
        train: the mode the graph was traced in.
        writes: the (node, input node) pairs where the example run saw a node write to its input in place.
        same: node -> the input node whose very tensor it returned (an in-place op's result).
    """

    graph: fx.Graph
    calls: dict[str, list[Any]]
    info: dict[fx.Node, ValueInfo]
    lifted: dict[str, Any]
    flops: dict[fx.Node, int]
    train: bool
    writes: set[tuple[fx.Node, fx.Node]] = field(default_factory=set)
    same: dict[fx.Node, fx.Node] = field(default_factory=dict)


def _concrete_args(model: nn.Module) -> dict[str, Any]:
    """Defaults of ``forward``'s parameters after the first, specialised at tracing (``mask=None``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not p.empty}


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def trace_graph(model: nn.Module, leaf_types: Sequence[type[nn.Module]] = (), *, train: bool = False,
                tracer: fx.Tracer | None = None) -> tuple[fx.Graph, dict[str, Any]]:
    """The fx graph of ``model`` with every module in ``train`` mode (else eval mode); nothing runs.

    Returns the graph and the constants fx lifted out of ``forward`` (``_tensor_constant0``), which are
    moved off the model; every module's mode is restored.

    Raises:
        InputError: the model cannot be traced (data-dependent control flow).
    """
    cls = type(model).__name__
    tracer = tracer if tracer is not None else ExitTracer({}, tuple(leaf_types))
    modes = {m: m.training for m in model.modules()}
    attrs_before = set(vars(model))
    try:
        model.train(train)
        return tracer.trace(model, concrete_args=_concrete_args(model) or None), _lifted(model, attrs_before)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ... on dynamic control flow
        _lifted(model, attrs_before)
        raise InputError(
            f"torch.fx cannot trace {cls} ({_first_line(e)}); pass the module types with data-dependent "
            "control flow as leaf_modules=(...) so fx treats them as torch.fx leaf modules"
        ) from e
    finally:
        for m, mode in modes.items():
            m.training = mode


def _lifted(model: nn.Module, attrs_before: set[str]) -> dict[str, Any]:
    """Move the attributes tracing added to ``model`` (``_tensor_constant0`` & co) off it."""
    return {k: model.__dict__.pop(k) for k in set(vars(model)) - attrs_before}


def trace_model(model: nn.Module, example_input: Tensor, watch: dict[str, nn.Module],
                leaf_types: Sequence[type[nn.Module]] = (), *, train: bool = False,
                count_flops: bool = False, check_eager: bool = False) -> Trace:
    """Trace ``model`` with every module in ``train`` mode (else eval mode, :func:`trace_graph`) and run
    ``example_input`` through the graph, without gradients, to record what each node produces.

    The example run leaves no trace: it runs with every module in eval mode (the graph's functional calls
    keep the mode they were traced in), torch's random number generators are restored afterwards, and for
    a train-mode graph the buffers too (a functional batch norm may update running statistics); every
    module's mode is restored. With ``check_eager`` (an eval-mode graph) ``model`` itself runs on the
    example input too, from the same random state, and must give the graph's output.

    Raises:
        InputError: the model cannot be traced, the example input fails in it, or (``check_eager``) the
            graph computes something else than the model.
    """
    cls = type(model).__name__
    tracer = ExitTracer(watch, tuple(leaf_types))
    graph, lifted = trace_graph(model, leaf_types, train=train, tracer=tracer)
    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False) if count_flops else None
    recorder = Recorder(model, graph, counter)
    saved = {k: b.clone() for k, b in model.named_buffers()} if train else {}
    devices = [example_input.device] if example_input.device.type == "cuda" else []
    out = eager = None
    # the graph reads the lifted constants as attributes of the model while it runs
    for k, v in lifted.items():
        model.__dict__[k] = v
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            x0 = example_input.clone() if check_eager else None  # the model may write its input in place
            rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]
            if counter is not None:
                with counter:
                    out = recorder.run(example_input)
            else:
                out = recorder.run(example_input)
            if check_eager:
                torch.set_rng_state(rng[0])
                for d, state in zip(devices, rng[1]):
                    torch.cuda.set_rng_state(state, d)
                eager = model(x0)
    except Exception as e:
        raise InputError(f"example_input {tuple(example_input.shape)} fails in {cls}: {_first_line(e)}") from e
    finally:
        for k in lifted:
            model.__dict__.pop(k, None)
        for m, mode in modes.items():
            m.training = mode
        if saved:
            with torch.no_grad():
                for k, b in model.named_buffers():
                    b.copy_(saved[k])
    if check_eager and isinstance(out, Tensor) and isinstance(eager, Tensor) and not _close(out, eager):
        raise InputError(
            f"the torch.fx graph of {cls} computes another output than {cls} itself on example_input: fx runs "
            "`x += y` as `x = x + y`, which differs where x shares memory with a tensor used later (the input of "
            "an in-place activation), and skips hooks on modules it traces through; write `x.add_(y)` (what `+=` does "
            "eagerly) in forward, or pass the hooked modules as leaf_modules"
        )
    return Trace(graph, tracer.calls, recorder.info, lifted, recorder.flops, train, recorder.writes, recorder.same)


def _close(a: Tensor, b: Tensor) -> bool:
    """Equal up to floating point (the same kernels may not give the same bits on an accelerator)."""
    if a.shape != b.shape:
        return False
    if not a.is_floating_point() or not b.is_floating_point():
        return torch.equal(a, b)
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.nan_to_num(0.0, 0.0, 0.0).abs().max()) if b.numel() else 0.0
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale + 1e-7, equal_nan=True)
