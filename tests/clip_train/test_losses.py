import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clip_train.losses import build_loss
from data_tools.errors import ConfigError


def _features(seed: int, n: int = 24, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    return image, text, scale


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_infonce_equals_open_clip(seed):
    """Oracle: open_clip's ClipLoss gives the same loss and gradients."""
    ours_in = _features(seed)
    ref_in = [t.detach().clone().requires_grad_() for t in ours_in]
    ours = build_loss("clip")(*ours_in)["loss"]
    ref = ClipLoss()(*ref_in)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    ours.backward()
    ref.backward()
    for a, b in zip(ours_in, ref_in):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)


def test_unknown_loss_name():
    with pytest.raises(ConfigError, match="loss.name"):
        build_loss("nope")
