"""Exits on any ``nn.Module``: cut a traced static network into stages and attach exit classifiers.

:func:`attach_exits` traces a trained network with ``torch.fx``, cuts the graph after chosen submodules
and returns an :class:`AttachedExits` (a :class:`~metadyn.core.backbones.base.MultiExitNet`) whose
stages run only their own part of the graph, so dynamic inference never computes what an exited sample
does not need; the last exit is the static network's own output, bit for bit.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_leaves

from metadyn.core.backbones.base import MultiExitNet, State
from metadyn.core.heads import ExitHead
from metadyn.errors import InputError

HeadFactory = Callable[[int, int], nn.Module]

_COMPUTE = ("call_module", "call_function", "call_method", "get_attr")


class _ExitTracer(fx.Tracer):
    """An fx tracer that treats ``leaf_types`` as leaves and records the output of each call of ``watch``."""

    def __init__(self, watch: dict[str, nn.Module], leaf_types: tuple[type, ...]):
        super().__init__()
        self.watch = watch
        self.leaf_types = leaf_types
        self.calls: dict[str, list[Any]] = {name: [] for name in watch}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        for name, watched in self.watch.items():
            if watched is m:
                self.calls[name].append(out)
        return out


@dataclass
class _ValueInfo:
    """What the example run produced at one node: whether it is a tensor, and its tensor leaves."""

    is_tensor: bool
    shapes: list[torch.Size]
    dtype: torch.dtype | None
    device: torch.device | None


class _Recorder(fx.Interpreter):
    """Runs a traced graph on the original module and records a :class:`_ValueInfo` per node."""

    def __init__(self, module: nn.Module, graph: fx.Graph):
        super().__init__(module, graph=graph)
        self.info: dict[fx.Node, _ValueInfo] = {}

    def run_node(self, n: fx.Node) -> Any:
        val = super().run_node(n)
        leaves = [t for t in tree_leaves(val) if isinstance(t, Tensor)]
        first = leaves[0] if leaves else None
        self.info[n] = _ValueInfo(
            isinstance(val, Tensor),
            [t.shape for t in leaves],
            first.dtype if first is not None else None,
            first.device if first is not None else None,
        )
        return val


class AttachedExits(MultiExitNet):
    """A static network cut into stages by :func:`attach_exits`, with one exit head per cut.

    The State between stages is a tuple of tensors, each with the batch as leading dimension:
    ``stem(x)`` returns ``(x,)``; after ``stage(i)`` (``i < num_exits - 1``) it holds the activations
    that later stages still need (e.g. a residual identity when the cut is inside a block), then the cut
    module's output last, which exit ``i``'s head reads. After the final stage it is ``(features,
    output)`` when the network ends in an ``nn.Linear`` (``features`` is that layer's input), else
    ``(output,)``.

    Attributes:
        trunk: the original network (its submodules and parameters are shared, not copied).
        heads: the new exit heads, one per cut.
        exit_names: the cut module names in execution order, then ``"output"``.
        num_exits: ``len(heads) + 1``.
        freeze: whether the trunk is frozen (no gradients, always in eval mode).
    """

    def __init__(
        self,
        trunk: nn.Module,
        segments: Sequence[fx.GraphModule],
        heads: Sequence[nn.Module],
        exit_names: Sequence[str],
        final_features: bool,
        constants: nn.Module,
        freeze: bool,
    ):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.constants = constants  # tensors the tracer lifted out of forward; non-persistent buffers
        self._segments = tuple(segments)  # a plain attribute: registering them would list the trunk twice
        self.exit_names = list(exit_names)
        self.num_exits = len(self.exit_names)
        self.freeze = freeze
        self._final_features = final_features
        self.training = trunk.training
        self.heads.train(trunk.training)
        if freeze:
            trunk.eval()

    @property
    def segments(self) -> tuple[fx.GraphModule, ...]:
        """One fx GraphModule per stage; ``segments[i].code`` shows what ``stage(i)`` computes."""
        self._relink()
        return self._segments

    def _relink(self) -> None:
        # Segments read the trunk's modules and tensors through ``self.trunk`` at call time; after a
        # deepcopy or unpickling GraphModule rebuilds partial copies, so point them back at ours.
        for seg in self._segments:
            stale = getattr(seg, "trunk", None) is not self.trunk
            if stale or getattr(seg, "constants", None) is not self.constants:
                seg.trunk = self.trunk
                seg.constants = self.constants

    def train(self, mode: bool = True) -> AttachedExits:
        """Set train/eval mode; a frozen trunk stays in eval mode (BatchNorm statistics never change)."""
        super().train(mode)
        if self.freeze:
            self.trunk.train(False)
        return self

    def stem(self, x: Tensor) -> State:
        return (x,)

    def stage(self, i: int, state: State) -> State:
        if not 0 <= i < self.num_exits:
            raise IndexError(f"stage {i} out of range for {self.num_exits} exits")
        seg = self._segments[i]
        if getattr(seg, "trunk", None) is not self.trunk:
            self._relink()
        return seg(*state)

    def exit(self, i: int, state: State) -> tuple[Tensor, Tensor]:
        if not 0 <= i < self.num_exits:
            raise IndexError(f"exit {i} out of range for {self.num_exits} exits")
        if i < self.num_exits - 1:
            return self.heads[i](state[-1])
        logits = state[-1]
        features = state[0].flatten(1) if self._final_features else logits  # (B, D)
        return logits, features


def _trace_concrete_args(model: nn.Module) -> dict[str, Any]:
    """Defaults of ``forward``'s parameters after the first, specialised at tracing (``mask=None``)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not p.empty}


def attach_exits(
    model: nn.Module,
    at: str | Sequence[str],
    *,
    num_classes: int | None = None,
    example_input: Tensor,
    head: HeadFactory | None = None,
    freeze: bool = True,
    leaf_modules: tuple[type[nn.Module], ...] = (),
) -> AttachedExits:
    """Turn a static network into a multi-exit network with an exit after each module named in ``at``.

    The network is traced with ``torch.fx`` and its graph cut after the call of each ``at`` module (in
    execution order, whatever the order of ``at``). Each stage is an fx GraphModule running one piece of
    the graph on the ORIGINAL submodules (no copies: ``model``'s parameters are the attached net's trunk
    parameters and ``model.state_dict()`` is unchanged); the State between stages carries only the
    activations later stages need (e.g. the residual identity when cutting inside a block), so a sample
    that exits early costs nothing downstream. The final exit returns ``model(x)`` unchanged (bit for
    bit); its features are the input of the last ``nn.Linear`` when the network ends in one.

    Tracing happens in eval mode, so Python branches on ``self.training`` take their eval path. Hooks
    on modules that fx traces through (e.g. an ``nn.Sequential``) do not fire; hooks on leaves do.

    Args:
        model: the static network; ``forward`` takes one tensor and returns ``(B, C)`` logits.
        at: names as in ``model.named_modules()`` (``"layer2"``, ``"layer2.0.conv1"``); each must be
            called exactly once in the traced graph and return one ``(B, ...)`` tensor.
        num_classes: width of the exit heads; defaults to the model's output width. The final exit
            returns the model's output whatever this is.
        example_input: a batch like the real inputs (e.g. ``torch.randn(1, 3, 224, 224)``), run once
            under ``torch.no_grad()`` in eval mode to size the heads (``model``'s modes are restored).
        head: factory ``(in_channels, num_classes) -> nn.Module`` returning ``(logits, features)``;
            ``in_channels`` is ``C`` of a ``(B, C, H, W)`` activation, else its flattened width.
            Defaults to :class:`~metadyn.core.heads.ExitHead`.
        freeze: set ``requires_grad=False`` on the trunk's parameters and keep the trunk in eval mode
            even under ``.train()`` (BatchNorm statistics never change while exits are trained);
            ``False`` lets the trunk train with the heads.
        leaf_modules: module types fx should not trace into (data-dependent control flow); ``at`` names
            inside them cannot be cut.

    Returns:
        An :class:`AttachedExits` with ``len(at) + 1`` exits.

    Raises:
        InputError: untraceable model, unknown name, a module called zero or several times, a cut that
            is not a batch-major tensor, or two names that produce the same activation.

    Example::

        from torchvision.models import resnet18

        static = resnet18(weights="DEFAULT")
        net = attach_exits(static, ["layer1", "layer2", "layer3"], example_input=torch.randn(1, 3, 224, 224))
        out = net(images)                   # ExitOutput with 4 exits
        assert torch.equal(out.logits[-1], static(images))   # in eval mode
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"attach_exits needs an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise InputError(f"example_input must be a tensor, got {type(example_input).__name__}")
    cls = type(model).__name__
    names = [at] if isinstance(at, str) else list(at)
    if len(set(names)) != len(names):
        raise InputError(f"exit names repeat: {names}")
    watch: dict[str, nn.Module] = {}
    for name in names:
        if not isinstance(name, str):
            raise InputError(f"exit names must be strings, got {name!r}")
        try:
            watch[name] = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{name!r} is not a submodule of {cls}") from None
    leaf_types = tuple(leaf_modules)

    # Trace and run the example in eval mode, then restore every module's own mode.
    modes = {m: m.training for m in model.modules()}
    attrs_before = set(vars(model))
    model.eval()
    tracer = _ExitTracer(watch, leaf_types)
    try:
        try:
            graph = tracer.trace(model, concrete_args=_trace_concrete_args(model) or None)
        except Exception as e:  # fx raises TraceError, TypeError, RuntimeError, ... on dynamic control flow
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(
                f"torch.fx cannot trace {cls} ({msg}); pass the module types with data-dependent "
                "control flow as leaf_modules=(...) so fx treats them as torch.fx leaf modules"
            ) from e
        recorder = _Recorder(model, graph)
        try:
            with torch.no_grad():
                recorder.run(example_input)
        except Exception as e:
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise InputError(f"example_input {tuple(example_input.shape)} fails in {cls}: {msg}") from e
    finally:
        for m, mode in modes.items():
            m.training = mode
        # the tracer stores tensors created inside forward (``_tensor_constant0``) on the model: move them
        lifted = {k: model.__dict__.pop(k) for k in set(vars(model)) - attrs_before}
    info = recorder.info

    constants = nn.Module()
    for k, v in lifted.items():
        if isinstance(v, Tensor):
            constants.register_buffer(k, v, persistent=False)
        else:
            setattr(constants, k, v)

    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders or any(not p.args for p in placeholders[1:]):
        raise InputError(f"{cls}.forward must take exactly one tensor input to attach exits")
    x_node = placeholders[0]
    fixed = {p: p.args[0] for p in placeholders[1:]}  # specialised optional arguments -> their defaults
    batch = example_input.shape[0] if example_input.dim() > 0 else None
    out_node = nodes[-1]
    result = out_node.args[0]
    if not isinstance(result, fx.Node) or not info[result].is_tensor or len(info[result].shapes[0]) != 2:
        raise InputError(f"{cls} must return one (B, C) tensor to attach exits")
    out_width = info[result].shapes[0][1]

    # Values that depend on the input; everything else (parameters, constants, shapes) is recomputed
    # where it is used instead of being carried in the State.
    dependent = {x_node}
    for n in nodes:
        if n.op in _COMPUTE and any(u in dependent for u in n.all_input_nodes):
            dependent.add(n)
    remat = {n for n in nodes if n.op == "get_attr" or n.op in _COMPUTE and (n not in dependent or not info[n].shapes)}

    def batch_major(n: fx.Node) -> bool:
        shapes = info[n].shapes
        return bool(shapes) and all(len(s) > 0 and s[0] == batch for s in shapes)

    # Cut points, in execution order.
    cuts: list[tuple[int, str, fx.Node]] = []
    for name in names:
        calls = tracer.calls[name]
        if not calls:
            raise InputError(
                f"{name!r} is not called in the traced graph of {cls} (unused, the model itself, "
                "or inside a leaf module)"
            )
        if len(calls) > 1:
            raise InputError(f"{name!r} is called {len(calls)} times in {cls}; an exit needs a single call")
        out = calls[0]
        node = out.node if isinstance(out, fx.Proxy) else None
        if node is None or node.op == "placeholder" or node in remat:
            raise InputError(f"{name!r} does not compute a tensor from the input; cannot put an exit after it")
        if not info[node].is_tensor or len(info[node].shapes[0]) < 2 or not batch_major(node):
            raise InputError(f"{name!r} returns {info[node].shapes}, not one (B, ...) tensor")
        cuts.append((pos[node], name, node))
    cuts.sort(key=lambda c: c[0])
    for (p0, n0, _), (p1, n1, _) in zip(cuts, cuts[1:]):
        if p0 == p1:
            raise InputError(f"{n0!r} and {n1!r} produce the same activation; keep one of them")
    cut_nodes = [c[2] for c in cuts]
    exit_names = [c[1] for c in cuts] + ["output"]

    # The final features: the input of the last nn.Linear when the output comes from one.
    feat: fx.Node | None = None
    if result.op == "call_module" and isinstance(model.get_submodule(result.target), nn.Linear):
        arg = result.args[0] if result.args else result.kwargs.get("input")
        feat = arg if isinstance(arg, fx.Node) else None
    final_outputs = ([feat] if feat is not None else []) + [result]

    # Segment j holds the compute nodes after cut j-1 up to and including cut j (the last: to the output).
    bounds = [pos[x_node]] + [pos[c] for c in cut_nodes] + [pos[out_node] - 1]
    seg_nodes = [
        [n for n in nodes[bounds[j] + 1 : bounds[j + 1] + 1] if n.op in _COMPUTE] for j in range(len(cuts) + 1)
    ]
    # Emitted in place: non-recomputed nodes, and recomputed ones nobody uses (asserts) so none is lost.
    emitted = [[n for n in seg if n not in remat or not n.users] for seg in seg_nodes]

    def external_needs(j: int) -> set[fx.Node]:
        internal = {n for n in seg_nodes[j] if n not in remat}
        need: set[fx.Node] = set()
        seen: set[fx.Node] = set()

        def visit(u: fx.Node) -> None:
            if u in fixed or u in seen:
                return
            seen.add(u)
            if u in remat:
                for w in u.all_input_nodes:
                    visit(w)
            elif u not in internal:
                need.add(u)

        for n in emitted[j]:
            for u in n.all_input_nodes:
                visit(u)
        if j == len(cuts):
            for u in final_outputs:
                visit(u)
        return need

    needs = [external_needs(j) for j in range(len(cuts) + 1)]
    states: list[list[fx.Node]] = [[x_node]]  # states[j]: what stage j receives
    for j in range(1, len(cuts) + 1):
        later = set().union(*needs[j:])
        cut = cut_nodes[j - 1]
        carried = sorted((u for u in later if pos[u] <= bounds[j] and u is not cut), key=pos.__getitem__)
        for u in carried:
            if not batch_major(u):
                raise InputError(
                    f"{u.name!r} (shapes {info[u].shapes}) crosses the exit after {exit_names[j - 1]!r} "
                    "but is not batch-major; move that exit"
                )
        states.append(carried + [cut])

    root = nn.Module()
    root.trunk = model
    root.constants = constants

    def build(j: int, inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, Any] = dict(fixed)
        for u in inputs:
            env[u] = g.placeholder(u.name)

        def get(u: fx.Node) -> Any:
            if u not in env:
                if u not in remat:
                    raise AssertionError(f"segment {j} misses {u.name}")  # a bug here, not a user error
                env[u] = copy(u)
            return env[u]

        def copy(n: fx.Node) -> fx.Node:
            target = n.target
            if n.op in ("call_module", "get_attr"):
                target = ("constants." if target in lifted else "trunk.") + target
            args, kwargs = fx.map_arg(n.args, get), fx.map_arg(n.kwargs, get)
            return g.create_node(n.op, target, args, kwargs, name=n.name, type_expr=n.type)

        for n in emitted[j]:
            env[n] = copy(n)
        g.output(tuple(get(u) for u in outputs))
        g.lint()
        gm = fx.GraphModule(root, g, class_name=f"Segment{j}")
        gm.trunk = model  # replace the partial copies fx made with the originals
        gm.constants = constants
        return gm

    segments = [build(j, states[j], states[j + 1]) for j in range(len(cuts))]
    segments.append(build(len(cuts), states[-1], final_outputs))

    if num_classes is None:
        num_classes = out_width
    if not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
    make = head if head is not None else ExitHead
    heads = []
    for _, name, node in cuts:
        shape, vi = info[node].shapes[0], info[node]
        width = shape[1] if len(shape) == 4 else math.prod(shape[1:])
        h = make(int(width), num_classes)
        if not isinstance(h, nn.Module):
            raise InputError(f"head factory returned {type(h).__name__} for exit {name!r}, not an nn.Module")
        h.to(device=vi.device)
        if vi.dtype is not None and vi.dtype.is_floating_point:
            h.to(dtype=vi.dtype)
        heads.append(h)

    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    return AttachedExits(model, segments, heads, exit_names, feat is not None, constants, freeze)
