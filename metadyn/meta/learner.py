"""MAML, first-order MAML, ANIL and Meta-SGD over the exits of a multi-exit network.

Each exit is a task (the seed's "Idea 2"): for an episode, exit ``i`` runs its own inner loop over
the parameters on its path only — the trunk up to exit ``i`` and head ``i`` — and the meta-objective
is the weighted sum of the exits' query losses after adaptation,

    min_theta  E_episodes  sum_i  w_i  L_query^i( U_i(theta) ),
    U_i(theta) = theta - alpha_i * grad_{path_i} L_support^i(theta)    (steps_i times),

where ``U_i`` leaves every parameter off exit ``i``'s path untouched, so exit ``i``'s term gives
those parameters an exactly zero meta-gradient. Unlike ordinary meta-learning the tasks share only
part of the parameters (a deep exit shares the whole trunk of a shallow one, not vice versa).

Options: per-exit inner rates and steps; ``share_trunk`` (one inner loop whose trunk update is the sum
of every exit's update — equivalently, joint multi-exit MAML); ANIL (heads only); Meta-SGD (learned
per-parameter inner rates). Normalisation must be per episode (``norm="batch_episodic"`` or
``"group"`` in Conv-4): a BatchNorm with running statistics would mix episodes and is refused.

References:
    Finn et al., "Model-Agnostic Meta-Learning", ICML 2017 (Eq. 1, 2; first-order: Sec. 5.2);
    Raghu et al., "Rapid Learning or Feature Reuse? (ANIL)", ICLR 2020, Sec. 4;
    Li et al., "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning", 2017, Eq. 3-4 (and Sec. 4: the
    rates alpha are initialised at random, uniformly in [0.005, 0.1]).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from metadyn.core import distributed
from metadyn.core.backbones.base import MultiExitNet
from metadyn.errors import InputError
from metadyn.meta.functional import (
    ExitRunner,
    Params,
    accuracy,
    cross_entropy,
    inner_loop,
    run_exits,
    swapped_parameters,
    to_channels_last,
    vmapped,
)

ALGORITHMS = ("maml", "fomaml", "anil", "metasgd")

Batch = tuple[Tensor, Tensor, Tensor, Tensor]  # support_x (T, N*K, C, H, W), support_y, query_x, query_y


def _per_exit(name: str, value, n: int, kind: type) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value] * n
    if len(values) != n:
        raise InputError(f"{name} has {len(values)} entries for {n} exits")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int) or not v >= 0 \
                or not math.isfinite(v):  # `not v >= 0`: NaN too
            raise InputError(f"{name} must be a finite non-negative {kind.__name__} (or one per exit), got {value!r}")
    return [kind(v) for v in values]


class _PrecomputedGrad(torch.autograd.Function):
    """Hands gradients computed eagerly, episode by episode, to autograd: ``value.backward()`` then
    accumulates them into the leaves' ``.grad`` (so meta-training runs in :func:`metadyn.core.train.fit`
    with any optimizer, and its memory is one episode's graph, not a meta-batch's)."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: tuple, *leaves: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, gout: Tensor):
        grads, ctx.grads = ctx.grads, None  # released, so that .grad can take over the buffers
        if gout.device.type != "cpu":  # no host sync on a GPU: scale by the incoming gradient (1 from .backward())
            return (None, None, *torch._foreach_mul(list(grads), gout))
        if bool(gout == 1):  # the usual loss.backward()
            return (None, None, *grads)
        return (None, None, *(gout * g for g in grads))


class MetaLearner(nn.Module):
    """A multi-exit network meta-learned with each exit as a task.

    It all-reduces its own meta-gradients under ``torch.distributed`` (``syncs_gradients``), so
    :func:`~metadyn.core.train.fit` does not wrap it in DistributedDataParallel.

    Args:
        net: a MultiExitNet with per-episode normalisation.
        algorithm: ``maml`` (second order), ``fomaml`` (first order), ``anil`` (adapt heads only) or
            ``metasgd`` (learned per-parameter inner rates, initialised by ``metasgd_init``).
        inner_lr: inner learning rate, or one per exit in ``exits``.
        inner_steps: inner steps during meta-training, or one per exit.
        exits: which exits are tasks: ``None`` = all, else a list of exit indices
            (``[net.num_exits - 1]`` is plain MAML on the final exit).
        exit_weights: ``w_i`` of the meta-objective (default 1 each).
        share_trunk: one inner loop for all exits whose trunk update is the sum of every exit's
            update (heads still take their own); this is joint multi-exit MAML.
        metasgd_init: Meta-SGD's initial rates: ``"uniform"`` (the paper's: every rate drawn independently from
            ``U[metasgd_range]``, torch's global generator) or ``"constant"`` (every rate ``inner_lr``, as
            learn2learn's ``MetaSGD``; metadyn's earlier behaviour).
        metasgd_range: ``(low, high)`` of the uniform initialisation (the paper's ``[0.005, 0.1]``).
        channels_last: run the query passes in channels-last layout (``None``: on the CPU, where it makes
            normalisation and pooling several times faster, and on CUDA, where cuDNN's convolutions prefer it;
            the support passes, small and differentiated twice, keep their layout: per-channel reductions of
            BatchNorm's double backward are slower channels-last).
        batched: compute the meta-gradient of a meta-batch with its episodes batched by ``torch.func.vmap``
            (:func:`~metadyn.meta.functional.vmapped`) instead of episode after episode; ``None``: on CUDA, where
            launching the small operations of one episode at a time leaves the GPU idle. Without a consistency
            term only; the same meta-gradient up to floating point.
        batch_chunk: episodes per batched call (``None``: the whole meta-batch, or this rank's share of it);
            memory grows with it.

    Example::

        learner = MetaLearner(conv4_exits(width=32, norm="batch_episodic"), "maml", inner_lr=0.4)
        opt = torch.optim.Adam(learner.parameters(), 1e-3)
        loss = learner(sampler.batch(0, 8))      # meta-gradients are computed here, episode by episode
        opt.zero_grad(); loss.backward(); opt.step()
        logits = learner.predict(ep.support_x, ep.support_y, ep.query_x)   # one (Q, N) per exit
    """

    syncs_gradients = True

    def __init__(self, net: MultiExitNet, algorithm: str = "maml", inner_lr: float | Sequence[float] = 0.4,
                 inner_steps: int | Sequence[int] = 1, exits: Sequence[int] | None = None,
                 exit_weights: Sequence[float] | None = None, share_trunk: bool = False,
                 channels_last: bool | None = None, consistency: nn.Module | None = None,
                 metasgd_init: str = "uniform", metasgd_range: Sequence[float] = (0.005, 0.1),
                 batched: bool | None = None, batch_chunk: int | None = None):
        super().__init__()
        if algorithm not in ALGORITHMS:
            raise InputError(f"unknown meta-learning algorithm {algorithm!r}; choose from: {', '.join(ALGORITHMS)}")
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                raise InputError("meta-learning needs per-episode normalisation: build the backbone with "
                                 "norm='batch_episodic' or 'group' (BatchNorm running statistics mix episodes)")
        k = net.num_exits
        if exits is not None and any(isinstance(e, bool) or not isinstance(e, numbers.Integral) for e in exits):
            raise InputError(f"exits must be integer exit indices, got {list(exits)}")
        exits = list(range(k)) if exits is None else [int(e) for e in exits]
        if not exits or sorted(set(exits)) != exits or exits[0] < 0 or exits[-1] >= k:
            raise InputError(f"exits must be increasing exit indices in 0..{k - 1}, got {exits}")
        self.net = net
        self.algorithm = algorithm
        self.exits = tuple(exits)
        self.inner_lr = _per_exit("inner_lr", inner_lr, len(exits), float)
        self.inner_steps = _per_exit("inner_steps", inner_steps, len(exits), int)
        self.exit_weights = _per_exit("exit_weights", exit_weights if exit_weights is not None else 1.0,
                                      len(exits), float)
        if not any(w > 0 for w in self.exit_weights):
            raise InputError(f"exit_weights are all zero: the meta-objective would train nothing, got "
                             f"{self.exit_weights}")
        self.share_trunk = bool(share_trunk) and algorithm != "anil"  # ANIL's trunk is never adapted
        if self.share_trunk and len(set(self.inner_steps)) > 1:
            raise InputError(f"share_trunk needs one inner_steps for all exits, got {self.inner_steps}")
        if algorithm == "metasgd" and len(set(self.inner_lr)) > 1:
            raise InputError("metasgd learns its own per-parameter rates: give one inner_lr to start from")
        if metasgd_init not in ("uniform", "constant"):
            raise InputError(f"unknown metasgd_init {metasgd_init!r}; choose from: uniform, constant")
        try:
            lo, hi = (float(v) for v in metasgd_range)
        except (TypeError, ValueError):
            lo = hi = None
        if lo is None or not 0 <= lo <= hi:
            raise InputError(f"metasgd_range must be [low, high] with 0 <= low <= high, got {list(metasgd_range)}")
        self.channels_last = channels_last
        self.batched, self.batch_chunk = batched, batch_chunk
        self._runner = [ExitRunner(net)]  # a list: not a submodule, so the parameters are not listed twice
        self.inner_lrs = nn.ParameterDict()
        if algorithm == "metasgd":  # Li et al. 2017, Sec. 4: alpha initialised at random in [0.005, 0.1]
            for name, p in self._leaf_params().items():
                rate = (torch.full_like(p, self.inner_lr[0]) if metasgd_init == "constant" else
                        torch.empty_like(p).uniform_(lo, hi))
                self.inner_lrs[name.replace(".", "__")] = nn.Parameter(rate)
        self._paths: dict[int, tuple[list[str], list[str]]] | None = None
        self._stats: Tensor | None = None  # the last meta-batch's query losses and accuracies (see last_stats)
        # Idea 3 in the outer loop: an ExitConsistency (metadyn.consistency) whose weighted term, on each
        # episode's support and query images through the meta-parameters, joins the meta-objective.
        if consistency is not None and getattr(consistency, "views", 1) != 1:
            raise InputError("a consistency that needs two augmented views (kind 'simsiam') cannot run in the outer "
                             "loop, which has one view of each image (it would pair support with query images); "
                             "use byol or l2")
        self.consistency = consistency

    # ------------------------------------------------------------------ parameters and paths

    @property
    def runner(self) -> ExitRunner:
        return self._runner[0]

    def _leaf_params(self) -> Params:
        """The meta-learned network parameters, keyed as the runner names them (``net.<name>``).

        Read afresh from the module tree, so the runner's cached parameter slots are dropped too: a head or
        block replaced between meta-steps is then the one that gets swapped and differentiated (one tree
        walk per meta-step or prediction, instead of one per forward)."""
        self.runner.forget_slots()
        return {n: p for n, p in self.runner.named_parameters() if p.requires_grad}

    def exit_paths(self, x: Tensor) -> dict[int, tuple[list[str], list[str]]]:
        """For every exit ``i``: ``(path, head)`` — the parameters that reach exit ``i``'s logits and,
        of those, the ones that do not reach its trunk state (its head). Found once, from the autograd
        graph of a forward on ``x`` (two samples of an episode)."""
        if self._paths is None:
            x = x[:2] if len(x) > 1 else torch.cat([x, x])
            params = self._leaf_params()
            names, leaves = list(params), list(params.values())
            paths = {}
            with torch.enable_grad():
                for i in range(self.net.num_exits):
                    state = run_exits(self.runner, params, x, (i,), "states")[0]
                    logits = self.runner.net.exit(i, state)[0]
                    path = self._reached(logits, names, leaves)
                    in_trunk = set(self._reached(state, names, leaves))
                    paths[i] = (path, [n for n in path if n not in in_trunk])
            self._paths = paths
        return self._paths

    @staticmethod
    def _reached(out: Tensor, names: list[str], leaves: list[Tensor]) -> list[str]:
        if not out.requires_grad:  # e.g. a frozen trunk
            return []
        grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True, retain_graph=True)
        return [n for n, g in zip(names, grads) if g is not None]

    def _outer_leaves(self) -> list[Tensor]:
        """Everything the outer loop learns: the network, Meta-SGD's rates, the consistency heads."""
        extra = list(self.consistency.parameters()) if self.consistency is not None else []
        return [*self._leaf_params().values(), *self.inner_lrs.values(), *extra]

    def consistency_term(self, params: Params, x: Tensor) -> Tensor:
        """``weight * consistency`` of the network at ``params`` on the images ``x`` (labels not used)."""
        with swapped_parameters(self.runner, params):
            out = self.runner.net(x)
        return self.consistency.weight * self.consistency.consistency(out)

    def _lrs(self, keys: Sequence[str], rate: float) -> dict[str, float | Tensor]:
        if self.algorithm == "metasgd":
            return {k: self.inner_lrs[k.replace(".", "__")] for k in keys}
        return dict.fromkeys(keys, rate)

    def _input(self, x: Tensor) -> Tensor:
        cl = self.channels_last if self.channels_last is not None else x.device.type in ("cpu", "cuda")
        return to_channels_last(x) if cl else x

    @property
    def last_stats(self) -> dict:
        """The last meta-batch's mean query loss and accuracy of each exit (read from the device only when asked)."""
        if self._stats is None:
            return {}
        k = len(self.exits)
        values = self._stats.tolist()
        return {"query_loss": values[:k], "query_accuracy": values[k:2 * k]}

    # ------------------------------------------------------------------ adaptation

    def episode_logits(self, params: Params, sx: Tensor, sy: Tensor, qx: Tensor, second_order: bool,
                       steps: Sequence[int] | None = None,
                       functional: bool = False) -> Iterator[tuple[tuple[int, ...], list[Tensor]]]:
        """Adapt on one episode's support set and yield ``(exits, query logits)`` task group by task group.

        A group is one exit (exits as separate tasks), all exits (``share_trunk``, ANIL). Yielding
        group by group lets the caller differentiate and free each group's graph before the next.
        ``functional``: inner gradients by ``torch.func.grad``, for a caller under ``torch.func.vmap`` (the
        exit paths must have been found already, :meth:`exit_paths`).
        """
        steps = self.inner_steps if steps is None else list(steps)
        if not functional:
            qx = self._input(qx)  # the support set is small and differentiated twice: its layout stays
        paths = self.exit_paths(sx)
        pos = {e: j for j, e in enumerate(self.exits)}
        runner = self.runner

        if self.algorithm == "anil":  # trunk features once at theta; only the heads adapt (Raghu et al. Sec. 4)
            s_states = run_exits(runner, params, sx, self.exits, "states")
            q_states = run_exits(runner, params, qx, self.exits, "states")
            logits = []
            for e, s_state, q_state in zip(self.exits, s_states, q_states):
                j = pos[e]

                def head_loss(p: Params, s=s_state, e=e) -> Tensor:
                    return cross_entropy(run_exits(runner, p, s, (e,), "head")[0], sy)

                head = paths[e][1]
                fast = inner_loop(head_loss, params, head, self._lrs(head, self.inner_lr[j]), steps[j], second_order,
                                  functional)
                logits.append(run_exits(runner, fast, q_state, (e,), "head")[0])
            yield self.exits, logits
            return

        if self.share_trunk:  # one loop; step = sum of every exit's own update alpha_i * grad L_i
            keys = sorted({n for e in self.exits for n in paths[e][0]})
            rates = self.inner_lr

            def joint_loss(p: Params) -> Tensor:
                out = run_exits(runner, p, sx, self.exits)
                scale = [1.0] * len(out) if self.algorithm == "metasgd" else rates
                return sum(r * cross_entropy(z, sy) for r, z in zip(scale, out))

            fast = inner_loop(joint_loss, params, keys, self._lrs(keys, 1.0), steps[0], second_order, functional)
            yield self.exits, run_exits(runner, fast, qx, self.exits)
            return

        for e in self.exits:  # each exit its own task over its own path
            j = pos[e]

            def exit_loss(p: Params, e=e) -> Tensor:
                return cross_entropy(run_exits(runner, p, sx, (e,))[0], sy)

            path = paths[e][0]
            fast = inner_loop(exit_loss, params, path, self._lrs(path, self.inner_lr[j]), steps[j], second_order,
                              functional)
            yield (e,), run_exits(runner, fast, qx, (e,))

    @torch.no_grad()
    def predict(self, sx: Tensor, sy: Tensor, qx: Tensor, steps: int | Sequence[int] | None = None) -> list[Tensor]:
        """Adapt every exit on one episode's support set and return each exit's ``(Q, N)`` query logits."""
        if steps is not None:
            steps = _per_exit("steps", steps, len(self.exits), int)
        out = []
        for _, logits in self.episode_logits(self._leaf_params(), sx, sy, qx, False, steps):
            out.extend(z.float() for z in logits)
        return out

    # ------------------------------------------------------------------ meta-gradient

    def meta_gradient(self, batch: Batch) -> tuple[Tensor, list[Tensor]]:
        """Mean over the batch's episodes of the meta-objective, and its gradient for :meth:`parameters`.

        Computed episode by episode and task group by task group (one graph alive at a time), or with the
        episodes batched (``batched``, see the class). Under ``torch.distributed`` each rank takes the
        episodes ``rank, rank + world, ...`` and the sums are all-reduced (in buckets), so every rank ends with
        the gradient of the whole meta-batch.
        """
        sx, sy, qx, qy = batch
        t_all = len(sx)
        rank, world = distributed.rank(), distributed.world_size()
        params = self._leaf_params()
        leaves = self._outer_leaves()
        grads: list[Tensor | None] = [None] * len(leaves)
        k = len(self.exits)
        stats = torch.zeros(2 * k + 1, dtype=torch.float64, device=sx.device)  # loss, acc per exit; total
        second = self.algorithm != "fomaml"  # ANIL: second order through the head loop, as MAML

        def add(total: Tensor) -> None:
            for j, d in enumerate(torch.autograd.grad(total, leaves, allow_unused=True)):
                if d is not None:  # the first gradient becomes the accumulator: no extra buffer
                    grads[j] = d if grads[j] is None else grads[j].add_(d)

        mine = list(range(rank, t_all, world))
        batched = self.batched if self.batched is not None else sx.device.type == "cuda"
        if batched and self.consistency is None and mine:
            self.exit_paths(sx[mine[0]])
            weights = torch.tensor(self.exit_weights, dtype=stats.dtype, device=sx.device)

            def episode(sx_t: Tensor, sy_t: Tensor, qx_t: Tensor, qy_t: Tensor) -> tuple[Tensor, Tensor]:
                logits = [z for _, zs in self.episode_logits(params, sx_t, sy_t, qx_t, second, functional=True)
                          for z in zs]  # in the order of self.exits
                return (torch.stack([cross_entropy(z, qy_t) for z in logits]),
                        torch.stack([accuracy(z, qy_t) for z in logits]))

            step = len(mine) if self.batch_chunk is None else max(1, int(self.batch_chunk))
            own = [b[rank::world] for b in (sx, sy, qx, qy)]  # this rank's episodes (views)
            for s in range(0, len(mine), step):
                losses, accs = vmapped(episode, self.net, *(b[s : s + step] for b in own))  # (t, K) each
                total = (losses * weights.to(losses.dtype)).sum() / t_all
                add(total)
                stats[:k] += losses.detach().sum(0) / t_all
                stats[k:2 * k] += accs.sum(0) / t_all
                stats[-1] += total.detach()
        else:
            weight = dict(zip(self.exits, self.exit_weights))
            pos = {e: j for j, e in enumerate(self.exits)}
            for t in mine:
                for exits, logits in self.episode_logits(params, sx[t], sy[t], qx[t], second):
                    losses = [cross_entropy(z, qy[t]) for z in logits]
                    total = sum(weight[e] * ls for e, ls in zip(exits, losses)) / t_all
                    add(total)
                    for e, ls, z in zip(exits, losses, logits):
                        stats[pos[e]] += ls.detach() / t_all
                        stats[k + pos[e]] += accuracy(z, qy[t]) / t_all
                    stats[-1] += total.detach()
                if self.consistency is not None:  # one term per episode, on all its images
                    aux = self.consistency_term(params, torch.cat([sx[t], qx[t]])) / t_all
                    add(aux)
                    stats[-1] += aux.detach()
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]  # off every path: 0
        distributed.all_reduce_coalesced([*grads, stats])
        self._stats = stats[:2 * k]
        return stats[-1].to(sx.dtype if sx.is_floating_point() else torch.float32), grads

    def forward(self, batch: Batch) -> Tensor:
        """The meta-objective of a meta-batch; its ``.backward()`` writes the meta-gradients."""
        value, grads = self.meta_gradient(batch)
        leaves = self._outer_leaves()
        return _PrecomputedGrad.apply(value, tuple(grads), *leaves)
