"""Barlow Twins, VICReg and negative cosine similarity against float64 references written
with the textbook D x D formulas (cross-correlation and covariance matrices)."""
import pytest
import torch
import torch.nn.functional as tF

import fastssl
from fastssl import _ops

from test_infonce import DTYPES, grads_of, leaf

# Both sides of N = D, D = 1, N = 2.
SHAPES = [(2, 1), (2, 5), (7, 3), (5, 40), (40, 5), (33, 130), (130, 33)]


def ref_barlow(z_a, z_b, lam, views_out=None):
    a = tF.batch_norm(z_a.double(), None, None, training=True, eps=1e-5)
    b = tF.batch_norm(z_b.double(), None, None, training=True, eps=1e-5)
    if views_out is not None:
        views_out += [a, b]
    c = a.T @ b / z_a.shape[0]
    eye = torch.eye(c.shape[0], dtype=torch.float64, device=c.device)
    w = eye + lam * (1 - eye)
    return (w * (c - eye) ** 2).sum()


def gradient_scale(z, a, d_a):
    """The size of a gradient before the standardisation's projection: ||dL/dA|| / min std.
    Errors are measured against it where the projection cancels most of dL/dA (N = 2)."""
    return (d_a.norm() / z.double().std(0, unbiased=False).clamp_min(1e-12).min()).item()


def ref_vicreg(z_a, z_b, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    z_a, z_b = z_a.double(), z_b.double()
    inv = ((z_a - z_b) ** 2).mean()

    def var(z):
        return torch.relu(1 - torch.sqrt(z.var(0) + eps)).mean()

    def cov(z):
        z = z - z.mean(0)
        N, D = z.shape[0], z.shape[-1]
        c = torch.einsum("n...i,n...j->...ij", z, z) / (N - 1)
        off = c * (1 - torch.eye(D, dtype=c.dtype, device=c.device))
        return ((off ** 2).sum((-1, -2)) / D).mean()

    return lam * inv + mu * (var(z_a) + var(z_b)) / 2 + nu * (cov(z_a) + cov(z_b))


def views(N, D, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5 + torch.eye(D)
    base = torch.randn(N, D, generator=g, dtype=torch.float64) @ mix
    a = base + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    b = base + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)
    return (a.to(device, dtype).requires_grad_(), b.to(device, dtype).requires_grad_())


@pytest.mark.parametrize("formulation", ["gram", "dxd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D", SHAPES)
def test_barlow_twins(backend, device, formulation, dtype, N, D):
    z_a, z_b = views(N, D, dtype, device, seed=N * 100 + D)
    loss = fastssl.functional.barlow_twins(z_a, z_b, 5e-3, formulation=formulation)
    assert loss.dtype == dtype
    got = grads_of(loss, [z_a, z_b])
    ra, rb = leaf(z_a), leaf(z_b)
    std_views = []
    ref = ref_barlow(ra, rb, 5e-3, std_views)
    want = grads_of(ref, [ra, rb, *std_views])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    # Each of the D diagonal terms is O(1): D is the loss's natural scale (a loss far below
    # it, e.g. N = 2 where standardised features are +-1, is pure cancellation).
    err = ((loss.double() - ref).abs() / max(ref.abs().item(), 1e-2 * D)).item()
    assert err <= tol, f"loss error {err:.3g}"
    for name, z, g, w, d_std in zip(["z_a", "z_b"], [ra, rb], got, want[:2], want[2:]):
        scale = max(w.norm().item(), gradient_scale(z, None, d_std) if N == 2 else 0.0)
        e = (g.double() - w).norm().item() / scale
        assert e <= (1e-5 if dtype == torch.float32 else 1e-2), f"d{name}: {e:.3g}"


@pytest.mark.parametrize("formulation", ["gram", "dxd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D", SHAPES)
def test_vicreg(backend, device, formulation, dtype, N, D):
    z_a, z_b = views(N, D, dtype, device, seed=N * 100 + D + 1)
    loss = fastssl.functional.vicreg(z_a, z_b, formulation=formulation)
    got = grads_of(loss, [z_a, z_b])
    ra, rb = leaf(z_a), leaf(z_b)
    ref = ref_vicreg(ra, rb)
    want = grads_of(ref, [ra, rb])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = ((loss.double() - ref).abs() / ref.abs()).item()
    assert err <= tol, f"loss error {err:.3g}"
    for name, g, w in zip(["z_a", "z_b"], got, want):
        e = ((g.double() - w).norm() / w.norm()).item()
        assert e <= (1e-5 if dtype == torch.float32 else 1e-2), f"d{name}: {e:.3g}"


def test_vicreg_three_dimensional_inputs(backend, device):
    z_a, z_b = views(9, 12, torch.float32, device, seed=3)
    z_a = z_a.detach().reshape(9, 3, 4).requires_grad_()
    z_b = z_b.detach().reshape(9, 3, 4).requires_grad_()
    loss = fastssl.VICRegLoss()(z_a, z_b)
    ref = ref_vicreg(leaf(z_a), leaf(z_b))
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_barlow_affine_invariance(backend, device):
    z = views(16, 6, torch.float32, device, seed=1)[0].detach()
    loss = fastssl.BarlowTwinsLoss()
    assert abs(loss(z, z).item() - loss(z, 2 * z + 4).item()) <= 1e-4 * abs(loss(z, z).item()) + 1e-6


def test_constant_feature_is_finite(backend, device):
    z_a, z_b = views(8, 5, torch.float32, device, seed=2)
    z_a = z_a.detach().clone()
    z_a[:, 2] = 3.0
    z_a.requires_grad_()
    for loss in (fastssl.barlow_twins(z_a, z_b), fastssl.vicreg(z_a, z_b)):
        (g,) = grads_of(loss, [z_a])
        assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_formulations_agree_and_auto_picks_by_shape(monkeypatch):
    calls = []
    real = _ops.gram_inner
    monkeypatch.setattr(_ops, "gram_inner", lambda a, b: calls.append(a.shape) or real(a, b))
    wide = views(8, 64, torch.float32, "cpu", seed=1)
    tall = views(64, 8, torch.float32, "cpu", seed=2)
    fastssl.barlow_twins(*wide)
    assert calls == [(8, 64)]          # N < D: Gram formulation
    fastssl.barlow_twins(*tall)
    assert calls == [(8, 64)]          # N > D: D x D formulation
    a = fastssl.barlow_twins(*wide, formulation="gram")
    b = fastssl.barlow_twins(*wide, formulation="dxd")
    assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())


def test_negative_cosine_similarity():
    x0, x1 = torch.randn(6, 5), torch.randn(6, 5)
    want = -tF.cosine_similarity(x0.double(), x1.double(), dim=1).mean()
    got = fastssl.NegativeCosineSimilarity()(x0, x1)
    assert abs(got.item() - want.item()) <= 1e-6
    x0, x1 = torch.randn(4, 3, 7), torch.randn(4, 3, 7)
    assert abs(fastssl.negative_cosine_similarity(x0, x1, dim=2).item()
               + tF.cosine_similarity(x0, x1, dim=2).mean().item()) <= 1e-6


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        fastssl.barlow_twins(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        fastssl.vicreg(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="shape"):
        fastssl.barlow_twins(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="floating"):
        fastssl.vicreg(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="formulation"):
        fastssl.BarlowTwinsLoss(formulation="fft")
    with pytest.raises(ValueError, match="normalize"):
        fastssl.BarlowTwinsLoss(normalize="batch")
    with pytest.raises(ValueError, match="shape"):
        fastssl.negative_cosine_similarity(torch.randn(3, 4), torch.randn(3, 5))


@pytest.mark.parametrize("same", [False, True])
def test_opcheck_gram(backend, device, same):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 20, generator=g).to(device).requires_grad_()
    b = a if same else torch.randn(37, 20, generator=g).to(device).requires_grad_()
    torch.library.opcheck(_ops.gram_inner.custom, (a, b))
    torch.library.opcheck(_ops.gram_apply.custom, (a.detach(), b.detach()))


@pytest.mark.parametrize("name", ["barlow", "vicreg"])
def test_compile_fullgraph(backend, device, name):
    torch._dynamo.reset()
    from test_ops import _step
    fn = fastssl.BarlowTwinsLoss(formulation="gram") if name == "barlow" \
        else fastssl.VICRegLoss(formulation="gram")
    _step(fn, "aot_eager", device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D", [(2, 1), (3, 70), (130, 5), (257, 129)])
def test_fused_standardize(backend, device, dtype, N, D):
    g = torch.Generator().manual_seed(N * 7 + D)
    base = (torch.randn(N, 2 * D, generator=g, dtype=torch.float64) * 3 + 5)
    z = base.to(device, dtype)[:, ::2].requires_grad_()       # non-contiguous, large mean
    a, stats = _ops.standardize(z, 1e-5)
    up = torch.randn(N, D, generator=g, dtype=torch.float64)
    (dz,) = torch.autograd.grad(a, [z], up.float().to(device))
    rz = z.detach().double().requires_grad_()
    ra = tF.batch_norm(rz, None, None, training=True, eps=1e-5)
    (want,) = torch.autograd.grad(ra, [rz], up)
    assert a.dtype == torch.float32 and stats.shape == (2, D)
    torch.testing.assert_close(stats[0].double(), rz.detach().mean(0), rtol=1e-6, atol=1e-6)
    assert ((a.double() - ra).norm() / ra.norm()).item() <= 1e-6
    assert dz.dtype == dtype
    # N = 2 standardises each feature to +-1: measure against the upstream gradient's size.
    scale = max(want.norm().item(), up.norm().item() / rz.detach().std(0).min().item()
                if N == 2 else 0.0)
    assert ((dz.double() - want).norm() / scale).item() <= (1e-5 if dtype == torch.float32
                                                            else 1e-2)


def test_opcheck_standardize(backend, device):
    z = torch.randn(19, 11, device=device, requires_grad=True)
    torch.library.opcheck(_ops.standardize.custom, (z, 1e-5))
    a, stats = _ops.standardize(z.detach(), 1e-5)
    torch.library.opcheck(_ops.standardize_backward.custom,
                          (z.detach(), torch.randn_like(a), stats, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,D", [(200, 300), (300, 200), (129, 129)])
def test_gram_apply_both_ways_as_close_as_eager(backend, N, D, dtype, device):
    """(W W^T) X on both paths: the Triton kernels (interpreted on CPU) through the N x N
    Gram matrix written once for N <= D and tile by tile for N > D, several row and column
    blocks either way; the portable row blocks. Against float64 on the same rounded inputs,
    at most twice the error of the eager (W W^T) X in dtype plus four float32 roundings."""
    from fastssl import _ops
    g = torch.Generator().manual_seed(N + D)
    w = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    want = (w.double() @ w.double().T) @ x.double()
    eager = ((w @ w.T) @ x).double()
    got = _ops.gram_apply(w.to(device), x.to(device)).double().cpu()
    err, err_eager = float((got - want).norm()), float((eager - want).norm())
    assert err <= 2 * err_eager + 4 * 2.0 ** -24 * float(want.norm()), (err, err_eager)
