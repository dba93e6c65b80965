"""Multi-exit backbones, registered in ``metadyn.registry.BACKBONES``."""

from metadyn.core.backbones.attach import AttachedExits, CutPoint, attach_exits, list_cut_points
from metadyn.core.backbones.base import MultiExitNet, index_state
from metadyn.core.backbones.conv4 import conv4_exits, tiny_conv4_exits
from metadyn.core.backbones.mlp import mlp_exits, tiny_mlp_exits
from metadyn.core.backbones.msdnet import msdnet, tiny_msdnet
from metadyn.core.backbones.resnet import resnet_exits, tiny_resnet_exits
from metadyn.core.backbones.scan import scan_exits

__all__ = ["AttachedExits", "CutPoint", "MultiExitNet", "attach_exits", "conv4_exits", "index_state",
           "list_cut_points", "mlp_exits", "msdnet", "resnet_exits", "scan_exits", "tiny_conv4_exits",
           "tiny_mlp_exits", "tiny_msdnet", "tiny_resnet_exits"]
