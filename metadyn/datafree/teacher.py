"""The teacher data-free conversion starts from: the built-in static CNN, or the user's own trained network.

:func:`build_teacher` builds the user's network (a torchvision model name, a registered metadyn backbone, or
``package.module:function``) and loads its state dict safely; :class:`InputSpace` says what inputs it expects
(value range, per-channel normalisation), so impressions are made in its own input space.

Data-free conversion needs a static network that ``torch.fx`` can trace and that returns ``(B, C)``
logits (:func:`~metadyn.core.backbones.attach.attach_exits`), with BatchNorm layers whose running
statistics the DeepInversion prior can match. :class:`StaticCNN` is such a network; the tasks train
one per dataset with the core :func:`~metadyn.core.train.fit` (loss :func:`~metadyn.core.losses.labeled_ce`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metadyn.errors import InputError


class StaticCNN(nn.Module):
    """Stages of ``convs`` conv3x3-BatchNorm-ReLU layers (a 2x2 max-pool opens every stage after the
    first), global average pooling and a linear classifier.

    ``stages[i]`` (named ``"stages.0"``, ``"stages.1"``, ...) are the natural places to attach exits.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (16, 32, 64), convs: int = 2):
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1 or convs < 1:
            raise InputError(f"StaticCNN needs positive widths and convs, got widths={widths}, convs={convs}")
        stages, c = [], in_channels
        for i, w in enumerate(widths):
            layers: list[nn.Module] = [nn.MaxPool2d(2, ceil_mode=True)] if i > 0 else []
            for _ in range(convs):
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(x)).flatten(1))  # (B, num_classes)


def static_cnn(in_shape=(1, 8, 8), num_classes: int = 10, widths: Sequence[int] = (16, 32, 64),
               convs: int = 2) -> StaticCNN:
    """A :class:`StaticCNN` for inputs of shape ``in_shape`` ``(C, H, W)``."""
    return StaticCNN(int(in_shape[0]), num_classes, widths, convs)


def tiny_static_cnn(in_shape=(1, 8, 8), num_classes: int = 10) -> StaticCNN:
    """Two stages of two convs, widths 8 and 16 (tests)."""
    return static_cnn(in_shape, num_classes, widths=(8, 16), convs=2)


# --------------------------------------------------------------------------- a user's own trained network


def _torchvision_builder(name: str):
    try:
        from torchvision import models
    except ImportError:  # pragma: no cover - torchvision is an optional dependency
        raise InputError(f"teacher builder {name!r} needs torchvision, which is not installed") from None
    if name not in models.list_models():
        return None
    return lambda **options: models.get_model(name, weights=None, **options)


def _function_builder(spec: str):
    import importlib

    module, _, attr = spec.partition(":")
    try:
        fn = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
    except (ImportError, AttributeError, ValueError) as e:
        raise InputError(f"teacher builder {spec!r} cannot be imported ({type(e).__name__}: {str(e)[:80]})") from None
    if not callable(fn):
        raise InputError(f"teacher builder {spec!r} is not callable")
    return fn


class FinalExit(nn.Module):
    """A registered multi-exit backbone seen as a static network: ``forward`` returns its final exit's logits
    (:meth:`~metadyn.core.backbones.base.MultiExitNet.forward_final`), so exits can be attached to its trunk."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_final(x)


def adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first ``nn.Conv2d`` of ``model`` (in registration order: a torchvision classifier's stem, a
    ViT's patch projection) by one taking ``in_channels`` channels, its other settings unchanged (freshly
    initialised: call this before training or loading a checkpoint); a model without one is left as it is.
    Returns ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels != in_channels:
                new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                                m.groups if m.groups == 1 else in_channels, m.bias is not None, m.padding_mode)
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, new)
            return model
    return model  # no convolution (an MLP): its input is the user's to match


def build_teacher(builder: str, options: dict | None = None, checkpoint=None, *, in_shape=None,
                  num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """A user's static classifier: built by ``builder`` and loaded from ``checkpoint`` (a state dict).

    Args:
        builder: a torchvision model name (``"resnet18"``, ``"mobilenet_v3_small"``, ``"vit_b_16"``; built with
            ``weights=None`` and ``options``, e.g. ``num_classes``, ``image_size``), a registered metadyn backbone
            (``metadyn.registry.BACKBONES``; built with ``in_shape`` and ``num_classes``, seen through
            :class:`FinalExit`, so cut names start with ``"net."``), or ``"package.module:function"`` (called with
            ``options``; e.g. ``"torchvision.models.vision_transformer:VisionTransformer"``).
        options: keyword arguments of the builder.
        checkpoint: path of a ``state_dict`` saved with ``torch.save`` (read with ``weights_only=True``); ``None``:
            random weights (to be trained).
        in_shape, num_classes: passed to a registered backbone (``num_classes`` also to a torchvision builder that
            does not get it in ``options``).
        in_channels: for torchvision and function builders, :func:`adapt_input_channels` before loading (a
            torchvision classifier takes 3 channels; Fashion-MNIST has 1).

    Raises:
        InputError (one line): unknown builder, options the builder refuses, a checkpoint that cannot be read
        safely, is not a state dict, or does not fit the built network (missing / unexpected keys, shapes).
    """
    from metadyn.config import checked_call
    from metadyn.registry import BACKBONES

    options = dict(options or {})
    if not isinstance(builder, str) or not builder:
        raise InputError(f"teacher builder must be a name, got {builder!r}")
    where = f"teacher {builder!r} options"
    if ":" in builder:
        fn = _function_builder(builder)
        try:
            model = checked_call(fn, options, where)
        except (TypeError, ValueError) as e:  # options a **kwargs builder passes on and something below refuses
            raise InputError(f"{where}: {str(e).splitlines()[0][:120]}") from None
    elif builder in BACKBONES.load().names():
        if in_shape is None or num_classes is None:
            raise InputError(f"teacher builder {builder!r} (a metadyn backbone) needs in_shape and num_classes")
        model = FinalExit(checked_call(BACKBONES.get(builder), options, where, in_shape=tuple(in_shape),
                                       num_classes=num_classes))
    else:
        make = _torchvision_builder(builder)
        if make is None:
            raise InputError(f"unknown teacher builder {builder!r}: not a torchvision model name, not a registered "
                             f"backbone ({', '.join(BACKBONES.names())}), not 'package.module:function'")
        if num_classes is not None:
            options.setdefault("num_classes", num_classes)
        try:
            model = make(**options)
        except (TypeError, ValueError) as e:
            raise InputError(f"{where}: {str(e).splitlines()[0][:120]}") from None
    if not isinstance(model, nn.Module):
        raise InputError(f"teacher builder {builder!r} returned {type(model).__name__}, not an nn.Module")
    if in_channels is not None and not isinstance(model, FinalExit):
        adapt_input_channels(model, int(in_channels))
    if checkpoint is not None:
        load_state(model, checkpoint)
    return model


def load_state(model: nn.Module, checkpoint) -> None:
    """Load the ``state_dict`` saved at ``checkpoint`` (``torch.load(..., weights_only=True)``) into ``model``
    strictly; anything else is a one-line :class:`InputError`."""
    import torch

    from metadyn.core.train import load_checkpoint

    state = load_checkpoint(checkpoint)
    where = f"teacher checkpoint {str(checkpoint)!r}"
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        held = type(state).__name__ if not isinstance(state, dict) else "a mapping that is not name -> tensor"
        raise InputError(f"{where} is not a state dict (it holds {held}); save model.state_dict()")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        parts = ([f"missing {len(missing)} key(s), e.g. {missing[0]!r}"] if missing else []) + \
                ([f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]!r}"] if unexpected else [])
        raise InputError(f"{where} does not fit {type(model).__name__}: {'; '.join(parts)}")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise InputError(f"{where} does not fit {type(model).__name__}: {k!r} has shape {list(state[k].shape)}, "
                             f"the model's is {list(v.shape)}")
    model.load_state_dict(state)


class InputSpace:
    """What inputs the teacher expects: images in ``bounds`` ``[lo, hi]`` (the data's value range, e.g. [0, 1]),
    then normalised per channel as ``(x - mean) / std`` (no normalisation when ``mean`` and ``std`` are
    ``None``). Impressions are optimised through :meth:`synthesis_model` in the data range, clamped to it after
    every step, and handed to the teacher by :meth:`to_teacher`: inputs in the teacher's own input space that
    stay inside its valid range, per channel ``[(lo - mean) / std, (hi - mean) / std]``."""

    def __init__(self, bounds=(0.0, 1.0), mean=None, std=None):
        import math

        import torch

        lo, hi = (float(b) for b in bounds)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise InputError(f"teacher input range must be [lo, hi] with lo < hi, got {list(bounds)}")
        if (mean is None) != (std is None):
            raise InputError("teacher input normalisation needs both mean and std (or neither)")
        self.bounds = (lo, hi)
        self.mean = self.std = None
        if mean is not None:
            m = torch.as_tensor(mean, dtype=torch.float32).flatten()
            s = torch.as_tensor(std, dtype=torch.float32).flatten()
            if len(m) != len(s) or len(m) == 0 or not bool(torch.isfinite(m).all()) or not bool((s > 0).all()):
                raise InputError(f"teacher input mean and std must be as many finite numbers, std positive, "
                                 f"got mean={list(map(float, m))}, std={list(map(float, s))}")
            self.mean, self.std = m[None, :, None, None], s[None, :, None, None]

    def check_channels(self, channels: int, names: str = "mean and std") -> None:
        """Refuse a normalisation of another number of channels than the images have (1 value: every channel)."""
        if self.mean is not None and len(self.mean.flatten()) not in (1, channels):
            raise InputError(f"teacher input {names} need 1 or {channels} values (the inputs' channels), "
                             f"got {len(self.mean.flatten())}")

    def to_teacher(self, x: Tensor) -> Tensor:
        """Data-range images -> the teacher's input space."""
        return x if self.mean is None else (x - self.mean.to(x)) / self.std.to(x)

    def synthesis_model(self, teacher: nn.Module) -> nn.Module:
        """``teacher`` taking data-range inputs (itself when there is no normalisation)."""
        return teacher if self.mean is None else _Normalized(teacher, self)

    def noise(self, num: int, in_shape, seed: int) -> Tensor:
        """``num`` uniform noise images in the data range, in the teacher's input space (the control)."""
        import torch

        lo, hi = self.bounds
        return self.to_teacher(torch.rand((num, *in_shape), generator=torch.Generator().manual_seed(seed))
                               * (hi - lo) + lo)


class _Normalized(nn.Module):
    def __init__(self, teacher: nn.Module, space: InputSpace):
        super().__init__()
        self.teacher, self.space = teacher, space

    def forward(self, x: Tensor) -> Tensor:
        return self.teacher(self.space.to_teacher(x))
