"""Layer skipping: per-input decisions of which residual blocks run, with real skipping at inference.

Both methods gate the residual blocks of a backbone that satisfies the gated-backbone contract
(:func:`~metadyn.core.gating.execution.check_gateable`: ``stem``, ``blocks`` with ``shortcut``, the final
head; the ``resnet`` backbone does); a skipped block passes its input through its shortcut.

* ``execution``: the contract, decision modes, :class:`GatedOutput`, and running a block on the samples
  whose gate is on (:func:`skip_block`, :func:`run_block`);
* ``skipnet``: SkipNet's gates, :class:`GatedResNet` and its losses (Wang et al., ECCV 2018);
* ``blockdrop``: BlockDrop's :class:`PolicyNet`, :class:`BlockDropNet`, :class:`Curriculum` and its loss
  (Wu et al., CVPR 2018);
* ``reinforce``: Bernoulli log-probabilities, the REINFORCE surrogate, SkipNet's returns;
* ``costs``: FLOPs of a gated network (:func:`gated_costs`) and the policies it takes.

Networks return a :class:`GatedOutput`; losses are ``loss(out: GatedOutput, y) -> Tensor`` as for
:func:`metadyn.core.train.fit`; ``skipnet_loss`` and ``blockdrop_loss`` are registered in
:data:`metadyn.registry.METHODS` as ``"skipnet"`` and ``"blockdrop"``. The decision mode of a network
(``net.mode``) is ``"relaxed"`` (SkipNet's supervised pre-training), ``"sample"`` (policy-gradient training)
or ``"greedy"`` (inference).
"""

from metadyn.core.gating.blockdrop import (
    BlockDropNet,
    Curriculum,
    PolicyNet,
    blockdrop_loss,
    blockdrop_reward,
    bound_probs,
    curriculum_forced,
)
from metadyn.core.gating.costs import GatedCosts, evaluate_gated, gated_costs, policy_counts
from metadyn.core.gating.execution import (
    GATEABLE,
    MODES,
    GatedOutput,
    check_gateable,
    mix_block,
    run_block,
    skip_block,
)
from metadyn.core.gating.reinforce import bernoulli_log_prob, reinforce_loss, skipnet_returns
from metadyn.core.gating.skipnet import FeedForwardGates, GatedResNet, RecurrentGate, gated_ce, skipnet_loss

__all__ = ["GATEABLE", "MODES", "BlockDropNet", "Curriculum", "FeedForwardGates", "GatedCosts", "GatedOutput",
           "GatedResNet", "PolicyNet", "RecurrentGate", "bernoulli_log_prob", "blockdrop_loss", "blockdrop_reward",
           "bound_probs", "check_gateable", "curriculum_forced", "evaluate_gated", "gated_ce", "gated_costs",
           "mix_block", "policy_counts", "reinforce_loss", "run_block", "skip_block", "skipnet_loss", "skipnet_returns"]
