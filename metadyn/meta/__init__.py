"""Meta-learning over exits (the seed's "Idea 2"): a functional MAML engine on torch.func in which
each exit of a multi-exit network is a task; prototypical-network exits; few-shot evaluation."""

from metadyn.meta.functional import ExitRunner, inner_loop, run_exits, to_channels_last
from metadyn.meta.learner import ALGORITHMS, MetaLearner

__all__ = ["ALGORITHMS", "ExitRunner", "MetaLearner", "inner_loop", "run_exits", "to_channels_last"]
