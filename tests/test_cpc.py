"""CPC (fastssl.cpc) against the dense float64 formulation (every step's rows x rows logits
materialised), 1-D signals and image grids, both paths."""
import pytest
import torch
import torch.nn.functional as tF

import fastssl
from fastssl import ShapeError
from fastssl.cpc import CPCLoss, cpc_loss


def dense(context, latents, weights, temperature=1.0):
    T = latents.shape[1]
    out = []
    for k, w in enumerate(weights, start=1):
        p = context[:, :T - k].reshape(-1, context.shape[-1]) @ w.T
        z = latents[:, k:].reshape(-1, latents.shape[-1])
        logits = p @ z.T / temperature
        out.append(tF.cross_entropy(logits, torch.arange(len(p))))
    return torch.stack(out).mean()


@pytest.mark.parametrize("shape", [(1, 2), (3, 7), (2, 5, 4)])  # (B, T) signals, (B, H, W) grids
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_cpc_matches_the_dense_logits(backend, device, shape, dtype, temperature):
    g = torch.Generator().manual_seed(sum(shape))
    C, D = 6, 5
    K = min(3, shape[1] - 1)
    c = torch.randn(*shape, C, generator=g, dtype=torch.float64)
    z = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    W = torch.randn(K, D, C, generator=g, dtype=torch.float64) / C ** 0.5
    leaves = [t.to(device, dtype).requires_grad_() for t in (c, z, W)]
    loss = cpc_loss(*leaves, temperature=temperature)
    grads = torch.autograd.grad(loss, leaves)
    ref_in = [t.detach().double().cpu().requires_grad_() for t in leaves]
    ref = dense(*ref_in, temperature)
    ref_grads = torch.autograd.grad(ref, ref_in)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert loss.dtype == dtype
    assert abs(loss.double().item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    for gr, r in zip(grads, ref_grads):
        assert (gr.double().cpu() - r).norm() <= tol * max(r.norm().item(), 1e-3)


def test_module_and_list_of_predictors_agree():
    torch.manual_seed(0)
    crit = CPCLoss(6, 4, steps=2)
    c, z = torch.randn(2, 6, 6), torch.randn(2, 6, 4)
    w = torch.stack([p.weight for p in crit.predictors])
    torch.testing.assert_close(crit(c, z), cpc_loss(c, z, w))
    torch.testing.assert_close(crit(c, z), dense(c.double(), z.double(), w.double()).float())
    assert fastssl.cpc_loss is cpc_loss


def test_bad_arguments_are_clear_errors():
    c, z, w = torch.randn(2, 4, 3), torch.randn(2, 4, 5), torch.randn(2, 5, 3)
    with pytest.raises(ShapeError, match="share every axis"):
        cpc_loss(c, z[:, :3], w)
    with pytest.raises(ShapeError, match="predictor weights"):
        cpc_loss(c, z, torch.randn(2, 3, 3))
    with pytest.raises(ValueError, match="longer than"):
        cpc_loss(c, z, torch.randn(4, 5, 3))
    with pytest.raises(ValueError, match="only 2 predictors"):
        cpc_loss(c, z, w, steps=3)
    with pytest.raises(TypeError, match="callables"):
        cpc_loss(c, z, [])
    with pytest.raises(ShapeError, match="gave shape"):
        cpc_loss(c, z, [lambda x: x])
    with pytest.raises(ShapeError, match="features"):
        cpc_loss(c[0], z[0], w)
