"""metadyn: dynamic inference (early exits, layer skipping) for PyTorch, with a data-efficiency plugin.

The front door for notebooks and scripts::

    import metadyn as md

    data = md.load_classification("digits", seed=0)
    net = md.resnet_exits(data.in_shape, data.num_classes, depth=20, exits=(1, 3, 5, 7, 9))
    md.fit(net, data.train, epochs=20)
    costs = md.exit_costs(net, data.in_shape)
    policy = md.policy_for_budget(md.collect_logits(net, data.val.x), costs.cumulative, 0.5 * costs.full)
    result = md.dynamic_exit(net.eval(), data.test.x, policy)

Every name in ``__all__`` is loaded on first use, so ``import metadyn`` imports torch and nothing optional
(no torchvision, matplotlib, scikit-learn, learn2learn, higher). The registries (``md.registry.BACKBONES``,
``METHODS``, ``POLICIES``, ``DATASETS``, ``TASK_KINDS``, ``BENCHMARKS``) are complete as soon as they are asked.
"""

from __future__ import annotations

import importlib

from metadyn import registry  # noqa: F401  (listed in __all__)
from metadyn.errors import InputError, NonFiniteLossError  # noqa: F401

__version__ = "0.1.0"

_API = {
    # networks: multi-exit backbones, exits attached to any trained network, heads, outputs
    "metadyn.core.backbones": ["MultiExitNet", "AttachedExits", "CutPoint", "attach_exits", "list_cut_points",
                               "conv4_exits", "mlp_exits", "msdnet", "resnet_exits", "scan_exits"],
    "metadyn.core.heads": ["ExitHead", "ScanAttention", "ScanHead"],
    "metadyn.core.outputs": ["ExitOutput"],
    # training: the loop, callbacks, losses, freezing
    "metadyn.core.train": ["fit", "pick_device", "seed_everything", "save_checkpoint", "load_checkpoint"],
    "metadyn.core.device": ["module_device", "default_precision", "autocast", "configure_kernels", "environment"],
    "metadyn.core.callbacks": ["Callback", "TrainState"],
    "metadyn.core.freeze": ["freeze", "unfreeze"],
    "metadyn.core.losses": ["exitwise_ce", "distillation_loss", "imta_loss", "byot_loss", "kd_loss",
                            "GradientEquilibrium", "ce_loss", "labeled_ce"],
    # exit policies, thresholds for a budget, calibration, FLOPs
    "metadyn.core.policies": ["ThresholdPolicy", "PatiencePolicy", "BudgetPolicy", "policy_for_budget",
                              "fit_thresholds_for_budget", "budgeted_curve", "accuracy_at_budgets", "anytime_accuracy",
                              "pick_exits", "policy_scores", "ga_thresholds"],
    "metadyn.core.calibration": ["fit_temperatures", "ece", "reliability"],
    "metadyn.core.flops": ["exit_costs", "expected_cost", "count_flops"],
    # dynamic inference
    "metadyn.core.inference": ["dynamic_exit", "simulated_exit", "collect_logits", "prepare_for_inference"],
    # measuring a trained network, the significance rule, plots
    "metadyn.core.evaluation": ["evaluate_exits", "ExitEval", "budget_sweep", "operating_point", "diverged_rows"],
    "metadyn.core.stats": ["paired", "holm", "aggregate", "mean_std"],
    "metadyn.core.plots": ["plot_groups", "plot_bars", "plot_reliability"],
    # layer skipping
    "metadyn.core.gating": ["GatedResNet", "BlockDropNet", "PolicyNet", "gated_costs", "skipnet_loss",
                            "blockdrop_loss"],
    # data sets and episodes
    "metadyn.data": ["load_classification", "keep_labels", "ClassPool", "Episode", "EpisodeSampler"],
    "metadyn.data.augment": ["random_shift"],
    "metadyn.meta.data": ["fewshot_pool"],
    # the research plugin: meta-learning, consistency, data-free conversion, detachable attention
    "metadyn.meta": ["MetaLearner", "ProtoExits", "evaluate_episodes", "evaluate_runs"],
    "metadyn.consistency": ["ExitConsistency"],
    "metadyn.consistency.losses": ["consistency_method"],
    "metadyn.datafree": ["synthesize_impressions", "SynthesisSettings", "Impressions", "train_exits",
                         "convert_to_early_exit", "distill_student", "static_cnn", "DEFAULT_TAU", "class_similarity",
                         "dirichlet_concentration", "final_layer_weight", "sample_targets", "convert",
                         "ConversionReport", "build_teacher"],
    "metadyn.core.backbones.attach": ["auto_cut_points"],
    "metadyn.attention": ["AttentiveExits", "add_detachable", "prune_later", "prune_saturated", "NotDeployableError",
                          "attention_map", "detachable_loss", "exit_mflops", "transfer_distances"],
    # experiments
    "metadyn.runner": ["run_task"],
    "metadyn.config": ["load_task"],
}
_WHERE = {name: module for module, names in _API.items() for name in names}

__all__ = sorted([*_WHERE, "InputError", "NonFiniteLossError", "registry", "__version__"])


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'metadyn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
