import pytest
import torch

from metadyn.consistency import ExitConsistency, byol_distance
from metadyn.consistency.losses import consistency_method
from metadyn.core.backbones.resnet import tiny_resnet_exits
from metadyn.core.train import fit
from metadyn.errors import InputError


def _data(n=128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :2, :2].flatten(1).argmax(1)).long()
    return x, y


def test_byol_distance_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(byol_distance(p, z), torch.tensor([0.0, 2.0]))


def test_l2_consistency_by_hand():
    from metadyn.consistency.losses import consistency_loss

    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    target = torch.tensor([[3.0, 0.0], [0.0, -2.0]])  # unit targets (1, 0) and (0, -1)
    # 1/D ||p - t||^2 per sample: (0 + 1) / 2 and (0 + 1) / 2; mean over the batch
    assert torch.allclose(consistency_loss(pred, target, "l2"), torch.tensor(0.5))


@pytest.mark.parametrize("kind", ["byol", "simsiam", "l2"])
def test_final_exit_gets_exactly_zero_gradient_from_consistency(kind):
    m = tiny_resnet_exits(num_classes=4)
    loss = consistency_method(m, (1, 8, 8), kind=kind)
    x, _ = _data(16)
    out = m(torch.cat([x, x + 0.1]) if kind == "simsiam" else x)
    loss.consistency(out).backward()
    final_params = list(m.heads[-1].parameters())
    for b in m.block_range(m.num_exits - 1):
        final_params += list(m.blocks[b].parameters())
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in final_params)
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in m.blocks[0].parameters())
    assert all(p.grad is not None for p in loss.projectors.parameters())


def test_simsiam_asks_for_two_views_and_fit_provides_them():
    m = tiny_resnet_exits(num_classes=4)
    loss = consistency_method(m, (1, 8, 8), kind="simsiam")
    assert loss.views == 2
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, out, y):
            seen.append((out.logits[0].shape[0], y.tolist()))
            return loss(out, y)

    spy = Spy()
    spy.views = 2
    spy.inner = loss  # registers the projectors as parameters of the wrapper
    x, y = _data(8)
    fit(m, (x, y), loss=spy, epochs=1, batch_size=8, device="cpu", progress=False, augment=lambda t: t + 0.01)
    b, labels = seen[0]
    assert b == 16 and labels[:8] == labels[8:]


def test_consistency_falls_and_does_not_collapse():
    torch.manual_seed(0)
    m = tiny_resnet_exits(num_classes=4)
    loss = consistency_method(m, (1, 8, 8), kind="byol", hidden=32)
    x, y = _data(256)
    y_semi = y.clone()
    y_semi[32:] = -1  # label-scarce: most samples unlabeled
    before = loss.consistency(m(x)).item()
    fit(m, (x, y_semi), loss=loss, epochs=15, batch_size=64, lr=0.05, device="cpu", progress=False)
    m.eval()
    loss.eval()
    with torch.no_grad():
        out = m(x)
        after = loss.consistency(out).item()
        for p in loss.predictions(out):
            z = torch.nn.functional.normalize(p, dim=-1)
            d = z.shape[1]
            assert z.std(0).mean().item() > 0.1 / d**0.5  # no collapse to a constant vector
    assert after < before


def test_bad_kind():
    with pytest.raises(InputError, match="consistency kind"):
        ExitConsistency([4, 8], kind="barlow")
