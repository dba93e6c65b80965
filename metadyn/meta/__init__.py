"""Meta-learning over exits (the seed's "Idea 2"): a functional MAML engine (torch.func) in which each
exit of a multi-exit network is a task; prototypical-network exits; few-shot evaluation per exit."""

from metadyn.meta.data import fewshot_pool
from metadyn.meta.evaluate import FewShotResult, anytime_costs, evaluate_episodes, evaluate_runs, mean_ci
from metadyn.meta.functional import ExitRunner, inner_loop, run_exits, to_channels_last
from metadyn.meta.learner import ALGORITHMS, MetaLearner
from metadyn.meta.protonet import ProtoExits, prototype_logits
from metadyn.meta.train import BestOnVal, StackedPredictor, episode_stream, meta_fit

__all__ = ["ALGORITHMS", "BestOnVal", "ExitRunner", "FewShotResult", "MetaLearner", "ProtoExits", "StackedPredictor",
           "anytime_costs", "episode_stream", "evaluate_episodes", "evaluate_runs", "fewshot_pool", "inner_loop",
           "mean_ci", "meta_fit", "prototype_logits", "run_exits", "to_channels_last"]
