"""Attention on exit branches from nothing, from the exit's own features, from later layers, or detachable.

The seed's Idea 4: later layers have better coarse features, so during training an early exit may attend
with a mask computed from a *later* stage's map; at inference an exit that leaves early has not computed
that stage, so the later-layer attention is distilled into a parallel, "detachable" module that reads only
the exit's own features, and the later-layer modules are pruned (removed from the graph) before test.

:class:`AttentiveExits` wraps a multi-exit network (one with ``heads`` and ``(B, C, H, W)`` states, e.g. the
``resnet`` and ``conv4`` backbones) and puts, in front of every early exit's head, one of:

- ``none``: nothing (the wrapped network as is);
- ``own``: SCAN's :class:`~metadyn.core.heads.ScanAttention` on the exit's own map ``h_i``
  (``h_i * mask(h_i)``);
- ``later``: :class:`LaterAttention`, a mask for exit ``i`` computed from a later stage's map (the final
  stage, or the next one), resized to exit ``i``'s resolution (``h_i * mask(h_j)``). Not deployable:
  :meth:`AttentiveExits.exit` refuses to run such an exit on its own (:class:`NotDeployableError`), and
  :func:`exit_mflops` charges it the later stages it needs;
- detachable (:func:`add_detachable` on a trained ``later`` model): a ScanAttention per early exit, trained
  with :func:`detachable_loss` (exit CE + attention transfer towards the later-layer attention) while the
  trunk, the later-layer modules and the final exit stay frozen; :func:`prune_later` then removes the
  later-layer modules and the network runs stage by stage (:func:`~metadyn.core.inference.dynamic_exit`).

Training recipe (two stages, both with :func:`~metadyn.core.train.fit`):

1. train ``AttentiveExits(base, in_shape, "later")`` with exit-wise cross-entropy;
2. ``add_detachable(model)`` (it freezes everything but the new modules and the early heads, with
   :func:`~metadyn.core.freeze.freeze`: the frozen parts stay in eval mode, so BatchNorm statistics of the
   trunk do not drift), then ``fit(model, loss=detachable_loss(beta))``; then ``prune_later(model)`` and,
   optionally, :func:`prune_saturated`.

References:
    Zhang et al., "SCAN: A Scalable Neural Networks Framework Towards Compact and Efficient Models",
    NeurIPS 2019, Sec. 3.1 (attention modules on the exit branches); Zagoruyko & Komodakis, "Paying More
    Attention to Attention", ICLR 2017, Eq. 2 (attention transfer); the seed talk's "Idea 4: Pruning for
    dynamic inference".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metadyn.attention.maps import attention_transfer
from metadyn.core.backbones.base import MultiExitNet
from metadyn.core.flops import count_flops, exit_costs, probe
from metadyn.core.freeze import freeze_untrainable
from metadyn.core.heads import ScanAttention
from metadyn.core.inference import collect_logits
from metadyn.core.losses import exitwise_ce
from metadyn.core.outputs import ExitOutput
from metadyn.errors import InputError

ATTENTION = ("none", "own", "later")
SOURCES = ("final", "next")


class NotDeployableError(InputError):
    """An exit was asked to run on its own while its attention needs a later stage's features."""


@dataclass
class AttentionOutput(ExitOutput):
    """:class:`ExitOutput` plus, per early exit, ``(detachable-attended h_i, later-attended h_i)`` — the pairs
    :func:`detachable_loss` compares; empty unless both kinds of module are present."""

    transfer: list[tuple[Tensor, Tensor]] = field(default_factory=list)


class LaterAttention(nn.Module):
    """A mask for exit ``i`` computed from a later stage's map ``h_j``:
    ``sigmoid(BN(conv3x3(resize(relu(BN(conv1x1(h_j)))))))``, of shape ``(B, C_i, H_i, W_i)``, in (0, 1).

    The 1x1 conv maps ``C_j`` channels to exit ``i``'s ``C_i`` at the later (coarser) resolution, the result
    is resized bilinearly to exit ``i``'s ``(H_i, W_i)``, and a 3x3 conv gives the mask.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        self.out = nn.Sequential(nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
                                 nn.BatchNorm2d(out_channels), nn.Sigmoid())

    def mask(self, later: Tensor, size: Sequence[int]) -> Tensor:
        g = self.project(later)  # (B, C_i, H_j, W_j)
        if tuple(g.shape[-2:]) != tuple(size):
            g = F.interpolate(g, size=tuple(size), mode="bilinear", align_corners=False)  # (B, C_i, H_i, W_i)
        return self.out(g)


def _state_shapes(base: MultiExitNet, in_shape) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of the State at every exit, read off one pass on zeros (eval mode)."""
    p = next(base.parameters())
    shapes = []
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            s = base.stem(torch.zeros((1, *in_shape), dtype=p.dtype, device=p.device))
            for i in range(base.num_exits):
                s = base.stage(i, s)
                if not isinstance(s, Tensor) or s.dim() != 4:
                    raise InputError(f"exit attention needs a (B, C, H, W) feature map at every exit; "
                                     f"{type(base).__name__} gives {type(s).__name__} at exit {i}")
                shapes.append(tuple(int(d) for d in s.shape[1:]))
    finally:
        base.train(was_training)
    return shapes


class AttentiveExits(MultiExitNet):
    """A multi-exit network whose early exits attend with no mask, their own mask, or a later stage's mask.

    Args:
        base: a MultiExitNet with a tensor State ``(B, C, H, W)`` at every exit and ``base.exit(i, h)``
            reading exit ``i``'s head from ``h`` (resnet, conv4).
        in_shape: ``(C, H, W)`` of one input (to size the attention modules).
        attention: ``none``, ``own`` (SCAN attention on ``h_i``) or ``later`` (:class:`LaterAttention`).
        source: for ``later``: the map that feeds exit ``i``'s mask, the ``final`` stage's or the ``next`` one's.

    Attributes:
        own: ``ModuleDict`` (key: the exit index) of ScanAttention modules, or None.
        later: ``ModuleDict`` of LaterAttention modules, or None.
        later_drives: the early exits use the later-layer masks (training stage 1, the ``later`` variant);
            False once :func:`add_detachable` has added the detachable modules.
        sources: the stage whose map feeds each early exit's later-layer mask.

    The final exit never has attention (it has no later layer).
    """

    def __init__(self, base: MultiExitNet, in_shape, attention: str = "none", source: str = "final"):
        super().__init__()
        if attention not in ATTENTION:
            raise InputError(f"unknown exit attention {attention!r}; choose from: {', '.join(ATTENTION)}")
        if source not in SOURCES:
            raise InputError(f"unknown later-attention source {source!r}; choose from: {', '.join(SOURCES)}")
        k = int(getattr(base, "num_exits", 0))
        if k < 2:
            raise InputError(f"exit attention needs a multi-exit network with at least two exits, got {k}")
        self.base = base
        self.num_exits = k
        self.shapes = _state_shapes(base, in_shape)
        self.sources = [k - 1 if source == "final" else i + 1 for i in range(k - 1)]
        self.register_module("own", None)
        self.register_module("later", None)
        if attention == "own":
            self.own = nn.ModuleDict({str(i): ScanAttention(c) for i, (c, _, _) in enumerate(self.shapes[:-1])})
        if attention == "later":
            self.later = nn.ModuleDict({str(i): LaterAttention(self.shapes[j][0], self.shapes[i][0])
                                        for i, j in enumerate(self.sources)})
        self.later_drives = attention == "later"
        p = next(base.parameters())
        self.to(p.device, p.dtype)

    @property
    def deployable(self) -> bool:
        """True when every exit can run from its own stage's State (no later-layer mask drives an exit)."""
        return not (self.later is not None and self.later_drives)

    def stem(self, x: Tensor):
        return self.base.stem(x)

    def stage(self, i: int, state):
        return self.base.stage(i, state)

    def attend(self, i: int, h: Tensor) -> Tensor:
        """Exit ``i``'s own (or detachable) attention applied to ``h`` (``h`` itself where there is none)."""
        key = str(i)
        if self.own is not None and key in self.own:
            return self.own[key](h)
        return h

    def later_mask(self, i: int, states: Sequence[Tensor]) -> Tensor:
        """Exit ``i``'s later-layer mask ``(B, C_i, H_i, W_i)`` from the list of every stage's State."""
        return self.later[str(i)].mask(states[self.sources[i]], states[i].shape[-2:])

    def exit(self, i: int, state: Tensor) -> tuple[Tensor, Tensor]:
        if i < self.num_exits - 1:
            if not self.deployable:
                raise NotDeployableError(
                    f"exit {i}'s attention reads stage {self.sources[i]}'s features, which an early exit has not "
                    "computed: this later-layer variant is not deployable; train detachable attention "
                    "(add_detachable) and remove the later-layer modules (prune_later) first")
            state = self.attend(i, state)
        return self.base.exit(i, state)

    def exit_from(self, i: int, states: Sequence[Tensor]) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """Exit ``i`` given every stage's State: ``(logits, features, transfer pair or None)``."""
        h = states[i]
        pair = None
        if i < self.num_exits - 1 and self.later is not None:
            by_later = h * self.later_mask(i, states)
            if self.later_drives:
                h = by_later
            else:
                h = self.attend(i, h)
                pair = (h, by_later)
        elif i < self.num_exits - 1:
            h = self.attend(i, h)
        lg, ft = self.base.exit(i, h)
        return lg, ft, pair

    def forward(self, x: Tensor) -> ExitOutput:
        if self.later is None:  # stage by stage, exactly what dynamic inference runs
            return super().forward(x)
        states, s = [], self.stem(x)
        for i in range(self.num_exits):
            s = self.stage(i, s)
            states.append(s)
        logits, features, pairs = [], [], []
        for i in range(self.num_exits):
            lg, ft, pair = self.exit_from(i, states)
            logits.append(lg)
            features.append(ft)
            if pair is not None:
                pairs.append(pair)
        return AttentionOutput(logits, features, pairs)


# --------------------------------------------------------------------------- costs


def exit_mflops(model: AttentiveExits, in_shape) -> list[float]:
    """Cumulative MFLOPs of leaving at each exit.

    For a deployable model this is :func:`~metadyn.core.flops.exit_costs` (stage by stage). For the later-layer
    variant, exit ``i`` needs the stages up to its mask's source as well: its cost is the stem, stages
    ``0..max(i, source_i)`` and heads ``0..i`` (each with its later-layer mask) — with ``source: final`` every
    early exit costs more than the static network.
    """
    if model.deployable:
        return exit_costs(model, in_shape).mflops()
    with probe(model, in_shape) as x:
        stem = count_flops(model.stem, x)
        s, stages, states = model.stem(x), [], []
        for i in range(model.num_exits):
            stages.append(count_flops(model.stage, i, s))
            s = model.stage(i, s)
            states.append(s)
        heads = [count_flops(model.exit_from, i, states) for i in range(model.num_exits)]
    last = model.num_exits - 1
    need = [max(i, model.sources[i]) if i < last else last for i in range(model.num_exits)]
    return [(stem + sum(stages[: need[i] + 1]) + sum(heads[: i + 1])) / 1e6 for i in range(model.num_exits)]


# --------------------------------------------------------------------------- detachable attention


def add_detachable(model: AttentiveExits, tune_heads: bool = True) -> AttentiveExits:
    """Stage 2 set-up (in place): a ScanAttention per early exit, driving the exits from now on, and
    everything frozen except these modules (and, with ``tune_heads``, the early exits' heads). The frozen
    parts (:func:`~metadyn.core.freeze.freeze_untrainable`) stay in eval mode when ``fit`` puts the model in
    train mode, so their BatchNorm statistics do not change.

    ``model`` must carry trained later-layer attention (``attention="later"``); it keeps computing the
    later-layer masks in ``forward`` (the attention-transfer targets) until :func:`prune_later`.
    """
    if model.later is None:
        raise InputError("detachable attention imitates later-layer attention: build the model with "
                         "attention='later' (and train it) first")
    if model.own is not None:
        raise InputError("the model already has own/detachable attention modules")
    heads = getattr(model.base, "heads", None)
    if tune_heads and not isinstance(heads, nn.ModuleList):
        raise InputError(f"tune_heads needs the exit heads in .heads; {type(model.base).__name__} has none")
    p = next(model.parameters())
    model.own = nn.ModuleDict({str(i): ScanAttention(c) for i, (c, _, _) in enumerate(model.shapes[:-1])})
    model.own.to(p.device, p.dtype)
    model.later_drives = False
    model.requires_grad_(False)
    model.own.requires_grad_(True)
    if tune_heads:
        for h in list(heads)[:-1]:
            h.requires_grad_(True)
    return freeze_untrainable(model)


def prune_later(model: AttentiveExits) -> AttentiveExits:
    """Remove the later-layer attention modules from the graph (in place; they leave ``named_modules``, the
    state dict and every FLOP count). Exits driven by them fall back to their own/detachable attention, or
    to none."""
    model.later = None
    model.later_drives = False
    return model


def detachable_loss(beta: float = 1.0, p: float = 2.0, weights: Sequence[float] | None = None):
    """Stage 2 loss: ``sum_k w_k CE(z_k, y) + beta/2 * sum_i AT(h_i * m_det(h_i), h_i * m_later(h_j))``.

    The attention-transfer term (:func:`~metadyn.attention.maps.attention_transfer`, the later-layer side
    detached) runs over the early exits' pairs of :class:`AttentionOutput` — the activations each exit's head
    reads under the detachable and under the later-layer mask; all samples count, labeled or not, while the
    CE uses the labeled ones (``y != -1``). ``beta = 0`` trains the detachable modules with CE alone (the
    control). The frozen parts are kept in eval mode by :func:`add_detachable`, not by the loss.

    References:
        Zagoruyko & Komodakis, ICLR 2017, Eq. 2 (``L = CE + beta/2 sum_j ||Q_S^j/||Q_S^j|| - Q_T^j/||Q_T^j|| ||_p``).
    """
    if not beta >= 0:
        raise InputError(f"attention-transfer beta must be >= 0, got {beta}")
    if not p > 0:
        raise InputError(f"attention map exponent p must be positive, got {p}")

    def loss(out: ExitOutput, y: Tensor) -> Tensor:
        total = exitwise_ce(out, y, weights)
        if beta:
            pairs = getattr(out, "transfer", None)
            if not pairs:
                raise InputError("attention transfer needs later-layer attention and detachable modules on the "
                                 "same model (AttentiveExits 'later', then add_detachable)")
            total = total + beta / 2 * torch.stack([attention_transfer(s, t, p) for s, t in pairs]).sum()
        return total

    return loss


@torch.no_grad()
def transfer_distances(model: AttentiveExits, x: Tensor, p: float = 2.0, batch_size: int = 256) -> list[float]:
    """Mean attention-transfer distance per early exit between the detachable and the later-layer attention
    on ``x`` (eval mode); needs both kinds of module (after :func:`add_detachable`, before pruning)."""
    par = next(model.parameters())
    was_training = model.training
    model.eval()
    sums: list[float] | None = None
    try:
        for s in range(0, len(x), batch_size):
            xb = x[s : s + batch_size].to(par.device, par.dtype)
            pairs = getattr(model(xb), "transfer", None)
            if not pairs:
                raise InputError("transfer distances need later-layer attention and detachable modules")
            d = [float(attention_transfer(a, b, p)) * len(xb) for a, b in pairs]
            sums = d if sums is None else [u + v for u, v in zip(sums, d)]
    finally:
        model.train(was_training)
    return [v / len(x) for v in sums]


# --------------------------------------------------------------------------- saturated masks


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    head, _, key = name.rpartition(".")
    return (model.get_submodule(head) if head else model), key


@torch.no_grad()
def prune_saturated(model: nn.Module, x: Tensor, tol: float = 1e-5, atol: float = 1e-4,
                    batch_size: int = 256) -> list[str]:
    """Remove every ScanAttention module whose mask is ≈1 everywhere on ``x``; returns the removed names.

    A module is a candidate when ``max |1 - mask| <= tol`` over all of ``x`` (``h * mask`` then differs from
    ``h`` by at most ``tol * |h|``); it is removed — deleted from a ``ModuleDict`` (the exits of
    :class:`AttentiveExits`), replaced by ``nn.Identity`` elsewhere — and kept removed only if every exit's
    logits on ``x`` change by less than ``atol`` against the unpruned model (eval mode); otherwise it is put back.
    """
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, ScanAttention)]
    if not mods:
        return []
    par = next(model.parameters())
    dev = {n: 0.0 for n, _ in mods}

    def spy(name):
        def hook(module, args, output):
            dev[name] = max(dev[name], float((1 - module.mask(args[0])).abs().amax()))
        return hook

    was_training = model.training
    model.eval()
    handles = [m.register_forward_hook(spy(n)) for n, m in mods]
    try:
        for s in range(0, len(x), batch_size):
            model(x[s : s + batch_size].to(par.device, par.dtype))
    finally:
        for h in handles:
            h.remove()
    try:
        ref = collect_logits(model, x, batch_size)
        removed = []
        for name, m in mods:
            if dev[name] > tol:
                continue
            parent, key = _parent(model, name)
            if isinstance(parent, nn.ModuleDict):
                del parent[key]
            else:
                setattr(parent, key, nn.Identity())
            new = collect_logits(model, x, batch_size)
            if max(float((a - b).abs().max()) for a, b in zip(new, ref)) < atol:
                removed.append(name)
            elif isinstance(parent, nn.ModuleDict):
                parent[key] = m
            else:
                setattr(parent, key, m)
    finally:
        model.train(was_training)
    return removed
