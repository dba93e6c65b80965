"""SCAN / BYOT exit branches on any registered backbone (registered as ``scan``)."""

from __future__ import annotations

import inspect

from torch import nn

from metadyn.core.heads import scan_heads
from metadyn.errors import InputError
from metadyn.registry import BACKBONES


@BACKBONES.register("scan", example={"backbone": "resnet", "options": {"depth": 8, "exits": [1, 2, 3], "width": 4}})
def scan_exits(in_shape=(3, 32, 32), num_classes: int = 10, backbone: str = "resnet", options: dict | None = None,
               attention: bool = True, inner: int = 0) -> nn.Module:
    """The registered ``backbone`` (built with ``options``) with SCAN exit branches (:func:`scan_heads`);
    ``attention: false`` gives BYOT's branches (bottleneck only).

    References:
        Zhang et al., SCAN, NeurIPS 2019; Zhang et al., BYOT, ICCV 2019 (Sec. 3.1, bottleneck branches).
    """
    if backbone == "scan":
        raise InputError("the scan backbone wraps another backbone, not itself")
    build = BACKBONES.get(backbone)
    options = dict(options or {})
    try:
        inspect.signature(build).bind(in_shape=in_shape, num_classes=num_classes, **options)
    except TypeError as e:
        raise InputError(f"scan backbone options for {backbone!r}: {e}") from None
    model = build(in_shape=in_shape, num_classes=num_classes, **options)
    return scan_heads(model, in_shape, attention, inner or None)
