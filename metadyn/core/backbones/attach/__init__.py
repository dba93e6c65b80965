"""Exits on any ``nn.Module``: cut a traced static network into stages and attach exit classifiers.

:func:`attach_exits` traces a trained network with ``torch.fx``, cuts the graph after chosen submodules
and returns an :class:`AttachedExits` (a :class:`~metadyn.core.backbones.base.MultiExitNet`) whose
stages run only their own part of the graph, so dynamic inference never computes what an exited sample
does not need; the last exit is the static network's own output, bit for bit. :func:`list_cut_points`
lists where exits can go, with each activation's shape and the FLOPs spent to reach it.

* ``tracing``: the fx graph in one mode and what an example input produces at each node;
* ``partition``: where the stages start and end and what the State between them carries;
* ``stages``: one GraphModule per stage, and :class:`AttachedExits`;
* ``api``: :func:`attach_exits`, :func:`list_cut_points`, :func:`auto_cut_points`.
"""

from metadyn.core.backbones.attach.api import CutPoint, HeadFactory, attach_exits, auto_cut_points, list_cut_points
from metadyn.core.backbones.attach.stages import AttachedExits

__all__ = ["AttachedExits", "CutPoint", "HeadFactory", "attach_exits", "auto_cut_points", "list_cut_points"]
