"""fastssl.masking against lightly's masked-modelling utilities (1.6.0): the same token
masks from the same seed, the same gathers and scatters, and masked_patch_loss against
lightly's MAE recipe (patchify, normalize_mean_var, the masked tokens' MSE) at least as
close to float64."""
import pytest
import torch

from ._peers import need, rel

lightly = need("lightly")
from lightly.models import utils as LU  # noqa: E402

from fastssl import masking  # noqa: E402

FLOOR = 4 * 2.0 ** -24


@pytest.mark.parametrize("B,L", [(1, 1), (1, 2), (3, 50), (4, 197)])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.6, 0.75, 0.99])
@pytest.mark.parametrize("mask_class_token", [False, True])
def test_random_token_mask_is_lightlys(B, L, ratio, mask_class_token):
    torch.manual_seed(B * 1000 + L)
    want = LU.random_token_mask((B, L), ratio, mask_class_token)
    torch.manual_seed(B * 1000 + L)
    got = masking.random_token_mask((B, L), ratio, mask_class_token)
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and torch.equal(g, w)


def test_gather_and_scatter_are_lightlys():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 11, 5, generator=g)
    index = torch.stack([torch.randperm(11, generator=g)[:4] for _ in range(3)])
    assert torch.equal(masking.get_at_index(tokens, index), LU.get_at_index(tokens, index))
    value = torch.randn(3, 4, 5, generator=g)
    assert torch.equal(masking.set_at_index(tokens, index, value),
                       LU.set_at_index(tokens, index, value))


@pytest.mark.parametrize("side,p", [(32, 4), (64, 16), (30, 3)])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_loss_against_lightlys_mae_recipe(side, p, norm_pix):
    """lightly's MAE example: targets = patchify(images) (normalize_mean_var for norm-pix),
    gathered at the masked tokens, MSE against the decoder's predictions there."""
    g = torch.Generator().manual_seed(side + p)
    N, L = 3, (side // p) ** 2
    images = torch.randn(N, 3, side, side, generator=g, dtype=torch.float64)
    pred_all = torch.randn(N, L, p * p * 3, generator=g, dtype=torch.float64)
    torch.manual_seed(side)
    _, idx_mask = LU.random_token_mask((N, L + 1), 0.75)  # token 0: the class token
    idx = idx_mask - 1

    def lightly_loss(pred_all, images):
        target = LU.patchify(images, p)
        if norm_pix:
            target = LU.normalize_mean_var(target, dim=-1)
        return torch.nn.functional.mse_loss(LU.get_at_index(pred_all, idx),
                                            LU.get_at_index(target, idx))

    mask = torch.zeros(N, L, dtype=torch.bool)
    mask.scatter_(1, idx, True)
    results = {}
    for name, fn, dt in (("ref", lightly_loss, torch.float64),
                         ("lightly", lightly_loss, torch.float32),
                         ("fastssl", lambda x, im: masking.masked_patch_loss(
                             x, im, mask, p, norm_pix=norm_pix), torch.float32)):
        x = pred_all.float().to(dt).requires_grad_()
        v = fn(x, images.float().to(dt))
        results[name] = (v, torch.autograd.grad(v, x)[0])
    ref = results["ref"]
    for i, what in enumerate(("value", "gradient")):
        ef, el = rel(results["fastssl"][i], ref[i]), rel(results["lightly"][i], ref[i])
        assert ef <= 2 * el + FLOOR, (what, ef, el)
