"""The API: :func:`attach_exits` (exits on a static network) and :func:`list_cut_points` (where they can go)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from metadyn.core.backbones.attach.partition import Partition, cut_node, graph_roles, partition
from metadyn.core.backbones.attach.stages import AttachedExits, build_segments
from metadyn.core.backbones.attach.tracing import Trace, trace_model
from metadyn.core.heads import ExitHead
from metadyn.errors import InputError

HeadFactory = Callable[[int, int], nn.Module]


def _check_model(model: nn.Module, example_input: Tensor, fn: str) -> str:
    if not isinstance(model, nn.Module):
        raise InputError(f"{fn} needs an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise InputError(f"example_input must be a tensor, got {type(example_input).__name__}")
    return type(model).__name__


def _watch(model: nn.Module, names: list[str], cls: str) -> dict[str, nn.Module]:
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
    return watch


def _batch(example_input: Tensor) -> int | None:
    return example_input.shape[0] if example_input.dim() > 0 else None


def _cut(model: nn.Module, tr: Trace, names: list[str], example_input: Tensor, cls: str) -> Partition:
    return partition(model, graph_roles(tr, _batch(example_input), cls), names, cls)


def _constants(traces: Sequence[tuple[Trace, str]]) -> tuple[nn.Module, list[dict[str, str]]]:
    """One module holding every trace's lifted constants (non-persistent buffers), the names of the second
    trace's prefixed; returns it and, per trace, lifted name -> attribute name."""
    constants = nn.Module()
    names = []
    for tr, prefix in traces:
        mapping = {}
        for k, v in tr.lifted.items():
            mapping[k] = prefix + k
            if isinstance(v, Tensor):
                constants.register_buffer(prefix + k, v, persistent=False)
            else:
                setattr(constants, prefix + k, v)
        names.append(mapping)
    return constants, names


def _same_cuts(ev: Partition, tr: Partition, cls: str) -> None:
    """The train-mode partition must give the heads what the eval-mode one gives them."""
    ev_info, tr_info = ev.roles.trace.info, tr.roles.trace.info
    problem = None
    if tr.exit_names != ev.exit_names:
        problem = f"the exits come in the order {tr.exit_names[:-1]}, not {ev.exit_names[:-1]}"
    elif (tr.features is None) != (ev.features is None):
        problem = "the output does (not) come from an nn.Linear in one mode only"
    else:
        for name, a, b in zip(ev.exit_names, ev.cut_nodes, tr.cut_nodes):
            if ev_info[a].shapes != tr_info[b].shapes:
                problem = f"{name!r} returns {list(tr_info[b].shapes[0])}, not {list(ev_info[a].shapes[0])}"
                break
    if problem is not None:
        raise InputError(f"attach_exits(freeze=False): {cls} differs between train and eval mode where the exits "
                         f"are ({problem}); move the exits or use freeze=True")


def _heads(part: Partition, num_classes: int, head: HeadFactory | None) -> list[nn.Module]:
    info = part.roles.trace.info
    make = head if head is not None else ExitHead
    heads = []
    for name, node in zip(part.exit_names, part.cut_nodes):
        shape, vi = info[node].shapes[0], info[node]
        width = shape[1] if len(shape) == 4 else math.prod(shape[1:])
        h = make(int(width), num_classes)
        if not isinstance(h, nn.Module):
            raise InputError(f"head factory returned {type(h).__name__} for exit {name!r}, not an nn.Module")
        h.to(device=vi.device)
        if vi.dtype is not None and vi.dtype.is_floating_point:
            h.to(dtype=vi.dtype)
        heads.append(h)
    return heads


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

    The eval-mode graph is traced (Python branches on ``self.training`` take their eval path). With
    ``freeze=False`` the train-mode graph is traced too and, where it differs (a functional
    ``F.dropout(h, p, training=self.training)``), used while the trunk trains, so train mode really drops.
    Hooks on modules that fx traces through (e.g. an ``nn.Sequential``) do not fire; hooks on leaves do.
    :func:`list_cut_points` lists the names ``at`` can take.

    Args:
        model: the static network; ``forward`` takes one tensor and returns ``(B, C)`` logits.
        at: names as in ``model.named_modules()`` (``"layer2"``, ``"layer2.0.conv1"``); each must be
            called exactly once in the traced graph and return one ``(B, ...)`` tensor.
        num_classes: width of the exit heads; defaults to the model's output width. The final exit
            returns the model's output whatever this is.
        example_input: a batch like the real inputs (e.g. ``torch.randn(1, 3, 224, 224)``), run once
            under ``torch.no_grad()`` with every module in eval mode to size the heads (``model``'s modes,
            buffers and torch's random state are left as they were).
        head: factory ``(in_channels, num_classes) -> nn.Module`` returning ``(logits, features)``;
            ``in_channels`` is ``C`` of a ``(B, C, H, W)`` activation, else its flattened width.
            Defaults to :class:`~metadyn.core.heads.ExitHead`.
        freeze: freeze the trunk (:func:`metadyn.core.freeze.freeze`: ``requires_grad=False`` and eval mode
            even under ``.train()``, so BatchNorm statistics never change while exits are trained);
            ``False`` lets the trunk train with the heads.
        leaf_modules: module types fx should not trace into (data-dependent control flow); ``at`` names
            inside them cannot be cut.

    Returns:
        An :class:`AttachedExits` with ``len(at) + 1`` exits.

    In-place ops are safe: where a later stage writes a cut value in place (``nn.ReLU(inplace=True)``
    after the cut module, ``h.add_(...)``), that stage starts from a copy, so the head reads (and trains
    on) the value at the cut; one tensor under two names (``b = relu_(a)``, both used later) is carried
    once in the State.

    Raises:
        InputError: untraceable model, unknown name, a module called zero or several times, a cut that
            is not a batch-major tensor, two names that produce the same activation, two activations
            crossing a cut that share memory a later in-place op writes (a view and its base), a traced
            graph that computes another output than the model on ``example_input`` (fx runs ``x += y``
            as ``x = x + y``), or (``freeze=False``) a train-mode graph that cuts differently from the
            eval-mode one.

    Example::

        from torchvision.models import resnet18

        static = resnet18(weights="DEFAULT")
        net = attach_exits(static, ["layer1", "layer2", "layer3"], example_input=torch.randn(1, 3, 224, 224))
        out = net(images)                   # ExitOutput with 4 exits
        assert torch.equal(out.logits[-1], static(images))   # in eval mode
    """
    cls = _check_model(model, example_input, "attach_exits")
    names = [at] if isinstance(at, str) else list(at)
    watch = _watch(model, names, cls)
    leaf_types = tuple(leaf_modules)

    ev_trace = trace_model(model, example_input, watch, leaf_types, check_eager=True)
    ev = _cut(model, ev_trace, names, example_input, cls)
    traces = [(ev_trace, "")]
    tr = None
    if not freeze:
        tr_trace = trace_model(model, example_input, watch, leaf_types, train=True)
        if str(tr_trace.graph) != str(ev_trace.graph):
            try:
                tr = _cut(model, tr_trace, names, example_input, cls)
            except InputError as e:
                raise InputError(f"attach_exits(freeze=False) needs the exits in the train-mode graph too: {e}; "
                                 "move the exits or use freeze=True") from None
            _same_cuts(ev, tr, cls)
            traces.append((tr_trace, "train_"))
    constants, constant_names = _constants(traces)
    segments = build_segments(model, ev, constants, constant_names[0])
    train_segments = build_segments(model, tr, constants, constant_names[1]) if tr is not None else None

    if num_classes is None:
        num_classes = ev_trace.info[ev.roles.result].shapes[0][1]
    if not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(f"num_classes must be a positive integer, got {num_classes!r}")
    heads = _heads(ev, num_classes, head)
    return AttachedExits(model, segments, heads, ev.exit_names, ev.features is not None, constants, freeze,
                         train_segments)


@dataclass(frozen=True)
class CutPoint:
    """A place an exit can follow (:func:`list_cut_points`).

    Attributes:
        name: the submodule's name, as ``attach_exits(at=...)`` takes it.
        shape: the activation it returns for one sample (without the batch dimension).
        flops: FLOPs of the network from its input up to and including this module, for one sample, counted
            like :mod:`metadyn.core.flops` (``torch.utils.flop_counter``): what leaving at an exit here costs
            before the exit's head.
    """

    name: str
    shape: tuple[int, ...]
    flops: int

    @property
    def mflops(self) -> float:
        return self.flops / 1e6


def list_cut_points(model: nn.Module, example_input: Tensor, *,
                    leaf_modules: tuple[type[nn.Module], ...] = ()) -> list[CutPoint]:
    """The submodules an exit can follow (every name :func:`attach_exits` accepts, except those returning the
    network's output itself), in execution order, each with its activation shape and cumulative FLOPs.

    A module qualifies when it is called exactly once in the traced (eval-mode) graph and returns one
    ``(B, ...)`` tensor computed from the input. Names that return the same activation (a container and its
    last layer: ``"layer1"`` and ``"layer1.2"``) are all listed, the outer one first; one exit can follow
    only one of them.

    Args:
        model: the static network (as for :func:`attach_exits`).
        example_input: a batch like the real inputs; its first sample is run once, without gradients, with
            every module in eval mode (nothing about ``model`` changes).
        leaf_modules: module types fx should not trace into (as for :func:`attach_exits`).

    Returns:
        A list of :class:`CutPoint`, by execution order.

    Example::

        for c in list_cut_points(resnet18(), torch.randn(1, 3, 224, 224)):
            print(f"{c.name:20s} {c.shape}  {c.mflops:8.1f} MFLOPs")
    """
    return _cut_points(model, example_input, leaf_modules, "list_cut_points")[0]


def _cut_points(model: nn.Module, example_input: Tensor, leaf_modules, fn: str,
                main_path: bool = False) -> tuple[list[CutPoint], int]:
    """:func:`list_cut_points` and the FLOPs of the whole network (one sample); with ``main_path``, only the cuts
    after which nothing but the cut activation is needed (the State between the stages carries it alone: not a
    squeeze-excitation branch, nor a block's inside whose residual input is still to be added)."""
    cls = _check_model(model, example_input, fn)
    one = example_input[:1] if example_input.dim() > 0 else example_input
    watch = {name: m for name, m in model.named_modules() if name}
    tr = trace_model(model, one, watch, tuple(leaf_modules), count_flops=True)
    roles = graph_roles(tr, _batch(one), cls)
    order = {name: i for i, name in enumerate(watch)}
    found = []
    for name in watch:
        try:
            node = cut_node(roles, name, cls)
        except InputError:
            continue
        if node is not roles.result and (not main_path or _alone(model, roles, name, cls)):
            found.append((roles.pos[node], order[name], name, node))
    found.sort(key=lambda c: c[:2])
    return ([CutPoint(name, tuple(int(d) for d in tr.info[node].shapes[0][1:]), tr.flops[node])
             for _, _, name, node in found], int(tr.flops[roles.result]))


def _alone(model: nn.Module, roles, name: str, cls: str) -> bool:
    try:
        return len(partition(model, roles, [name], cls).states[1]) == 1
    except InputError:
        return False


def auto_cut_points(model: nn.Module, example_input: Tensor, count: int, *,
                    leaf_modules: tuple[type[nn.Module], ...] = ()) -> list[str]:
    """``count`` cut points at even fractions of the network's FLOPs: exit ``i`` (1-based) follows the module
    whose cumulative FLOPs (:func:`list_cut_points`) are nearest ``i / (count + 1)`` of the whole network's,
    among the modules on the main path (after which the stages carry nothing but that module's output).

    Among modules reaching the same FLOPs the least nested name wins (``"layer1"`` before ``"layer1.1"`` and
    ``"layer1.1.bn2"``; a ReLU or an addition costs no FLOPs in the count), then the earliest; the chosen cuts
    have strictly increasing FLOPs. Raises :class:`InputError` when the network has fewer such places than
    ``count``.

    Example::

        at = auto_cut_points(resnet18(num_classes=10), torch.randn(1, 3, 64, 64), 3)  # e.g. layer1, layer2, layer3
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise InputError(f"the number of automatic exits must be a positive integer, got {count!r}")
    points, total = _cut_points(model, example_input, leaf_modules, "auto_cut_points", main_path=True)
    best: dict[int, CutPoint] = {}  # FLOPs level -> its least nested (then earliest) module
    for p in points:
        if 0 < p.flops < total and (p.flops not in best or p.name.count(".") < best[p.flops].name.count(".")):
            best[p.flops] = p
    levels = sorted(best)
    if len(levels) < count:
        raise InputError(f"{type(model).__name__} has {len(levels)} places an exit can follow (with distinct FLOPs), "
                         f"fewer than the {count} asked for")
    chosen: list[int] = []
    for i in range(1, count + 1):
        target = i * total / (count + 1)
        lo = chosen[-1] + 1 if chosen else 0  # strictly after the previous cut, leaving room for the rest
        hi = len(levels) - (count - i)
        chosen.append(min(range(lo, hi), key=lambda j: (abs(levels[j] - target), j)))
    return [best[levels[j]].name for j in chosen]
