"""Frozen parts of a network: no gradients, and eval mode whatever mode their parent is put in.

Training a part of a network on top of a frozen one (exit heads on a pretrained trunk, a BlockDrop policy
on a pretrained ResNet, detachable attention on a trained multi-exit network) needs the frozen part to
stay in eval mode while :func:`~metadyn.core.train.fit` calls ``model.train()`` every epoch: otherwise its
BatchNorm layers normalise with batch statistics and update their running statistics, and its dropout
drops. :func:`freeze` does both halves once, on the module itself, so no container or callback has to
remember it.
"""

from __future__ import annotations

from torch import nn


class _EvalOnly:
    """``module.train`` of a frozen module: whatever mode is asked for, the module (and everything in it)
    goes to eval mode. An instance attribute, so it survives ``copy.deepcopy`` and pickling with the module."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        return nn.Module.train(self.module, False)


def freeze(module: nn.Module) -> nn.Module:
    """Freeze ``module`` in place and return it: its parameters stop requiring gradients and it is put in,
    and kept in, eval mode — ``parent.train()`` (which calls ``module.train(True)``) leaves it in eval mode.
    Freezing a frozen module does nothing more; :func:`unfreeze` undoes it."""
    module.requires_grad_(False)
    if not is_frozen(module):
        module.train = _EvalOnly(module)  # shadows nn.Module.train for this instance only
    return module.train(False)


def unfreeze(module: nn.Module) -> nn.Module:
    """Undo :func:`freeze` in place and return ``module``: its parameters require gradients again and it
    follows its parent's mode again. Its own mode is left as it is (eval) until the next ``train()``/``eval()``."""
    vars(module).pop("train", None)
    module.requires_grad_(True)
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether :func:`freeze` was applied to ``module`` itself (not to a parent of it)."""
    return isinstance(vars(module).get("train"), _EvalOnly)


def freeze_untrainable(module: nn.Module) -> nn.Module:
    """Freeze every part of ``module`` with no parameter that requires gradients, and return ``module``.

    The largest such submodules are frozen (with everything inside them), including parameter-free ones
    such as an ``nn.Dropout`` or an activation inside a trainable block; ``module`` itself when none of its
    parameters is trainable. Use it after choosing what trains with ``requires_grad_``.
    """
    if not any(p.requires_grad for p in module.parameters()):
        return freeze(module)
    for child in module.children():
        freeze_untrainable(child)
    return module
