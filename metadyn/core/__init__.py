"""The early-exit and gating core; depends on torch only."""
