"""Batch augmentations used during training (seeded through torch's global generator)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_shift(x: Tensor, pad: int = 1) -> Tensor:
    """Translate each image by an integer offset in ``[-pad, pad]`` in x and y, filling with zeros.

    ``x``: ``(B, C, H, W)``. Vectorised: one padded copy and one gather.
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None]  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)[None]  # (B, W)
    idx_r = rows[:, None, :, None].expand(b, c, h, w + 2 * pad)
    xr = xp.gather(2, idx_r)  # (B, C, H, W+2p)
    idx_c = cols[:, None, None, :].expand(b, c, h, w)
    return xr.gather(3, idx_c)  # (B, C, H, W)


AUGMENTS = {"none": None, "shift": random_shift}
