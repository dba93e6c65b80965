import pytest
import torch

from metadyn.core.backbones.conv4 import conv4_exits, tiny_conv4_exits
from metadyn.core.backbones.mlp import tiny_mlp_exits
from metadyn.core.backbones.resnet import resnet_exits, tiny_resnet_exits
from metadyn.errors import InputError
from metadyn.registry import BACKBONES


@pytest.mark.parametrize("build", [tiny_mlp_exits, tiny_conv4_exits, tiny_resnet_exits])
def test_forward_matches_stagewise(build):
    m = build(in_shape=(1, 8, 8), num_classes=7).eval()
    x = torch.randn(5, 1, 8, 8)
    out = m(x)
    assert out.num_exits == m.num_exits
    state = m.stem(x)
    for i in range(m.num_exits):
        state = m.stage(i, state)
        lg, ft = m.exit(i, state)
        assert lg.shape == (5, 7) and ft.dim() == 2
        assert torch.equal(lg, out.logits[i])
    assert torch.equal(m.forward_final(x), out.logits[-1])


def test_resnet_depths_and_exits():
    for depth, n in [(20, 3), (56, 9), (110, 18)]:
        m = resnet_exits(depth=depth)
        assert len(m.blocks) == 3 * n
        assert m.exit_blocks == (n, 2 * n, 3 * n)
    m = resnet_exits(depth=20, exits=(2, 5))
    assert m.exit_blocks == (2, 5, 9) and m.num_exits == 3  # the final exit is always added
    assert [list(m.block_range(i)) for i in range(3)] == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    with pytest.raises(InputError, match="6n\\+2"):
        resnet_exits(depth=21)
    with pytest.raises(InputError, match="exits"):
        resnet_exits(depth=20, exits=(0, 4))


def test_conv4_shapes_and_registry():
    m = conv4_exits(in_shape=(1, 28, 28), num_classes=5, width=32, norm="group")
    out = m(torch.randn(2, 1, 28, 28))
    assert [f.shape[1] for f in out.features] == [32] * 4
    assert set(BACKBONES.names()) >= {"mlp", "conv4", "resnet"}
    with pytest.raises(InputError, match="norm"):
        conv4_exits(norm="layer")
