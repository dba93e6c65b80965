"""Tracing a static network for exits: its fx graph in one mode, what each node produced on an example
input, which graph value each watched submodule returned, and (optionally) the FLOPs run up to each node."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    """What the example run produced at one node: whether it is a tensor, and its tensor leaves."""

    is_tensor: bool
    shapes: list[torch.Size]
    dtype: torch.dtype | None
    device: torch.device | None


class Recorder(fx.Interpreter):
    """Runs a traced graph on the original module and records a :class:`ValueInfo` per node and, when a
    ``counter`` is given, the FLOPs it has counted once each node has run (cumulative, in graph order)."""

    def __init__(self, module: nn.Module, graph: fx.Graph, counter: FlopCounterMode | None = None):
        super().__init__(module, graph=graph)
        self.info: dict[fx.Node, ValueInfo] = {}
        self.flops: dict[fx.Node, int] = {}
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        val = super().run_node(n)
        leaves = [t for t in tree_leaves(val) if isinstance(t, Tensor)]
        first = leaves[0] if leaves else None
        self.info[n] = ValueInfo(
            isinstance(val, Tensor),
            [t.shape for t in leaves],
            first.dtype if first is not None else None,
            first.device if first is not None else None,
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
    """

    graph: fx.Graph
    calls: dict[str, list[Any]]
    info: dict[fx.Node, ValueInfo]
    lifted: dict[str, Any]
    flops: dict[fx.Node, int]
    train: bool


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
                count_flops: bool = False) -> Trace:
    """Trace ``model`` with every module in ``train`` mode (else eval mode, :func:`trace_graph`) and run
    ``example_input`` through the graph, without gradients, to record what each node produces.

    The example run leaves no trace: it runs with every module in eval mode (the graph's functional calls
    keep the mode they were traced in), torch's random number generators are restored afterwards, and for
    a train-mode graph the buffers too (a functional batch norm may update running statistics); every
    module's mode is restored.

    Raises:
        InputError: the model cannot be traced, or the example input fails in it.
    """
    cls = type(model).__name__
    tracer = ExitTracer(watch, tuple(leaf_types))
    graph, lifted = trace_graph(model, leaf_types, train=train, tracer=tracer)
    modes = {m: m.training for m in model.modules()}
    counter = FlopCounterMode(display=False) if count_flops else None
    recorder = Recorder(model, graph, counter)
    saved = {k: b.clone() for k, b in model.named_buffers()} if train else {}
    devices = [example_input.device] if example_input.device.type == "cuda" else []
    # the graph reads the lifted constants as attributes of the model while it runs
    for k, v in lifted.items():
        model.__dict__[k] = v
    try:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            if counter is not None:
                with counter:
                    recorder.run(example_input)
            else:
                recorder.run(example_input)
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
    return Trace(graph, tracer.calls, recorder.info, lifted, recorder.flops, train)
