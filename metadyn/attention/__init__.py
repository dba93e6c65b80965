"""Idea 4: attention on exit branches, attention transfer, detachable (prunable) later-layer attention."""

from metadyn.attention.detachable import (
    ATTENTION,
    SOURCES,
    AttentionOutput,
    AttentiveExits,
    LaterAttention,
    NotDeployableError,
    add_detachable,
    detachable_loss,
    exit_mflops,
    prune_later,
    prune_saturated,
    transfer_distances,
)
from metadyn.attention.maps import attention_map, attention_transfer

__all__ = ["ATTENTION", "SOURCES", "AttentionOutput", "AttentiveExits", "LaterAttention",
           "NotDeployableError", "add_detachable", "attention_map", "attention_transfer", "detachable_loss",
           "exit_mflops", "prune_later", "prune_saturated", "transfer_distances"]
