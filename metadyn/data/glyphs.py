"""Glyphs: a procedural, seeded, Omniglot-like many-class image set.

Each class is a fixed random glyph of 2-4 pen strokes (line segments, quadratic and cubic Bezier
curves, often starting where the previous stroke ended); each sample is the glyph drawn again by a
slightly different hand: jittered control points, a small random affine map (rotation, scale,
shift), a different pen width and light pixel noise. Strokes are rendered by splatting Gaussian
blobs along densely sampled curve points, weighted by arc length, as one batched matrix product.

Random numbers come from a counter-based hash of ``(seed, class, sample, k)``, so class ``c``'s
prototype depends only on ``(seed, c)`` and sample ``j`` of class ``c`` only on ``(seed, c, j)``: any
subset of classes renders independently and reproducibly, and many classes render in seconds.

References:
    Lake, Salakhutdinov & Tenenbaum, "Human-level concept learning through probabilistic program
    induction", Science 2015 (Omniglot, whose handwritten characters inspire this set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from metadyn.data.base import ClassificationData, split_data
from metadyn.errors import InputError
from metadyn.registry import DATASETS

NUM_GLYPH_CLASSES = 600
GLYPH_SPLITS: dict[str, range] = {"train": range(0, 400), "val": range(400, 500), "test": range(500, 600)}

_MAX_STROKES = 4
_POINTS_PER_STROKE = 32
_JITTER = 0.045  # sigma of a control point's displacement, unit-square units
_STROKE_JITTER = 0.035  # sigma of a whole stroke's displacement
_CHUNK = 256  # samples rendered per batched matmul (bounds memory)

# counter-based RNG (splitmix64 finaliser); uint64 arithmetic wraps, which is what we want
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_PROTO, _SAMPLE = 1, 2  # stream ids keeping prototype and sample randomness apart


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


def _uniform(keys: Sequence[np.ndarray | int], n: int) -> np.ndarray:
    """``n`` uniforms in [0, 1) per broadcast key tuple: shape ``(*broadcast(keys), n)``, float64."""
    with np.errstate(over="ignore"):
        h = np.zeros((), dtype=np.uint64)
        for k in keys:
            h = _mix(h ^ (np.asarray(k, dtype=np.int64).astype(np.uint64) + _GOLD))
        z = _mix(h[..., None] + np.arange(1, n + 1, dtype=np.uint64) * _GOLD)
    return (z >> _S11).astype(np.float64) * (1.0 / 2**53)


def _normal(u1: np.ndarray, u2: np.ndarray) -> np.ndarray:
    """Box-Muller: standard normals from two arrays of uniforms."""
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)


def _bezier_basis(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cubic Bernstein basis ``(T, 4)`` and its derivative ``(T, 4)`` at parameters ``t``."""
    s = 1.0 - t
    b = np.stack([s**3, 3 * s**2 * t, 3 * s * t**2, t**3], axis=1)
    db = np.stack([-3 * s**2, 3 * s**2 - 6 * s * t, 6 * s * t - 3 * t**2, 3 * t**2], axis=1)
    return b, db


_T = np.linspace(0.0, 1.0, _POINTS_PER_STROKE)
_B, _DB = _bezier_basis(_T)
_TRAPEZOID = np.full(_POINTS_PER_STROKE, 1.0 / (_POINTS_PER_STROKE - 1))
_TRAPEZOID[[0, -1]] *= 0.5


def _prototypes(class_ids: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Class glyphs: cubic control points ``(C, S, 4, 2)`` in the unit square, stroke mask, pen width.

    Lines and quadratics are stored as exactly equivalent cubics. Every glyph is re-centred and
    scaled so that its bounding box fills the unit square along its longer side.
    """
    u = _uniform([seed, _PROTO, class_ids], 4 + 10 * _MAX_STROKES)  # (C, 44)
    n_strokes = 2 + np.minimum((u[:, 0] * 3).astype(int), 2)  # 2..4
    width = 0.75 + 0.3 * u[:, 1]  # pen sigma in pixels at size 28
    mask = np.arange(_MAX_STROKES)[None, :] < n_strokes[:, None]  # (C, S)

    ctrl = np.zeros((len(class_ids), _MAX_STROKES, 4, 2))
    connect = np.zeros((len(class_ids), _MAX_STROKES), dtype=bool)
    for s in range(_MAX_STROKES):
        v = u[:, 4 + 10 * s : 4 + 10 * (s + 1)]  # (C, 10) this stroke's uniforms
        start = v[:, 0:2].copy()
        if s > 0:  # half of the strokes start where the previous one ended (pen kept down)
            connect[:, s] = v[:, 2] < 0.5
            start[connect[:, s]] = ctrl[connect[:, s], s - 1, 3]
        angle = 2 * math.pi * v[:, 3]
        length = 0.35 + 0.6 * v[:, 4]
        end = start + length[:, None] * np.stack([np.cos(angle), np.sin(angle)], axis=1)
        end = np.where(end > 1, 2 - end, np.where(end < 0, -end, end))  # reflect back into the square
        chord = end - start
        normal = np.stack([-chord[:, 1], chord[:, 0]], axis=1)
        kind = v[:, 5]  # line (35%), quadratic (35%), cubic (30%)
        a_quad = (2.0 / 3.0) * (1.6 * v[:, 6] - 0.8)  # quadratic control offset, degree-elevated
        a1 = np.where(kind < 0.35, 0.0, np.where(kind < 0.7, a_quad, 1.4 * v[:, 7] - 0.7))
        a2 = np.where(kind < 0.35, 0.0, np.where(kind < 0.7, a_quad, 1.4 * v[:, 8] - 0.7))
        ctrl[:, s, 0] = start
        ctrl[:, s, 1] = start + chord / 3 + a1[:, None] * normal
        ctrl[:, s, 2] = start + 2 * chord / 3 + a2[:, None] * normal
        ctrl[:, s, 3] = end

    # fit the drawn curve's bounding box into the unit square, centred, keeping the aspect ratio
    pts = np.einsum("tk,cskd->cstd", _B, ctrl)  # (C, S, T, 2)
    big = np.where(mask[:, :, None, None], pts, np.nan)
    lo, hi = np.nanmin(big, axis=(1, 2)), np.nanmax(big, axis=(1, 2))  # (C, 2)
    scale = 1.0 / np.maximum((hi - lo).max(axis=1), 1e-6)  # (C,)
    centre = (lo + hi) / 2
    ctrl = (ctrl - centre[:, None, None, :]) * scale[:, None, None, None] + 0.5
    return {"ctrl": ctrl, "mask": mask, "connect": connect, "width": width}


def _render(ctrl: np.ndarray, mask: np.ndarray, sigma: np.ndarray, noise_u: np.ndarray, size: int) -> Tensor:
    """Splat Gaussian pens along cubic strokes given in pixel coordinates.

    Args:
        ctrl: ``(N, S, 4, 2)`` control points (x, y) in pixels.
        mask: ``(N, S)`` which strokes exist.
        sigma: ``(N,)`` pen sigma in pixels.
        noise_u: ``(N, size*size)`` uniforms for the pixel noise.

    Returns:
        ``(N, 1, size, size)`` float32 in [0, 1], ink = 1.
    """
    n = len(ctrl)
    pts = np.einsum("tk,nskd->nstd", _B, ctrl)  # (N, S, T, 2)
    speed = np.linalg.norm(np.einsum("tk,nskd->nstd", _DB, ctrl), axis=-1)  # (N, S, T)
    w = speed * _TRAPEZOID  # arc length each point stands for
    # round caps: an end point stands for half a pen's line integral, so stroke ends are fully inked
    w[:, :, [0, -1]] += 0.5 * math.sqrt(2 * math.pi) * sigma[:, None, None]
    w = w * mask[:, :, None] / (math.sqrt(2 * math.pi) * sigma[:, None, None])
    pts = pts.reshape(n, -1, 2)  # (N, P, 2) with P = S*T
    w = w.reshape(n, -1)  # (N, P)

    grid = torch.arange(size, dtype=torch.float32)
    px, py, wt = (torch.from_numpy(a.astype(np.float32)) for a in (pts[..., 0], pts[..., 1], w))
    inv = torch.from_numpy((-0.5 / sigma**2).astype(np.float32))[:, None, None]  # (N, 1, 1)
    gx = (grid - px[:, :, None]).square_().mul_(inv).exp_()  # (N, P, W)
    gy = (grid - py[:, :, None]).square_().mul_(inv).exp_().mul_(wt[:, :, None])  # (N, P, H)
    ink = torch.bmm(gy.transpose(1, 2), gx)  # (N, H, W) = sum_p gy[p, h] * gx[p, w]
    noise = torch.from_numpy(noise_u.astype(np.float32)).reshape(n, size, size)
    ink = ink.mul_(1.25).clamp_(0.0, 1.0).add_(noise.sub_(0.5).mul_(0.14)).clamp_(0.0, 1.0)  # noise std 0.04
    return ink[:, None]  # (N, 1, H, W)


def _render_chunk(class_ids: np.ndarray, sample_ids: np.ndarray, seed: int, size: int) -> Tensor:
    """Render sample ``sample_ids[i]`` of class ``class_ids[i]`` for every i."""
    proto = _prototypes(np.unique(class_ids), seed)
    row = np.searchsorted(np.unique(class_ids), class_ids)
    ctrl, mask = proto["ctrl"][row], proto["mask"][row]  # (N, S, 4, 2), (N, S)
    connect = proto["connect"][row]
    n = len(class_ids)

    s4 = 4 * _MAX_STROKES
    u = _uniform([seed, _SAMPLE, class_ids, sample_ids], 6 + 4 * s4 + 4 * _MAX_STROKES)  # (N, 86)
    # hand jitter (unit-square units) of every control point and of every stroke as a whole;
    # a stroke that starts where the previous one ended stays connected
    jitter = _JITTER * _normal(u[:, 6 : 6 + 2 * s4], u[:, 6 + 2 * s4 : 6 + 4 * s4]).reshape(
        n, _MAX_STROKES, 4, 2
    )
    v = u[:, 6 + 4 * s4 :]
    offset = _STROKE_JITTER * _normal(v[:, : 2 * _MAX_STROKES], v[:, 2 * _MAX_STROKES :])  # (N, S*2)
    ctrl = ctrl + jitter + offset.reshape(n, _MAX_STROKES, 1, 2)
    for s in range(1, _MAX_STROKES):
        ctrl[connect[:, s], s, 0] = ctrl[connect[:, s], s - 1, 3]

    # affine about the centre: rotation +-12 deg, scale 0.85-1.15, shear +-0.12, shift up to 2 px at size 28
    px = size / 28.0
    theta = np.deg2rad(24.0 * u[:, 0] - 12.0)
    scale = (0.85 + 0.3 * u[:, 1]) * 0.68 * size  # the unit square spans 68% of the image
    shear = 0.24 * u[:, 5] - 0.12
    shift = (4.0 * u[:, 2:4] - 2.0) * px  # (N, 2)
    cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
    # rotation * scale @ [[1, shear], [0, 1]]
    a = np.stack(
        [np.stack([cos, cos * shear - sin], -1), np.stack([sin, sin * shear + cos], -1)], -2
    )  # (N, 2, 2)
    centre = (size - 1) / 2.0
    ctrl = np.einsum("nij,nskj->nski", a, ctrl - 0.5) + centre + shift[:, None, None, :]

    sigma = proto["width"][row] * (0.85 + 0.3 * u[:, 4]) * px  # pen width jitter
    noise_u = _uniform([seed, _SAMPLE + 1, class_ids, sample_ids], size * size)
    return _render(ctrl, mask, sigma, noise_u, size)


def render_glyphs(
    class_ids: Sequence[int] | np.ndarray | Tensor, samples_per_class: int, *, seed: int = 0, size: int = 28
) -> tuple[Tensor, Tensor]:
    """Render ``samples_per_class`` distorted drawings of each glyph class in ``class_ids``.

    Args:
        class_ids: non-negative class ids; any subset renders exactly as it does inside a larger set.
        samples_per_class: drawings per class; sample ``j`` of class ``c`` depends only on ``(seed, c, j)``.
        seed: the glyph world.
        size: image side in pixels (the glyph's geometry scales with it).

    Returns:
        ``x`` of shape ``(N, 1, size, size)`` float32 in [0, 1] (ink = 1) and ``y`` of shape ``(N,)``
        int64 holding the given class ids, class-major (all samples of the first class first).
    """
    ids = np.asarray(class_ids.cpu() if isinstance(class_ids, Tensor) else class_ids, dtype=np.int64).reshape(
        -1
    )
    if len(ids) and ids.min() < 0:
        raise InputError(f"glyph class ids must be non-negative, got {int(ids.min())}")
    if not isinstance(samples_per_class, (int, np.integer)) or samples_per_class < 1:
        raise InputError(f"glyphs samples_per_class must be a positive integer, got {samples_per_class!r}")
    if not isinstance(size, (int, np.integer)) or size < 8:
        raise InputError(f"glyphs size must be an integer of at least 8, got {size!r}")
    cls = np.repeat(ids, samples_per_class)  # (N,) class-major
    smp = np.tile(np.arange(samples_per_class, dtype=np.int64), len(ids))
    chunks = [
        _render_chunk(cls[i : i + _CHUNK], smp[i : i + _CHUNK], int(seed), int(size))
        for i in range(0, len(cls), _CHUNK)
    ]
    x = torch.cat(chunks) if chunks else torch.zeros(0, 1, size, size)
    return x, torch.from_numpy(cls.copy())


def glyph_class_ids(split: str, num_classes_total: int = NUM_GLYPH_CLASSES) -> list[int]:
    """The class ids of a meta-learning split: the first 2/3 train, then 1/6 val, 1/6 test (400/100/100)."""
    if num_classes_total < 3:
        raise InputError(f"glyphs num_classes_total must be at least 3, got {num_classes_total}")
    n_train = num_classes_total * 2 // 3
    n_val = (num_classes_total - n_train) // 2
    ranges = {
        "train": range(0, n_train),
        "val": range(n_train, n_train + n_val),
        "test": range(n_train + n_val, num_classes_total),
    }
    if split not in ranges:
        raise InputError(f"unknown glyphs split {split!r}; choose from: train, val, test")
    return list(ranges[split])


@DATASETS.register("glyphs")
def glyphs(
    *,
    root: str | None,
    seed: int,
    fractions: dict[str, float],
    num_classes: int = 20,
    samples_per_class: int = 60,
    size: int = 28,
    glyph_seed: int = 0,
) -> ClassificationData:
    """The first ``num_classes`` glyph classes of the train range, labels ``0..num_classes-1``.

    ``seed`` draws the split; ``glyph_seed`` the glyph world, so that changing the experiment seed
    re-splits the same images.
    """
    if root is not None:
        raise InputError(f"dataset 'glyphs' is procedural and takes no root (got root={root!r})")
    n_train = len(GLYPH_SPLITS["train"])
    if not isinstance(num_classes, int) or not 2 <= num_classes <= n_train:
        raise InputError(f"glyphs num_classes must be an integer in 2..{n_train}, got {num_classes!r}")
    ids = list(GLYPH_SPLITS["train"])[:num_classes]
    x, y = render_glyphs(ids, samples_per_class, seed=glyph_seed, size=size)
    y = y - ids[0]  # relabel 0..num_classes-1 (the train range starts at 0)
    return split_data("glyphs", x, y, seed=seed, fractions=fractions, num_classes=num_classes)
