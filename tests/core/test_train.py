import pytest
import torch

from metadyn.core.backbones.mlp import tiny_mlp_exits
from metadyn.core.callbacks import Callback
from metadyn.core.losses import ce_loss
from metadyn.core.train import fit, load_checkpoint, save_checkpoint
from metadyn.errors import InputError, NonFiniteLossError


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.flatten(1)[:, :4].argmax(1)).long()  # learnable: which of 4 pixels is largest
    return x, y


def _params(m):
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_fit_learns_and_is_deterministic():
    x, y = _data()
    a, b = tiny_mlp_exits(num_classes=4), tiny_mlp_exits(num_classes=4)
    b.load_state_dict(a.state_dict())
    sa = fit(a, (x, y), epochs=6, batch_size=16, lr=0.1, device="cpu", progress=False)
    fit(b, (x, y), epochs=6, batch_size=16, lr=0.1, device="cpu", progress=False)
    assert torch.equal(_params(a), _params(b))
    assert sa.history[-1]["loss"] < sa.history[0]["loss"]
    assert [h["epoch"] for h in sa.history] == list(range(1, 7))


class Interrupt(Callback):
    def __init__(self, at_epoch):
        self.at = at_epoch

    def on_epoch_start(self, state):
        if state.epoch == self.at:
            raise KeyboardInterrupt


def test_interrupted_run_resumes_bit_identical(tmp_path):
    x, y = _data()
    torch.manual_seed(1)
    init = tiny_mlp_exits(num_classes=4).state_dict()
    straight = tiny_mlp_exits(num_classes=4)
    straight.load_state_dict(init)
    fit(straight, (x, y), epochs=4, batch_size=16, device="cpu", progress=False, seed=3)

    ck = tmp_path / "run" / "checkpoint.pt"
    m = tiny_mlp_exits(num_classes=4)
    m.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        fit(m, (x, y), epochs=4, batch_size=16, device="cpu", progress=False, seed=3, checkpoint=ck,
            callbacks=[Interrupt(2)])
    assert load_checkpoint(ck)["epoch"] == 2
    resumed = tiny_mlp_exits(num_classes=4)  # a fresh process: new model, same init irrelevant
    state = fit(resumed, (x, y), epochs=4, batch_size=16, device="cpu", progress=False, seed=3, checkpoint=ck)
    assert torch.equal(_params(resumed), _params(straight))
    assert len(state.history) == 4 and load_checkpoint(ck)["epoch"] == 4
    assert not list(ck.parent.glob("*.tmp"))  # no temp files left behind


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    x, y = _data()
    ck = tmp_path / "checkpoint.pt"
    m = tiny_mlp_exits(num_classes=4)
    ce = ce_loss()
    calls = {"n": 0}

    def flaky(out, target):  # fine during epoch 1, NaN from epoch 2 on
        calls["n"] += 1
        loss = ce(out, target)
        return loss * float("nan") if calls["n"] > 6 else loss

    with pytest.raises(NonFiniteLossError, match="NaN or infinite in epoch 2.*last good checkpoint kept"):
        fit(m, (x, y), loss=flaky, epochs=3, batch_size=16, device="cpu", progress=False, checkpoint=ck)
    good = load_checkpoint(ck)
    assert good["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in good["model"].values())


def test_checkpoints_are_safe_to_load(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint({"a": torch.ones(2), "n": 3}, p)
    assert load_checkpoint(p)["n"] == 3
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        load_checkpoint(p)

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, p)  # weights_only=True refuses arbitrary objects
    with pytest.raises(InputError):
        load_checkpoint(p)


def test_a_loss_with_parameters_is_trained_and_checkpointed(tmp_path):
    x, y = _data()

    class ScaledCE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.log_scale = torch.nn.Parameter(torch.zeros(()))

        def forward(self, out, target):
            return ce_loss()(type(out)([lg * self.log_scale.exp() for lg in out.logits], out.features), target)

    loss = ScaledCE()
    ck = tmp_path / "c.pt"
    fit(tiny_mlp_exits(num_classes=4), (x, y), loss=loss, epochs=2, batch_size=16, device="cpu", progress=False,
        checkpoint=ck)
    assert loss.log_scale.item() != 0.0
    assert torch.equal(load_checkpoint(ck)["loss"]["log_scale"], loss.log_scale.detach())


def test_zero_epochs_trains_nothing():
    x, y = _data()
    m = tiny_mlp_exits(num_classes=4)
    before = _params(m).clone()
    state = fit(m, (x, y), epochs=0, device="cpu", progress=False)
    assert state.history == [] and torch.equal(_params(m), before)


class Counter(Callback):
    """A callback with state: how many batches it has seen."""

    def __init__(self):
        self.seen = 0
        self.at_start = None

    def on_train_start(self, state):
        self.at_start = self.seen  # what was restored before training (re)starts

    def on_batch_end(self, state):
        self.seen += 1

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, d):
        self.seen = d["seen"]


def test_callback_state_is_checkpointed_and_restored_before_train_start(tmp_path):
    x, y = _data()  # 96 samples: 6 batches of 16 per epoch
    ck = tmp_path / "checkpoint.pt"
    first = Counter()
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_mlp_exits(num_classes=4), (x, y), epochs=3, batch_size=16, device="cpu", progress=False,
            checkpoint=ck, callbacks=[first, Interrupt(2)])
    assert load_checkpoint(ck)["callbacks"] == [{"seen": 12}, {}]
    resumed = Counter()
    fit(tiny_mlp_exits(num_classes=4), (x, y), epochs=3, batch_size=16, device="cpu", progress=False,
        checkpoint=ck, callbacks=[resumed, Interrupt(99)])
    assert resumed.at_start == 12 and resumed.seen == 18  # as if never interrupted
    with pytest.raises(InputError, match="state of 2 callbacks but this run has 1"):
        fit(tiny_mlp_exits(num_classes=4), (x, y), epochs=3, batch_size=16, device="cpu", progress=False,
            checkpoint=ck, callbacks=[Counter()])


def test_a_checkpoint_without_callback_state_still_resumes(tmp_path):
    x, y = _data()
    torch.manual_seed(1)
    init = tiny_mlp_exits(num_classes=4).state_dict()
    straight = tiny_mlp_exits(num_classes=4)
    straight.load_state_dict(init)
    fit(straight, (x, y), epochs=3, batch_size=16, device="cpu", progress=False, seed=3)

    ck = tmp_path / "checkpoint.pt"
    m = tiny_mlp_exits(num_classes=4)
    m.load_state_dict(init)
    with pytest.raises(KeyboardInterrupt):
        fit(m, (x, y), epochs=3, batch_size=16, device="cpu", progress=False, seed=3, checkpoint=ck,
            callbacks=[Interrupt(2)])
    old = load_checkpoint(ck)
    del old["callbacks"]  # as written before callbacks had state
    save_checkpoint(old, ck)
    counter = Counter()
    resumed = tiny_mlp_exits(num_classes=4)
    fit(resumed, (x, y), epochs=3, batch_size=16, device="cpu", progress=False, seed=3, checkpoint=ck,
        callbacks=[counter])
    assert torch.equal(_params(resumed), _params(straight))
    assert counter.at_start == 0 and counter.seen == 6  # nothing to restore: the callback starts fresh


def test_losses_and_callbacks_do_not_import_the_training_loop():
    import subprocess
    import sys

    code = ("import sys, metadyn.core.losses, metadyn.core.callbacks, metadyn.core.gating\n"
            "print('metadyn.core.train' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_history_records_each_epochs_wall_time_across_a_resume(tmp_path):
    from metadyn.core.train import training_seconds

    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.arange(64) % 5
    ck = tmp_path / "ck.pt"
    fit(tiny_mlp_exits((1, 8, 8), 5), (x, y), epochs=2, batch_size=16, checkpoint=ck, progress=False)
    state = fit(tiny_mlp_exits((1, 8, 8), 5), (x, y), epochs=3, batch_size=16, checkpoint=ck, progress=False)
    assert [h["epoch"] for h in state.history] == [1, 2, 3] and all(h["seconds"] > 0 for h in state.history)
    assert training_seconds(state.history) == pytest.approx(sum(h["seconds"] for h in state.history))
    assert training_seconds([{"epoch": 1}]) is None and training_seconds([]) is None
