"""Stages of an attached network: one fx GraphModule per piece of a partitioned graph, running on the
original submodules, and :class:`AttachedExits`, the MultiExitNet that runs them and its exit heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, fx, nn

from metadyn.core.backbones.attach.partition import Partition
from metadyn.core.backbones.base import MultiExitNet, State
from metadyn.core.freeze import freeze as freeze_module


def build_segments(model: nn.Module, part: Partition, constants: nn.Module,
                   constant_names: dict[str, str]) -> list[fx.GraphModule]:
    """One GraphModule per stage of ``part``. Each reads ``model``'s submodules as ``trunk.<name>`` and the
    lifted constants as ``constants.<constant_names[name]>``, at call time (nothing is copied). A stage
    whose trunk writes the previous cut value in place (``part.clone_cut``) starts from a copy of it, so
    the State keeps what that exit's head read."""
    remat, fixed = part.roles.remat, part.roles.fixed
    root = nn.Module()
    root.trunk = model
    root.constants = constants

    def build(j: int, inputs: list[fx.Node], outputs: list[fx.Node]) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, Any] = dict(fixed)
        for u in inputs:
            env[u] = g.placeholder(u.name)
        if j > 0:
            cut = part.cut_nodes[j - 1]
            if part.clone_cut[j - 1]:  # the trunk writes the cut value in place: keep the State's for the head
                env[cut] = g.create_node("call_method", "clone", (env[cut],), name=f"{cut.name}_copy")
            for u, rep in part.aliases[j].items():
                env[u] = env[rep]

        def get(u: fx.Node) -> Any:
            if u not in env:
                if u not in remat:
                    raise AssertionError(f"segment {j} misses {u.name}")  # a bug here, not a user error
                env[u] = copy(u)
            return env[u]

        def copy(n: fx.Node) -> fx.Node:
            target = n.target
            if n.op in ("call_module", "get_attr"):
                target = f"constants.{constant_names[target]}" if target in constant_names else f"trunk.{target}"
            args, kwargs = fx.map_arg(n.args, get), fx.map_arg(n.kwargs, get)
            return g.create_node(n.op, target, args, kwargs, name=n.name, type_expr=n.type)

        for n in part.emitted[j]:
            env[n] = copy(n)
        g.output(tuple(get(u) for u in outputs))
        g.lint()
        gm = fx.GraphModule(root, g, class_name=f"Segment{j}")
        gm.trunk = model  # replace the partial copies fx made with the originals
        gm.constants = constants
        return gm

    k = len(part.cut_nodes)
    return [build(j, part.states[j], part.states[j + 1]) for j in range(k)] + [
        build(k, part.states[k], part.final_outputs)]


class AttachedExits(MultiExitNet):
    """A static network cut into stages by :func:`~metadyn.core.backbones.attach.attach_exits`, with one exit
    head per cut.

    The State between stages is a tuple of tensors, each with the batch as leading dimension:
    ``stem(x)`` returns ``(x,)``; after ``stage(i)`` (``i < num_exits - 1``) it holds the activations
    that later stages still need (e.g. a residual identity when the cut is inside a block), then the cut
    module's output last, which exit ``i``'s head reads. After the final stage it is ``(features,
    output)`` when the network ends in an ``nn.Linear`` (``features`` is that layer's input), else
    ``(output,)``.

    When the trunk trains (``freeze=False``) and computes differently in train mode (a functional
    ``F.dropout(h, p, training=self.training)``, a branch on ``self.training``), the stages run the
    train-mode graph while the trunk is in train mode (:attr:`train_segments`) and the eval-mode graph
    otherwise; the State layout may differ between the two, so do not switch modes inside one pass.

    Attributes:
        trunk: the original network (its submodules and parameters are shared, not copied).
        heads: the new exit heads, one per cut.
        exit_names: the cut module names in execution order, then ``"output"``.
        num_exits: ``len(heads) + 1``.
        freeze: whether the trunk is frozen (:func:`metadyn.core.freeze.freeze`: no gradients, always in
            eval mode).
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
        train_segments: Sequence[fx.GraphModule] | None = None,
    ):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.constants = constants  # tensors the tracer lifted out of forward; non-persistent buffers
        self._segments = tuple(segments)  # a plain attribute: registering them would list the trunk twice
        self._train_segments = tuple(train_segments) if train_segments is not None else None
        self.exit_names = list(exit_names)
        self.num_exits = len(self.exit_names)
        self.freeze = freeze
        self._final_features = final_features
        self.training = trunk.training
        self.heads.train(trunk.training)
        if freeze:
            freeze_module(trunk)

    @property
    def segments(self) -> tuple[fx.GraphModule, ...]:
        """One fx GraphModule per stage; ``segments[i].code`` shows what ``stage(i)`` computes (eval mode)."""
        self._relink()
        return self._segments

    @property
    def train_segments(self) -> tuple[fx.GraphModule, ...] | None:
        """The stages of the train-mode graph when it differs from the eval-mode one (trainable trunk), else None."""
        self._relink()
        return self._train_segments

    def _relink(self) -> None:
        # Segments read the trunk's modules and tensors through ``self.trunk`` at call time; after a
        # deepcopy or unpickling GraphModule rebuilds partial copies, so point them back at ours.
        for seg in self._segments + (self._train_segments or ()):
            stale = getattr(seg, "trunk", None) is not self.trunk
            if stale or getattr(seg, "constants", None) is not self.constants:
                seg.trunk = self.trunk
                seg.constants = self.constants

    def stem(self, x: Tensor) -> State:
        return (x,)

    def stage(self, i: int, state: State) -> State:
        if not 0 <= i < self.num_exits:
            raise IndexError(f"stage {i} out of range for {self.num_exits} exits")
        segs = self._train_segments if self._train_segments is not None and self.trunk.training else self._segments
        seg = segs[i]
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
