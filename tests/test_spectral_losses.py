"""MMCR, EMP-SSL, W-MSE (and Whitening2d), FroSSL and TiCo against float64 references
written from the papers' formulas (nuclear norms from the eigenvalues of a Gram matrix,
log-determinants of the D x D matrix, whitening by an explicit inverse Cholesky factor,
D x D covariances), on the same rounded inputs.

Tolerance (``tol``): for 16-bit inputs fastssl computes in float32 and rounds the result
to the input dtype, so the error is one rounding of the output: 2 * eps (4 roundings of
margin). For float32 the error is the arithmetic's: 64 * eps. For float64 the reference
is no more exact than the code under test (its D x D matrices can be far worse
conditioned than fastssl's smaller side: cond ~1e5 for EMP-SSL at B = 3, D = 257), so
only gross errors show: 2**-30. A gradient that is zero in exact arithmetic (TiCo and
W-MSE with D = 1: the rows normalise to +-1) is measured against ``floor``, its natural
scale, instead of its float64 value (rounding noise).
"""
import pytest
import torch
import torch.nn.functional as tF

from fastssl._checks import ShapeError
from fastssl.losses.spectral import (EMPSSLLoss, FroSSLLoss, MMCRLoss, TiCoLoss, WMSELoss,
                                     Whitening2d, norm_mse_loss)
import _gloo

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)


def tol(dtype):
    eps = torch.finfo(dtype).eps
    if dtype == torch.float64:  # the reference is float64 too: only gross errors show
        return 2.0 ** -30
    return 2 * eps if dtype in HALF else 64 * eps


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def rel(x, ref, floor=2.2e-308):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(floor))


def check(ours_fn, ref_fn, inputs, dtype, what, floor=2.2e-308):
    """Loss and input gradients of ``ours_fn`` on ``inputs`` rounded to ``dtype`` against
    ``ref_fn`` in float64 on the same rounded values."""
    xs = [x.detach().to(dtype).requires_grad_() for x in inputs]
    loss = ours_fn(*xs)
    assert loss.dtype == dtype and loss.shape == (), (what, loss.dtype, loss.shape)
    grads = torch.autograd.grad(loss, xs)
    xr = [x.detach().double().requires_grad_() for x in xs]
    ref = ref_fn(*xr)
    ref_grads = torch.autograd.grad(ref, xr)
    for name, a, r in [("loss", loss, ref)] + [(f"grad[{i}]", g, gr) for i, (g, gr)
                                              in enumerate(zip(grads, ref_grads))]:
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite"
        assert a.dtype == dtype
        e = rel(a, r, floor if name != "loss" else 2.2e-308)
        assert e <= tol(dtype), f"{what} {name}: {e:.3g} from float64 (tol {tol(dtype):.3g})"


# ----------------------------------------------------------------------------- references

def nuclear(a):
    """sum of singular values = sum sqrt(eigenvalues of the smaller Gram matrix)."""
    g = a @ a.mT if a.shape[-2] <= a.shape[-1] else a.mT @ a
    return torch.linalg.eigvalsh(g).clamp_min(0).sqrt().sum(-1)


def ref_mmcr(online, momentum, lmda):
    z = torch.cat([online, momentum], 1)
    c = z.mean(1)
    return -nuclear(c) + lmda / z.shape[0] * nuclear(z).sum()


def ref_tcr(z, eps):
    """R(Z) = 1/2 logdet(I_D + D / (B eps) Z^T Z), the total coding rate, on the D x D side."""
    B, D = z.shape
    return 0.5 * torch.logdet(torch.eye(D, dtype=z.dtype) + D / (B * eps) * z.T @ z)


def ref_emp(zs, eps, lam):
    """EMP-SSL: maximise the mean coding rate, pull each view to the mean view (cosine)."""
    zbar = sum(zs) / len(zs)
    cos = [(z * zbar).sum(1) / (z.norm(dim=1) * zbar.norm(dim=1)) for z in zs]
    return -sum(ref_tcr(z, eps) for z in zs) / len(zs) - lam * torch.stack(cos).mean()


def ref_whiten(x, eps=0.0, mean=None, cov=None):
    """W = L^{-1} with L L^T = (1 - eps) S + eps I, applied to the centred rows."""
    mean = x.mean(0) if mean is None else mean
    xc = x - mean
    cov = xc.T @ xc / (x.shape[0] - 1) if cov is None else cov
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    w = torch.linalg.inv(torch.linalg.cholesky((1 - eps) * cov + eps * eye))
    return xc @ w.T


def ref_pair(a, b):
    return 2 - 2 * ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


def ref_wmse(x, S, perms, w_size, eps=0.0, pair=ref_pair):
    views = x.reshape(S, -1, x.shape[1])
    total = 0
    for perm in perms:
        z = []
        for v in views:
            zi = torch.zeros_like(v)
            for chunk in perm.view(-1, w_size):
                zi = zi.index_put((chunk,), ref_whiten(v[chunk], eps))
            z.append(zi)
        total = total + sum(pair(z[i], z[j]) for i in range(S) for j in range(i + 1, S))
    return total / (len(perms) * S * (S - 1) / 2)


def ref_frossl(zs, w):
    V, D = len(zs), zs[0].shape[1]
    Z = [z / z.norm(dim=0, keepdim=True) for z in zs]
    Zbar = sum(Z) / V
    reg = sum(torch.log((z.T @ z / torch.trace(z.T @ z)).square().sum()) for z in Z)
    inv = sum(V * D * (z - Zbar).square().mean() for z in Z)
    return reg + w * inv


def ref_tico(a, b, C_prev, beta, rho):
    a, b = tF.normalize(a, dim=1), tF.normalize(b, dim=1)
    C = beta * C_prev + (1 - beta) * (a.T @ a).detach() / a.shape[0]
    loss = 1 - (a * b).sum(1).mean() + rho * ((a @ C) * a).sum(1).mean()
    return loss, C.detach()


# ----------------------------------------------------------------------------- MMCR

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,k,D", [(3, 1, 5), (17, 2, 3), (3, 2, 257), (17, 1, 1)])
def test_mmcr(B, k, D, dtype):
    online = randn(B, k, D, seed=B + k + D)
    momentum = online + 0.5 * randn(B, k, D, seed=B + k + D + 1)
    check(MMCRLoss(lmda=0.3), lambda x, y: ref_mmcr(x, y, 0.3), [online, momentum], dtype,
          f"MMCRLoss {B, k, D}")


def test_mmcr_default_and_zero():
    """The default lmda, and lightly's rule: zero embeddings give exactly 0."""
    x, y = randn(4, 3, 6, seed=1), randn(4, 3, 6, seed=2)
    check(MMCRLoss(), lambda a, b: ref_mmcr(a, b, 5e-3), [x, y], torch.float32, "MMCRLoss()")
    assert MMCRLoss()(torch.zeros(3, 4, 8), torch.zeros(3, 4, 8)) == 0.0


# ----------------------------------------------------------------------------- EMP-SSL

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,B,D", [(2, 3, 5), (3, 17, 3), (2, 3, 257), (4, 17, 1)])
def test_emp_ssl(V, B, D, dtype):
    zs = [randn(B, D, seed=10 * V + B + D) + 0.7 * randn(B, D, seed=i) for i in range(V)]
    loss = EMPSSLLoss(tcr_eps=0.2, inv_coef=2.0)
    check(lambda *z: loss(list(z)), lambda *z: ref_emp(list(z), 0.2, 2.0), zs, dtype,
          f"EMPSSLLoss {V, B, D}")


def test_emp_ssl_maximises_the_coding_rate():
    """The paper's sign: with inv_coef = 0 the loss is -mean_v R(Z_v) (R > 0), written here
    a second way, from singular values: R = 1/2 sum_i log(1 + D / (B eps) sigma_i^2). Its
    gradient points towards shrinking the embeddings (a descent step grows them)."""
    zs = [randn(6, 4, seed=i) for i in range(3)]
    loss = EMPSSLLoss(tcr_eps=0.5, inv_coef=0.0)(zs)
    rates = [0.5 * torch.log1p(4 / (6 * 0.5) * torch.linalg.svdvals(z) ** 2).sum() for z in zs]
    expected = -sum(rates) / 3
    assert expected < 0 and abs(float(loss) - float(expected)) <= 1e-12 * abs(float(expected))
    z = [v.clone().requires_grad_() for v in zs]
    EMPSSLLoss(tcr_eps=0.5, inv_coef=0.0)(z).backward()
    assert all(float((g.grad * g.detach()).sum()) < 0 for g in z)  # d loss / d scale < 0
    check(lambda *v: EMPSSLLoss()(list(v)), lambda *v: ref_emp(list(v), 0.2, 200.0),
          zs, torch.float32, "EMPSSLLoss()")


# ----------------------------------------------------------------------------- W-MSE

WMSE_CASES = [  # embedding_dim, w_size, bs, num_samples, w_iter, eps
    (3, 6, 12, 2, 1, 0.0), (5, 11, 22, 3, 2, 0.1), (1, 3, 6, 3, 2, 0.0),
    (257, 514, 514, 2, 1, 0.0)]


def mse_pair(a, b):
    return (a - b).square().mean()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D,w,bs,S,iters,eps", WMSE_CASES)
def test_wmse(D, w, bs, S, iters, eps, dtype):
    """Sub-batches from a seeded generator; D = 1 with a plain MSE pair loss (the cosine of
    1-D rows is a sign, with zero gradient)."""
    if D == 257 and dtype in (torch.float16, torch.float64):
        pytest.skip("the largest case once per 16-bit and 32-bit arithmetic")
    x = randn(S * bs, D, seed=D + bs) + 0.5 * randn(1, D, seed=3)
    g = torch.Generator().manual_seed(5)
    perms = [torch.randperm(bs, generator=g) for _ in range(iters)]
    pair = mse_pair if D == 1 else ref_pair
    loss = WMSELoss(embedding_dim=D, w_size=w, num_samples=S, w_iter=iters, eps=eps,
                    loss_fn=mse_pair if D == 1 else norm_mse_loss,
                    generator=torch.Generator().manual_seed(5))
    check(loss, lambda v: ref_wmse(v, S, perms, w, eps, pair), [x], dtype,
          f"WMSELoss {D, w, bs, S, iters}")


def test_wmse_global_generator_and_running_stats():
    """Without ``generator`` the sub-batches are torch.randperm(bs) on the global generator
    (lightly's draws); the running statistics follow r <- m * batch + (1 - m) r once per
    sub-batch and sample (sub-batch major), over several steps; eval mode whitens with
    them."""
    D, w, bs, S, m = 3, 6, 12, 2, 0.3
    loss = WMSELoss(embedding_dim=D, w_size=w, num_samples=S, w_iter=2, momentum=m)
    mean, cov = torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    for step in range(3):
        x = randn(S * bs, D, seed=step) * 2 + 1
        torch.manual_seed(100 + step)
        perms = [torch.randperm(bs) for _ in range(2)]
        torch.manual_seed(100 + step)
        check(loss, lambda v: ref_wmse(v, S, perms, w), [x], torch.float32, f"step {step}")
        xv = x.float().double().reshape(S, bs, D)
        for perm in perms:
            for chunk in perm.view(-1, w):
                for v in xv:
                    c = v[chunk] - v[chunk].mean(0)
                    mean = m * v[chunk].mean(0) + (1 - m) * mean
                    cov = m * (c.T @ c / (w - 1)) + (1 - m) * cov
        assert rel(loss.whitening.running_mean.reshape(-1), mean) <= tol(torch.float32)
        assert rel(loss.whitening.running_variance, cov) <= tol(torch.float32)
    white = loss.whitening.eval()
    before = [white.running_mean.clone(), white.running_variance.clone()]
    x = randn(5, D, seed=9).float()
    y = white(x)
    stats = [white.running_mean.reshape(-1).double(), white.running_variance.double()]
    assert rel(y, ref_whiten(x.double(), mean=stats[0], cov=stats[1])) <= tol(torch.float32)
    assert torch.equal(white.running_mean, before[0])  # eval mode leaves them alone
    assert torch.equal(white.running_variance, before[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D,eps", [(3, 2, 0.0), (17, 5, 0.2), (400, 130, 0.0)])
def test_whitening2d(n, D, eps, dtype):
    """The whitened rows and the input gradient for a random output gradient against
    W = L^{-1}; the output covariance is the identity (for eps = 0). The features are
    mixed by a well-conditioned matrix: the float32 error grows with cond(S) (W-MSE's
    w_size >= 2 D keeps a sub-batch's S well conditioned; D = 257 runs in test_wmse)."""
    mix = torch.eye(D, dtype=torch.float64) + 0.3 * randn(D, D, seed=1) / D ** 0.5
    x = randn(n, D, seed=n) @ mix
    x = x.to(dtype).requires_grad_()
    weight = randn(n, D, seed=2).to(dtype)
    y = Whitening2d(D, eps=eps)(x)
    (gx,) = torch.autograd.grad(y, x, weight)
    xr = x.detach().double().requires_grad_()
    yr = ref_whiten(xr, eps)
    (gr,) = torch.autograd.grad(yr, xr, weight.double())
    assert y.dtype == gx.dtype == dtype
    assert rel(y, yr) <= tol(dtype) and rel(gx, gr) <= tol(dtype), (rel(y, yr), rel(gx, gr))
    if eps == 0 and dtype == torch.float64:
        torch.testing.assert_close(yr.T @ yr / (n - 1), torch.eye(D, dtype=torch.float64))
        torch.testing.assert_close(y.T @ y / (n - 1), torch.eye(D, dtype=torch.float64))


# ----------------------------------------------------------------------------- FroSSL

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("V,N,D", [(2, 3, 5), (3, 17, 3), (2, 3, 257), (3, 17, 1)])
def test_frossl(V, N, D, dtype):
    zs = [randn(N, D, seed=N + D) + 0.5 * randn(N, D, seed=50 + i) for i in range(V)]
    loss = FroSSLLoss(invariance_weight=0.7)
    check(lambda *z: loss(list(z)), lambda *z: ref_frossl(list(z), 0.7), zs, dtype,
          f"FroSSLLoss {V, N, D}")


# ----------------------------------------------------------------------------- TiCo

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,D", [(2, 3), (17, 5), (3, 257), (5, 1)])
def test_tico_over_steps(N, D, dtype):
    """Five steps, the third without updating C: loss, gradients and C against the
    float64 recurrence (C is kept in the arithmetic dtype, float32 for 16-bit inputs)."""
    loss = TiCoLoss(beta=0.8, rho=3.0)
    assert loss.C is None
    C = torch.zeros(D, D, dtype=torch.float64)
    for step in range(5):
        update = step != 2
        a = randn(N, D, seed=step)
        b = a + 0.4 * randn(N, D, seed=step + 10)
        C_prev = C
        check(lambda x, y: loss(x, y, update_covariance_matrix=update),
              lambda x, y: ref_tico(x, y, C_prev, 0.8, 3.0)[0], [a, b], dtype,
              f"TiCoLoss {N, D} step {step}", floor=1.0 if D == 1 else 2.2e-308)
        if update:
            C = ref_tico(a.to(dtype).double(), b.to(dtype).double(), C_prev, 0.8, 3.0)[1]
        assert loss.C.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert rel(loss.C, C) <= tol(loss.C.dtype), step


def test_tico_first_call_without_update_and_state_dict():
    """lightly's rule: the first call sets C to zeros even when it does not update it. C is
    a buffer: it follows .to() and round-trips through state_dict into a fresh module."""
    loss = TiCoLoss()
    a, b = randn(4, 6, seed=1).float(), randn(4, 6, seed=2).float()
    loss(a, b, update_covariance_matrix=False)
    assert torch.equal(loss.C, torch.zeros(6, 6))
    loss(a, b)
    fresh = TiCoLoss()
    fresh.load_state_dict(loss.state_dict())
    assert torch.equal(fresh.C, loss.C)
    torch.testing.assert_close(fresh(a, b), loss(a, b), rtol=0, atol=0)
    assert loss.double().C.dtype == torch.float64


def test_non_contiguous_inputs():
    x = randn(6, 3, 5, seed=1).float()
    y = randn(6, 3, 5, seed=2).float()
    xt, yt = x.transpose(0, 2).contiguous().transpose(0, 2), y[:, :, :]
    assert not xt.is_contiguous()
    assert torch.equal(MMCRLoss()(xt, yt), MMCRLoss()(x, y))
    a, b = randn(5, 8, seed=3).float(), randn(5, 8, seed=4).float()
    at = a.T.contiguous().T
    for make in (EMPSSLLoss, FroSSLLoss):
        torch.testing.assert_close(make()([at, b]), make()([a, b]), rtol=1e-6, atol=0)
    torch.testing.assert_close(TiCoLoss()(at, b), TiCoLoss()(a, b), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- errors

def r32(*shape):
    return torch.randn(*shape)


ERRORS = [
    (lambda: MMCRLoss(lmda=-1), ValueError, "lmda"),
    (lambda: MMCRLoss(lmda="a"), TypeError, "lmda"),
    (lambda: MMCRLoss()(r32(3, 2, 4), r32(3, 2, 5)), AssertionError, "shape"),
    (lambda: MMCRLoss()(r32(3, 4), r32(3, 4)), ShapeError, "online must be 3-D"),
    (lambda: MMCRLoss()(r32(3, 2, 4), r32(3, 2, 4).double()), ValueError, "dtype"),
    (lambda: EMPSSLLoss(tcr_eps=0.0), ValueError, "tcr_eps"),
    (lambda: EMPSSLLoss(inv_coef=None), TypeError, "inv_coef"),
    (lambda: EMPSSLLoss()([]), ValueError, "at least 1 view"),
    (lambda: EMPSSLLoss()(r32(2, 3, 4)), TypeError, "z_views"),
    (lambda: EMPSSLLoss()([r32(3, 4), r32(3, 5)]), RuntimeError, "z_views\\[1\\]"),
    (lambda: FroSSLLoss()([r32(8, 4)]), ValueError, "at least 2 views"),
    (lambda: FroSSLLoss(invariance_weight="x"), TypeError, "invariance_weight"),
    (lambda: FroSSLLoss()([r32(8, 4), r32(7, 4)]), RuntimeError, "shape"),
    (lambda: WMSELoss(embedding_dim=2, w_size=2), ValueError, "w_size"),
    (lambda: WMSELoss(w_iter=0), ValueError, "w_iter"),
    (lambda: WMSELoss(num_samples=1), ValueError, "num_samples"),
    (lambda: WMSELoss(momentum=2.0), ValueError, "momentum"),
    (lambda: WMSELoss(loss_fn=3), TypeError, "loss_fn"),
    (lambda: WMSELoss(embedding_dim=4, w_size=8, num_samples=3)(r32(25, 4)), RuntimeError,
     "num_samples"),
    (lambda: WMSELoss(embedding_dim=4, w_size=8)(r32(14, 4)), ValueError, "w_size"),
    (lambda: WMSELoss(embedding_dim=4, w_size=8)(r32(18, 4)), ValueError, "w_size"),
    (lambda: WMSELoss(embedding_dim=4, w_size=8)(r32(16, 5)), ValueError, "num_features"),
    (lambda: Whitening2d(0), ValueError, "num_features"),
    (lambda: Whitening2d(3, eps=-0.1), ValueError, "eps"),
    (lambda: Whitening2d(3)(r32(1, 3)), ValueError, "at least 2 rows"),
    (lambda: Whitening2d(3)(torch.ones(4, 3)), torch.linalg.LinAlgError, "positive definite"),
    (lambda: TiCoLoss(beta=1.5), ValueError, "beta"),
    (lambda: TiCoLoss(rho="x"), TypeError, "rho"),
    (lambda: TiCoLoss(gather_distributed=2), TypeError, "gather_distributed"),
    (lambda: TiCoLoss()(r32(1, 4), r32(1, 4)), AssertionError, "at least 2 rows"),
    (lambda: TiCoLoss()(r32(3, 4), r32(3, 5)), AssertionError, "shape"),
    (lambda: TiCoLoss()(r32(3, 4), r32(3, 4), update_covariance_matrix="no"), TypeError,
     "update_covariance_matrix"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_bad_arguments(i):
    call, kind, match = ERRORS[i]
    with pytest.raises(kind, match=match):
        call()


def test_tico_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        TiCoLoss(gather_distributed=True)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    TiCoLoss(gather_distributed=True)
    x = r32(3, 4)  # outside a process group: the local loss
    assert torch.equal(TiCoLoss(gather_distributed=True)(x, x), TiCoLoss()(x, x))


# ----------------------------------------------------------------------------- distributed

SIZES = [3, 1]  # rank 1 holds a single row: allowed when gathering (the global batch has 4)
D_DIST, STEPS = 5, 3


def dist_data(step):
    N = sum(SIZES)
    return randn(N, D_DIST, seed=step), randn(N, D_DIST, seed=step + 100)


def tico_worker(rank, world):
    o, n = sum(SIZES[:rank]), SIZES[rank]
    loss_fn = TiCoLoss(beta=0.7, gather_distributed=True)
    results = []
    for step in range(STEPS):
        A, B = dist_data(step)
        a = A[o:o + n].clone().requires_grad_()
        b = B[o:o + n].clone().requires_grad_()
        loss = loss_fn(a, b)
        results.append((loss.detach(), *torch.autograd.grad(loss, [a, b]),
                        loss_fn.C.clone()))
    return results


def test_tico_gather_distributed_two_processes():
    """2 gloo ranks, gather_distributed=True, three steps: every rank's loss and C are the
    single-process ones on the global batch; a rank's input gradients are world_size times
    the global loss's (the sum convention of fastssl.distributed, as lightly's gather)."""
    world = len(SIZES)
    results = _gloo.run(tico_worker, world, timeout=60, what="distributed TiCo",
                        group_timeout=30)
    C = torch.zeros(D_DIST, D_DIST, dtype=torch.float64)
    for step in range(STEPS):
        A, B = [t.requires_grad_() for t in dist_data(step)]
        ref, C = ref_tico(A, B, C, 0.7, 8.0)
        dA, dB = torch.autograd.grad(ref, [A, B])
        for r in range(world):
            o, n = sum(SIZES[:r]), SIZES[r]
            loss, da, db, C_r = results[r][step]
            assert rel(loss, ref) <= 1e-13 and rel(C_r, C) <= 1e-13, (r, step)
            assert rel(da, world * dA[o:o + n]) <= 1e-13, (r, step)
            assert rel(db, world * dB[o:o + n]) <= 1e-13, (r, step)
