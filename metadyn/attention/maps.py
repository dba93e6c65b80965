"""Activation-based attention maps and the attention-transfer distance (Zagoruyko & Komodakis, ICLR 2017).

The attention map of an activation tensor ``A`` of shape ``(C, H, W)`` is the channel-pooled
``F^p_sum(A) = sum_c |A_c|^p`` (their Sec. 3.1; ``p = 2`` is the mapping they use), flattened to a vector
``Q = vec(F(A))`` of ``H*W`` entries. Attention transfer compares L2-normalised maps (their Eq. 2):

    || Q_S / ||Q_S||_2 - Q_T / ||Q_T||_2 ||_q       (q = 2 in the paper)

The released code (``szagoruyko/attention-transfer``, ``utils.at_loss``) pools with the channel *mean* (which
the normalisation cancels) and uses the *mean of squared* differences over positions and batch with
``beta = 1000``; here the paper's norm is used, averaged over the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from metadyn.errors import InputError


def attention_map(a: Tensor, p: float = 2.0) -> Tensor:
    """The L2-normalised spatial attention map ``Q / ||Q||_2`` with ``Q = vec(sum_c |A_c|^p)``.

    Args:
        a: activations ``(B, C, H, W)``.
        p: the exponent of the mapping ``F^p_sum`` (``p > 0``; larger ``p`` puts more weight on the most
            active positions).

    Returns:
        ``(B, H*W)``, each row of unit L2 norm (a row of zeros stays zero).

    References:
        Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance of Convolutional
        Neural Networks via Attention Transfer", ICLR 2017, Sec. 3.1 (``F^p_sum``) and Eq. 2 (the normalisation).
    """
    if a.dim() != 4:
        raise InputError(f"attention maps need activations (B, C, H, W), got shape {tuple(a.shape)}")
    if not p > 0:
        raise InputError(f"attention map exponent p must be positive, got {p}")
    q = a.abs().pow(p).sum(1).flatten(1)  # (B, H*W)
    return F.normalize(q, p=2.0, dim=1)


def attention_transfer(student: Tensor, teacher: Tensor, p: float = 2.0, norm: float = 2.0) -> Tensor:
    """The attention-transfer distance ``|| Q_S/||Q_S||_2 - Q_T/||Q_T||_2 ||_norm``, averaged over the batch.

    The teacher is detached (it is the target). Both tensors are ``(B, C, H, W)`` with the same ``B, H, W``;
    their channel counts may differ (the maps are channel-pooled). The value lies in ``[0, 2]`` for ``norm = 2``.

    References:
        Zagoruyko & Komodakis, ICLR 2017, Eq. 2 (one term of the sum over layer pairs ``j``; the paper's loss
        multiplies the sum by ``beta / 2`` and adds it to the student's cross-entropy).
    """
    if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
        raise InputError(f"attention transfer needs the same batch and spatial size, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    d = attention_map(student, p) - attention_map(teacher.detach(), p)  # (B, H*W)
    return d.norm(p=norm, dim=1).mean()
