"""Cutting a traced graph after chosen submodules: where each stage starts and ends, what it computes, and
which activations the State between stages must carry."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Any

from torch import fx, nn

from metadyn.core.backbones.attach.tracing import Trace
from metadyn.errors import InputError

COMPUTE = ("call_module", "call_function", "call_method", "get_attr")
# Python's in-place operators (fx traces ``x[i] = v`` as setitem); ``x += y`` on a Proxy becomes ``x + y``
_INPLACE_OPERATORS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift,
})


def written_input(model: nn.Module, n: fx.Node) -> fx.Node | None:
    """The input node ``n`` writes in place by what it calls, else None: a module with ``inplace=True``
    (``nn.ReLU(inplace=True)``, also an ``nn.Dropout(inplace=True)`` that only writes in train mode), an
    ``inplace=True`` argument, an in-place method or function (``add_``, ``torch.relu_``) or operator."""
    if n.op == "call_module":
        try:
            inplace = getattr(model.get_submodule(str(n.target)), "inplace", False) is True
        except AttributeError:
            return None
    elif n.op in ("call_function", "call_method"):
        name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
        inplace = (n.kwargs.get("inplace") is True or n.target in _INPLACE_OPERATORS
                   or name.endswith("_") and not name.endswith("__"))
    else:
        return None
    if not inplace:
        return None
    arg = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
    return arg if isinstance(arg, fx.Node) else None


@dataclass
class GraphRoles:
    """The roles of a traced graph's nodes, independent of where it is cut.

    Attributes:
        nodes, pos: the nodes in execution order and each one's position.
        x_node: the input placeholder; ``fixed``: the other placeholders -> the defaults they were
            specialised to.
        out_node: the output node; ``result``: the ``(B, C)`` value it returns.
        remat: nodes recomputed where they are used instead of being carried in the State (parameters,
            constants, shapes: whatever does not depend on the input or is not a tensor).
        batch: the example input's batch size.
    """

    nodes: list[fx.Node]
    pos: dict[fx.Node, int]
    x_node: fx.Node
    fixed: dict[fx.Node, Any]
    out_node: fx.Node
    result: fx.Node
    remat: set[fx.Node]
    batch: int | None
    trace: Trace

    def batch_major(self, n: fx.Node) -> bool:
        shapes = self.trace.info[n].shapes
        return bool(shapes) and all(len(s) > 0 and s[0] == self.batch for s in shapes)


def graph_roles(tr: Trace, batch: int | None, cls: str) -> GraphRoles:
    """Find the input, output and recomputable nodes of ``tr``'s graph.

    Raises:
        InputError: ``forward`` does not take exactly one tensor or does not return one ``(B, C)`` tensor.
    """
    nodes = list(tr.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if not placeholders or any(not p.args for p in placeholders[1:]):
        raise InputError(f"{cls}.forward must take exactly one tensor input to attach exits")
    x_node = placeholders[0]
    fixed = {p: p.args[0] for p in placeholders[1:]}  # specialised optional arguments -> their defaults
    out_node = nodes[-1]
    result = out_node.args[0]
    info = tr.info
    if not isinstance(result, fx.Node) or not info[result].is_tensor or len(info[result].shapes[0]) != 2:
        raise InputError(f"{cls} must return one (B, C) tensor to attach exits")
    # Values that depend on the input; everything else (parameters, constants, shapes) is recomputed
    # where it is used instead of being carried in the State.
    dependent = {x_node}
    for n in nodes:
        if n.op in COMPUTE and any(u in dependent for u in n.all_input_nodes):
            dependent.add(n)
    remat = {n for n in nodes if n.op == "get_attr" or n.op in COMPUTE and (n not in dependent or not info[n].shapes)}
    return GraphRoles(nodes, pos, x_node, fixed, out_node, result, remat, batch, tr)


def cut_node(roles: GraphRoles, name: str, cls: str) -> fx.Node:
    """The graph value an exit after submodule ``name`` reads.

    Raises:
        InputError: the module is not called, called several times, or does not return one ``(B, ...)``
            tensor computed from the input.
    """
    info = roles.trace.info
    calls = roles.trace.calls[name]
    if not calls:
        raise InputError(
            f"{name!r} is not called in the traced graph of {cls} (unused, the model itself, or inside a leaf module)"
        )
    if len(calls) > 1:
        raise InputError(f"{name!r} is called {len(calls)} times in {cls}; an exit needs a single call")
    out = calls[0]
    node = out.node if isinstance(out, fx.Proxy) else None
    if node is None or node.op == "placeholder" or node in roles.remat:
        raise InputError(f"{name!r} does not compute a tensor from the input; cannot put an exit after it")
    if not info[node].is_tensor or len(info[node].shapes[0]) < 2 or not roles.batch_major(node):
        raise InputError(f"{name!r} returns {info[node].shapes}, not one (B, ...) tensor")
    return node


@dataclass
class Partition:
    """A graph cut into stages.

    Attributes:
        roles: the graph's :class:`GraphRoles`.
        exit_names: the cut module names in execution order, then ``"output"``.
        cut_nodes: the value each early exit reads, in execution order.
        features: the input of the final ``nn.Linear`` when the output comes from one (the final exit's
            features), else None.
        final_outputs: what the last stage returns: ``[features, result]`` or ``[result]``.
        emitted: per stage, the nodes it computes in place.
        states: ``states[j]``: the nodes stage ``j`` receives (``states[0] = [x]``); for ``j > 0`` the
            activations later stages still need, then the cut value last.
        aliases: ``aliases[j]``: nodes stage ``j`` (and later) reads as one of ``states[j]`` because they are
            the very same tensor (an in-place op's result and its input), carried once.
        clone_cut: ``clone_cut[i]``: a later stage writes cut ``i``'s memory in place, so stage ``i + 1``
            works on a copy and the State keeps the value exit ``i``'s head reads (and backpropagates through).
    """

    roles: GraphRoles
    exit_names: list[str]
    cut_nodes: list[fx.Node]
    features: fx.Node | None
    final_outputs: list[fx.Node]
    emitted: list[list[fx.Node]]
    states: list[list[fx.Node]]
    aliases: list[dict[fx.Node, fx.Node]]
    clone_cut: list[bool]


def partition(model: nn.Module, roles: GraphRoles, names: Sequence[str], cls: str) -> Partition:
    """Cut ``roles``' graph after the call of each module in ``names`` (in execution order).

    Raises:
        InputError: a name is not a valid cut (:func:`cut_node`), two names produce the same activation, an
            activation crossing a cut is not batch-major, or two crossing a cut share memory that a later
            stage writes in place.
    """
    pos, nodes, remat, info = roles.pos, roles.nodes, roles.remat, roles.trace.info
    cuts = sorted(((pos[node], name, node) for name in names for node in [cut_node(roles, name, cls)]),
                  key=lambda c: c[0])
    for (p0, n0, _), (p1, n1, _) in zip(cuts, cuts[1:]):
        if p0 == p1:
            raise InputError(f"{n0!r} and {n1!r} produce the same activation; keep one of them")
    cut_nodes = [c[2] for c in cuts]
    exit_names = [c[1] for c in cuts] + ["output"]

    # The final features: the input of the last nn.Linear when the output comes from one.
    result = roles.result
    feat: fx.Node | None = None
    if result.op == "call_module" and isinstance(model.get_submodule(result.target), nn.Linear):
        arg = result.args[0] if result.args else result.kwargs.get("input")
        feat = arg if isinstance(arg, fx.Node) else None
    final_outputs = ([feat] if feat is not None else []) + [result]

    # Segment j holds the compute nodes after cut j-1 up to and including cut j (the last: to the output).
    bounds = [pos[roles.x_node]] + [pos[c] for c in cut_nodes] + [pos[roles.out_node] - 1]
    seg_nodes = [
        [n for n in nodes[bounds[j] + 1 : bounds[j + 1] + 1] if n.op in COMPUTE] for j in range(len(cuts) + 1)
    ]
    # Emitted in place: non-recomputed nodes, and recomputed ones nobody uses (asserts) so none is lost.
    emitted = [[n for n in seg if n not in remat or not n.users] for seg in seg_nodes]

    def external_needs(j: int) -> set[fx.Node]:
        internal = {n for n in seg_nodes[j] if n not in remat}
        need: set[fx.Node] = set()
        seen: set[fx.Node] = set()

        def visit(u: fx.Node) -> None:
            if u in roles.fixed or u in seen:
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

    # In-place writes: (position, storage ids written), seen in the example run or known from the op.
    tr = roles.trace
    pairs = set(tr.writes) | {(n, u) for n in nodes for u in [written_input(model, n)] if u is not None}
    writes = [(pos[n], info[u].storages) for n, u in pairs if u in info and info[u].storages]

    def written_after(p: int, storages: frozenset[int]) -> bool:
        return any(q > p and s & storages for q, s in writes)

    same = {n: u for n, u in tr.same.items() if written_input(model, n) is u}  # an in-place op returns its input

    def root(n: fx.Node) -> fx.Node:
        while n in same:
            n = same[n]
        return n

    states: list[list[fx.Node]] = [[roles.x_node]]  # states[j]: what stage j receives
    aliases: list[dict[fx.Node, fx.Node]] = [{}]
    clone_cut: list[bool] = []
    for j in range(1, len(cuts) + 1):
        later = set().union(*needs[j:])
        cut = cut_nodes[j - 1]
        carried = sorted((u for u in later if pos[u] <= bounds[j] and u is not cut), key=pos.__getitem__)
        for u in carried:
            if not roles.batch_major(u):
                raise InputError(
                    f"{u.name!r} (shapes {info[u].shapes}) crosses the exit after {exit_names[j - 1]!r} "
                    "but is not batch-major; move that exit"
                )
        # One tensor under several names (``b = relu_(a)``, both used later) is carried once: a dynamic exit
        # indexes each State tensor apart, which would make two tensors of it.
        rep = {root(cut): cut}
        alias: dict[fx.Node, fx.Node] = {}
        for u in carried:
            alias[u] = rep.setdefault(root(u), u)
        state = [u for u in carried if alias[u] is u] + [cut]
        alias = {u: r for u, r in alias.items() if r is not u}
        for a, b in combinations(state, 2):
            shared = info[a].storages & info[b].storages
            if shared and written_after(bounds[j], shared):
                raise InputError(
                    f"{a.name!r} and {b.name!r} cross the exit after {exit_names[j - 1]!r} sharing memory (one is a "
                    "view of the other) that a later in-place op writes; a dynamic exit would carry them apart; "
                    "move that exit"
                )
        states.append(state)
        aliases.append(alias)
        clone_cut.append(written_after(bounds[j], info[cut].storages))
    return Partition(roles, exit_names, cut_nodes, feat, final_outputs, emitted, states, aliases, clone_cut)
