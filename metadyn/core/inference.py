"""Dynamic batched inference: exited samples leave the batch, so their remaining work is never done.

The reference early-exit codes (MSDNet, SDN) compute every exit for every sample and pick one
afterwards (:func:`simulated_exit`), which saves FLOPs only on paper. :func:`dynamic_exit` runs the
network stage by stage (``stem``, then ``stage``/``exit`` per exit, see
:class:`~metadyn.core.backbones.base.MultiExitNet`) and, after each exit, keeps only the samples that
have not left, indexing every tensor of the State (and of the policy's carry) with one index. There
is one host synchronisation per exit (the number of samples leaving), never one per sample.

Everything runs where the model is, at the precision asked for (``precision=None``: the ambient
:func:`~metadyn.core.device.default_precision`); exit thresholds must be fitted on logits collected at the same
precision (:func:`collect_logits` reads the same default).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from metadyn.core.backbones.base import MultiExitNet, index_state
from metadyn.core.device import autocast, module_device
from metadyn.core.policies import check_policy, pick_exits


@dataclass
class ExitResult:
    """Per-sample outcome of early exit: the chosen exit's logits ``(B, C)`` and exit index ``(B,)``."""

    logits: Tensor
    exit_idx: Tensor


def micro_batched(fn, x: Tensor, micro_batch: int | None):
    """Apply ``fn`` to ``x`` in slices of at most ``micro_batch`` samples and concatenate the results
    (tensors, or dataclasses/tuples of tensors). On CPUs, slices whose activations fit the cache run
    faster than one large batch; ``None`` runs ``fn(x)`` as is."""
    if micro_batch is None or x.shape[0] <= micro_batch:
        return fn(x)
    parts = [fn(chunk) for chunk in x.split(micro_batch)]
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, ExitResult):
        return ExitResult(torch.cat([p.logits for p in parts]), torch.cat([p.exit_idx for p in parts]))
    return type(first)(torch.cat(list(ts)) for ts in zip(*parts))


def _sliced(fn, state, micro_batch: int | None):
    """``fn(state)`` computed in batch slices of at most ``micro_batch`` samples (State pytrees)."""
    leaves, _ = tree_flatten(state)
    n = leaves[0].shape[0]
    if micro_batch is None or n <= micro_batch:
        return fn(state)
    parts = [fn(tree_map(lambda t, s=s: t[s : s + micro_batch], state)) for s in range(0, n, micro_batch)]
    flat = [tree_flatten(p) for p in parts]
    return tree_unflatten([torch.cat(ts) for ts in zip(*(f[0] for f in flat))], flat[0][1])


@torch.no_grad()
def dynamic_exit(model: MultiExitNet, x: Tensor, policy, micro_batch: int | None = None,
                 precision: str | None = None) -> ExitResult:
    """Early exit with batch compaction: each stage runs only on the samples still in the batch.

    Args:
        model: a MultiExitNet. It runs in eval mode: submodules in train mode (BatchNorm would use the
            statistics of whatever samples are left and overwrite its running buffers) are switched to eval
            for the call and back after it, so the model is left as it was given.
        x: input batch ``(B, ...)``, put on the model's device (and in its dtype) if it is elsewhere.
        policy: a policy step ``(i, logits, carry) -> (mask, carry)`` (see :mod:`metadyn.core.policies`).
        micro_batch: run a stage in slices of at most this many samples while more than that remain
            (see :func:`micro_batched`); the later, smaller batches run whole, so slicing never adds
            per-call overhead where few samples are left.
        precision: ``"fp32"`` or ``"bf16"`` (autocast); ``None``: the ambient default.

    Returns:
        An :class:`ExitResult`, equal to ``simulated_exit(model, x, policy)`` up to floating point.
    """
    check_policy(policy, model.num_exits)
    x = to_model(model, x)
    with eval_mode(model), autocast(x.device, precision):
        return _dynamic_exit(model, x, policy, micro_batch)


def to_model(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` on the model's device and, when both are floating point, in its parameters' dtype (a float64 batch
    for a float32 model, as :func:`collect_logits` does)."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    dtype = p.dtype if p is not None and x.is_floating_point() else None
    return x.to(module_device(model), dtype)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch the submodules of ``model`` that are in train mode to eval for the block, and back after it."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield model
    finally:
        for m in training:
            m.training = True


def _dynamic_exit(model: MultiExitNet, x: Tensor, policy, micro_batch: int | None) -> ExitResult:
    b = x.shape[0]
    last = model.num_exits - 1
    idx = torch.arange(b, device=x.device)  # original positions of the samples still in the batch
    exit_idx = torch.full((b,), last, dtype=torch.long, device=x.device)
    out: Tensor | None = None
    carry = None
    state = _sliced(model.stem, x, micro_batch)
    for i in range(model.num_exits):
        state = _sliced(lambda s, i=i: model.stage(i, s), state, micro_batch)
        logits, _ = model.exit(i, state)
        if logits.dtype in (torch.bfloat16, torch.float16):
            logits = logits.float()  # scored in float32, as collect_logits' logits were when thresholds were fitted
        if out is None:
            out = logits.new_empty((b, logits.shape[1]))
        if i == last:  # a policy's finish (SCAN's ensemble fallback) decides the last exit's output
            finish = getattr(policy, "finish", None)
            out.index_copy_(0, idx, logits if finish is None else finish(i, logits, carry))
            break
        mask, carry = policy(i, logits, carry)
        n_leave = int(mask.sum())  # the one host sync of this exit
        if n_leave == 0:
            continue
        order = torch.argsort((~mask).to(torch.uint8), stable=True)  # leaving samples first
        leave, stay = order[:n_leave], order[n_leave:]
        out.index_copy_(0, idx[leave], logits.index_select(0, leave))
        exit_idx.index_fill_(0, idx[leave], i)
        if stay.numel() == 0:
            break
        idx = idx[stay]
        state = index_state(state, stay)
        carry = index_state(carry, stay)
    return ExitResult(out, exit_idx)


@torch.no_grad()
def simulated_exit(model: MultiExitNet, x: Tensor, policy, precision: str | None = None) -> ExitResult:
    """The reference codes' early exit: compute every exit for every sample, then pick one (on the model's device;
    in eval mode for the call, as :func:`dynamic_exit`)."""
    x = to_model(model, x)
    with eval_mode(model), autocast(x.device, precision):
        logits = [lg.float() if lg.dtype in (torch.bfloat16, torch.float16) else lg for lg in model(x).logits]
        exit_idx, chosen = pick_exits(logits, policy)
    return ExitResult(chosen, exit_idx)


def _graph_calls(module: nn.Module) -> dict[str, list[fx.Node]]:
    """Where ``module`` runs through fx graphs (the stages of
    :func:`~metadyn.core.backbones.attach.attach_exits`), every ``call_module`` node by the called module's path."""
    calls: dict[str, list[fx.Node]] = {}
    for prefix, sub in module.named_modules():
        for attr in ("segments", "train_segments"):
            graphs = getattr(sub, attr, None)
            if not isinstance(graphs, (tuple, list)):
                continue
            for gm in graphs:
                if not isinstance(gm, fx.GraphModule):
                    continue
                for node in gm.graph.nodes:
                    if node.op == "call_module":
                        calls.setdefault(f"{prefix}.{node.target}" if prefix else str(node.target), []).append(node)
    return calls


def _only_feeds(calls: dict[str, list[fx.Node]], conv: str, bn: str) -> bool:
    """Whether, in every graph that calls them, the conv's output goes only to the BatchNorm and the BatchNorm
    reads only the conv's output (an exit cut between them, or a second use of either, forbids folding)."""
    for node in calls.get(conv, ()):
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or users[0] not in calls.get(bn, ()):
            return False
    for node in calls.get(bn, ()):
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src not in calls.get(conv, ()):
            return False
    return True


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every ``Conv2d`` directly followed by an eval-mode ``BatchNorm2d`` inside a plain ``nn.Sequential``
    into one conv, in place; returns ``module``. Outputs change only by floating-point rounding.

    The module tree keeps its shape: the conv is replaced by the folded conv and the BatchNorm by
    ``nn.Identity`` under the same names, so code that calls submodules by path (the fx stages of
    :func:`~metadyn.core.backbones.attach.attach_exits`) still finds them. Subclasses of ``nn.Sequential``,
    whose ``forward`` may not chain their children (a residual block), are searched but not folded; in a
    network run through fx graphs a pair is folded only where the conv feeds nothing but the BatchNorm (no exit
    cut between them)."""
    calls = _graph_calls(module)
    for path, seq in module.named_modules():
        if type(seq) is not nn.Sequential:
            continue
        names = list(seq._modules)
        for a_name, b_name in zip(names, names[1:]):
            a, b = seq._modules[a_name], seq._modules[b_name]
            if not (isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d) and b.track_running_stats
                    and not (a.training or b.training)):
                continue
            full = f"{path}.{{}}" if path else "{}"
            if _only_feeds(calls, full.format(a_name), full.format(b_name)):
                seq._modules[a_name] = fuse_conv_bn_eval(a, b)
                seq._modules[b_name] = nn.Identity()
    return module


def prepare_for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` set up for fast inference: eval mode, BatchNorm folded into the preceding convs,
    and channels-last weights (feed it ``x.contiguous(memory_format=torch.channels_last)``).

    BatchNorm and layout are memory-bound work that FLOP counts ignore and that weighs most on the
    high-resolution early stages; removing it makes time track FLOPs, for full and early-exit inference
    alike. The trained ``model`` is left untouched.
    """
    m = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(m)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


@torch.no_grad()
def collect_logits(model: nn.Module, x: Tensor, batch_size: int = 256, precision: str | None = None) -> list[Tensor]:
    """Every exit's logits on ``x`` (``K`` float32 tensors ``(N, C)`` on the CPU), computed in eval mode by
    batches on the model's device at ``precision`` (``None``: the ambient default; fit thresholds at the
    precision inference will run at). The logits stay on the device until the last batch: one copy per exit."""
    p = next(model.parameters())
    dev = module_device(model)
    was_training = model.training
    model.eval()
    chunks: list[list[Tensor]] = []
    try:
        with autocast(dev, precision):
            for s in range(0, len(x), batch_size):
                out = model(x[s : s + batch_size].to(dev, p.dtype, non_blocking=True))
                chunks.append([lg.float() for lg in out.logits])
    finally:
        model.train(was_training)
    return [torch.cat(c).cpu() for c in zip(*chunks)]
