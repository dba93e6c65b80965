"""Feature priors for data impressions, for any teacher: which one fits which network, chosen by name.

A prior adds a term to the impression loss (ZSKD's Eq. 3), weighted by ``SynthesisSettings.bn_weight`` (the
feature-prior weight). It records its term during the teacher's forward pass and hands it over with ``pop()``;
it is a context manager installing its hooks (:class:`~metadyn.datafree.impressions.BatchNormPrior` is one).

* ``"bn"``: DeepInversion's BatchNorm-statistics prior (Yin et al., CVPR 2020, Eq. 4): the batch's feature
  means and variances at every BatchNorm layer match the running statistics the teacher stored in training.
  Only a network with BatchNorm layers stores such statistics.
* ``"image"``: for networks without BatchNorm (a ViT's or ConvNeXt's LayerNorm normalises each sample by its
  own statistics and stores none): DeepInversion's image prior R_prior (Yin et al., CVPR 2020, Eq. 3), total
  variation plus an l2 penalty, on the teacher's input. Here ``R_TV`` is the mean absolute difference of
  neighbouring pixels (:func:`~metadyn.datafree.impressions.total_variation`) and ``R_l2`` the mean squared
  input value (the paper sums both over the image with weights 1e-4 / 1e-5 for 224x224 ImageNet inputs;
  means make one weight fit every input size). It asks for smooth, low-energy inputs and knows nothing of
  the teacher's features.
* ``"auto"``: ``"bn"`` when the teacher has a BatchNorm layer with running statistics, else ``"image"``.

The patch-similarity prior of PSAQ-ViT (Li et al., ECCV 2022), specific to vision transformers, is not
implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from metadyn.datafree.impressions import BatchNormPrior, SynthesisSettings, total_variation
from metadyn.errors import InputError

PRIORS = ("bn", "image", "auto")


class ImagePrior:
    """DeepInversion's image prior ``R_TV(x) + R_l2(x)`` on the input of every forward pass of ``model``
    (a forward pre-hook on ``model`` itself). Use as a context manager.

    References:
        Yin et al., "Dreaming to Distill: Data-free Knowledge Transfer via DeepInversion", CVPR 2020, Eq. (3)
        (R_prior = alpha_tv R_TV + alpha_l2 R_l2), with means instead of sums and equal weights.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.terms: list[Tensor] = []
        self._handle = None

    def _hook(self, _module: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        self.terms.append(total_variation(x) + x.pow(2).mean())

    def __enter__(self) -> ImagePrior:
        self._handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def pop(self) -> Tensor:
        """The term of the last forward pass."""
        import torch

        loss = self.terms[-1] if self.terms else torch.zeros(())
        self.terms = []
        return loss


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer with running statistics (what the ``"bn"`` prior matches)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None for m in model.modules())


def resolve_prior(name: str, model: nn.Module) -> str:
    """``name`` with ``"auto"`` resolved for ``model``; an unknown name is an :class:`InputError`."""
    if name not in PRIORS:
        raise InputError(f"unknown impression prior {name!r}; choose from: {', '.join(PRIORS)}")
    if name == "auto":
        return "bn" if has_batchnorm(model) else "image"
    return name


def make_prior(name: str, model: nn.Module):
    """The prior called ``name`` (see the module docstring) for ``model``."""
    return BatchNormPrior(model) if resolve_prior(name, model) == "bn" else ImagePrior(model)


@dataclass
class PriorSettings(SynthesisSettings):
    """:class:`~metadyn.datafree.impressions.SynthesisSettings` with the feature prior named: ``prior`` (one of
    :data:`PRIORS`) weighted by ``bn_weight``."""

    prior: str = "bn"

    def make_prior(self, model: nn.Module):
        """The prior for ``model`` (:class:`~metadyn.datafree.impressions.ImpressionBatch` calls it)."""
        return make_prior(self.prior, model)

    def check(self, prefix: str = "") -> None:
        super().check(prefix)
        if self.prior not in PRIORS:
            raise InputError(f"unknown {prefix}prior {self.prior!r}; choose from: {', '.join(PRIORS)}")
