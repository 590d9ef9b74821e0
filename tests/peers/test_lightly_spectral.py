"""fastssl's spectral / covariance losses (``fastssl.losses.spectral``) against lightly 1.6.0's
MMCRLoss, EMPSSLLoss, WMSELoss, Whitening2d, FroSSLLoss and TiCoLoss: values and gradients
at least as close to the float64 formula as lightly's own (the precision rule of
``test_lightly.py``: fastssl's rms relative error over a few draws at most twice lightly's
plus four float32 roundings), the same state over several steps (TiCo's C, W-MSE's running
statistics, with the same seeded sub-batches), the same exception types on lightly's
documented errors, and the one deliberate difference: EMP-SSL's coding-rate term has the
paper's sign (lightly adds +1/2 logdet, fastssl -1/2 logdet).
"""
import pytest
import torch

from ._peers import need
from .test_lightly import DTYPES, Sweep, compare, raised, randn

lightly = need("lightly")
from lightly.loss import (EMPSSLLoss, FroSSLLoss, MMCRLoss, TiCoLoss,  # noqa: E402
                          Whitening2d, WMSELoss)
from lightly.loss.emp_ssl_loss import invariance_loss as lightly_invariance  # noqa: E402
from lightly.loss.emp_ssl_loss import tcr_loss as lightly_tcr  # noqa: E402

from fastssl.losses import spectral  # noqa: E402
from test_spectral_losses import (ref_emp, ref_frossl, ref_mmcr, ref_tico,  # noqa: E402
                                  ref_whiten, ref_wmse)

SEEDS = range(3)


# ----------------------------------------------------------------------------- MMCR

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,k,D,lmda", [(3, 1, 5, 5e-3), (4, 2, 7, 0.5), (16, 4, 64, 0.1),
                                        (3, 32, 128, 5e-3)])
def test_mmcr(B, k, D, lmda, dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        online = randn(B, k, D, seed=s)
        momentum = online + 0.5 * randn(B, k, D, seed=s + 10)
        compare("MMCRLoss", spectral.MMCRLoss(lmda), MMCRLoss(lmda),
                lambda x, y: ref_mmcr(x, y, lmda), [online, momentum], dtype, sweep=sweep)
    sweep.check()


# ----------------------------------------------------------------------------- EMP-SSL

def lightly_emp_flipped(tcr_eps, inv_coef):
    """lightly's EMP-SSL with the sign of its coding-rate term flipped (the paper's loss),
    from lightly's own ``tcr_loss`` and ``invariance_loss``."""
    def loss(*views):
        z = torch.stack(views)
        return -lightly_tcr(z, eps=tcr_eps) + inv_coef * lightly_invariance(z)
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,B,D,inv_coef", [(2, 3, 5, 200.0), (4, 17, 3, 2.0),
                                            (3, 8, 64, 0.5), (2, 64, 8, 200.0)])
def test_emp_ssl_is_lightly_with_the_coding_rate_sign_flipped(V, B, D, inv_coef, dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        zs = [randn(B, D, seed=s) + 0.7 * randn(B, D, seed=20 + i + s) for i in range(V)]
        ours = spectral.EMPSSLLoss(0.2, inv_coef)
        lo, _ = compare("EMPSSLLoss", lambda *z: ours(list(z)),
                         lightly_emp_flipped(0.2, inv_coef),
                         lambda *z: ref_emp(list(z), 0.2, inv_coef), zs, dtype, sweep=sweep)
        # The difference, explicitly: lightly's loss is fastssl's + 2 * (1/2 mean logdet).
        z = [v.to(dtype) for v in zs]
        theirs = EMPSSLLoss(0.2, inv_coef)(z)
        tcr = lightly_tcr(torch.stack(z), eps=0.2)
        assert tcr > 0
        torch.testing.assert_close(theirs - lo, 2 * tcr, rtol=1e-4 if dtype == torch.float32
                                   else 1e-10, atol=0)
    sweep.check()


# ----------------------------------------------------------------------------- W-MSE

def seeded(loss, seed):
    """The loss called right after ``torch.manual_seed(seed)``: W-MSE's sub-batches come
    from torch.randperm on the global generator (both libraries)."""
    def call(x):
        torch.manual_seed(seed)
        return loss(x)
    return call


def ref_running(x, S, perms, w, m, mean, cov):
    """The running statistics' float64 recurrence, sub-batch major, sample minor."""
    views = x.double().reshape(S, -1, x.shape[1])
    for perm in perms:
        for chunk in perm.view(-1, w):
            for v in views:
                c = v[chunk] - v[chunk].mean(0)
                mean = m * v[chunk].mean(0) + (1 - m) * mean
                cov = m * (c.T @ c / (w - 1)) + (1 - m) * cov
    return mean, cov


WMSE_CASES = [  # embedding_dim, w_size, bs, num_samples, w_iter, eps, momentum
    (3, 6, 12, 3, 2, 0.1, 0.3), (5, 11, 22, 2, 1, 0.0, 0.01), (128, 256, 256, 2, 1, 0.0, 0.01)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D,w,bs,S,iters,eps,m", WMSE_CASES)
def test_wmse_over_steps(D, w, bs, S, iters, eps, m, dtype):
    """Three steps from the same seeds: loss, gradients and running statistics; then eval
    mode (whitening by the running statistics)."""
    kw = dict(embedding_dim=D, w_size=w, num_samples=S, w_iter=iters, eps=eps, momentum=m)
    ours, theirs = spectral.WMSELoss(**kw), WMSELoss(**kw)
    mean, cov = torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    sweep = Sweep(dtype)
    for step in range(3):
        x = randn(S * bs, D, seed=step) * 2 + 1
        torch.manual_seed(step)
        perms = [torch.randperm(bs) for _ in range(iters)]
        compare("WMSELoss", seeded(ours, step), seeded(theirs, step),
                lambda v: ref_wmse(v, S, perms, w, eps), [x], dtype, sweep=sweep)
        mean, cov = ref_running(x.to(dtype), S, perms, w, m, mean, cov)
        sweep.add("running_mean", ours.whitening.running_mean,
                  theirs.whitening.running_mean, mean.reshape(1, D, 1, 1))
        sweep.add("running_variance", ours.whitening.running_variance,
                  theirs.whitening.running_variance, cov)
    sweep.check()
    ours.eval(), theirs.eval()
    stats = [theirs.whitening.running_mean.reshape(-1).double(),
             theirs.whitening.running_variance.double()]
    sweep = Sweep(dtype)
    for s in SEEDS:
        x = randn(7, D, seed=9 + s).to(dtype)
        ref = ref_whiten(x.double(), eps, mean=stats[0], cov=stats[1])
        sweep.add("Whitening2d (eval)", ours.whitening(x), theirs.whitening(x), ref)
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,D,eps", [(3, 2, 0.0), (17, 5, 0.2), (64, 16, 0.0)])
def test_whitening2d(n, D, eps, dtype):
    """Output (through a float64 weighted sum, so that the input gradient is checked too)."""
    sweep = Sweep(dtype)
    for s in SEEDS:
        x = randn(n, D, seed=s) @ (torch.eye(D, dtype=torch.float64) + 0.3 * randn(D, D,
                                                                             seed=s + 1))
        weight = randn(n, D, seed=s + 2)
        compare("Whitening2d", lambda v: (spectral.Whitening2d(D, eps=eps)(v).double()
                                          * weight).sum(),
                lambda v: (Whitening2d(D, eps=eps)(v).double() * weight).sum(),
                lambda v: (ref_whiten(v, eps) * weight).sum(), [x], dtype, sweep=sweep)
    sweep.check()


# ----------------------------------------------------------------------------- FroSSL

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,N,D,w", [(4, 8, 32, 1.0), (2, 17, 3, 0.5), (3, 4, 64, 0.0),
                                     (2, 33, 33, 1.0)])
def test_frossl(V, N, D, w, dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        zs = [randn(N, D, seed=s) + 0.5 * randn(N, D, seed=30 + i + s) for i in range(V)]
        ours, theirs = spectral.FroSSLLoss(w), FroSSLLoss(w)
        compare("FroSSLLoss", lambda *z: ours(list(z)), lambda *z: theirs(list(z)),
                lambda *z: ref_frossl(list(z), w), zs, dtype, sweep=sweep)
    sweep.check()


# ----------------------------------------------------------------------------- TiCo

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,D,beta,rho", [(2, 3, 0.9, 8.0), (17, 5, 0.5, 2.0),
                                          (3, 256, 0.9, 8.0), (64, 32, 0.99, 8.0)])
def test_tico_over_steps(N, D, beta, rho, dtype):
    """Five steps, the first and the fourth without updating C: loss, gradients and C."""
    ours, theirs = spectral.TiCoLoss(beta, rho), TiCoLoss(beta, rho)
    C = torch.zeros(D, D, dtype=torch.float64)
    sweep = Sweep(dtype)
    for step in range(5):
        update = step not in (0, 3)
        a = randn(N, D, seed=step)
        b = a + 0.4 * randn(N, D, seed=step + 10)
        C_prev = C
        compare("TiCoLoss", lambda x, y: ours(x, y, update_covariance_matrix=update),
                lambda x, y: theirs(x, y, update_covariance_matrix=update),
                lambda x, y: ref_tico(x, y, C_prev, beta, rho)[0], [a, b], dtype, sweep=sweep)
        if update:
            C = ref_tico(a.to(dtype).double(), b.to(dtype).double(), C_prev, beta, rho)[1]
        if step == 0:
            assert torch.equal(ours.C, theirs.C)  # zeros, set by the first call
        else:
            sweep.add("TiCoLoss C", ours.C, theirs.C, C)
    sweep.check()


# ----------------------------------------------------------------------------- errors

def r32(*shape):
    return torch.randn(*shape)


ERRORS = {
    "MMCRLoss lmda < 0": lambda L: L.MMCRLoss(lmda=-1),
    "MMCRLoss shapes differ": lambda L: L.MMCRLoss()(r32(3, 4, 8), r32(3, 4, 9)),
    "EMPSSLLoss views of different shapes": lambda L: L.EMPSSLLoss()([r32(4, 8), r32(4, 6)]),
    "EMPSSLLoss no views": lambda L: L.EMPSSLLoss()([]),
    "WMSELoss w_size < 2 embedding_dim": lambda L: L.WMSELoss(embedding_dim=2, w_size=2),
    "WMSELoss batch not divisible by num_samples": lambda L: L.WMSELoss(num_samples=3)(
        r32(5, 128)),
    "WMSELoss batch < w_size": lambda L: L.WMSELoss(w_size=5)(r32(4, 128)),
    "WMSELoss batch not a multiple of w_size": lambda L: L.WMSELoss(
        embedding_dim=4, w_size=8)(r32(18, 4)),
    "WMSELoss wrong width": lambda L: L.WMSELoss(embedding_dim=4, w_size=8)(r32(16, 5)),
    "FroSSLLoss one view": lambda L: L.FroSSLLoss()([r32(8, 32)]),
    "FroSSLLoss views of different shapes": lambda L: L.FroSSLLoss()([r32(8, 4), r32(7, 4)]),
    "TiCoLoss batch 1": lambda L: L.TiCoLoss()(r32(1, 256), r32(1, 256)),
    "TiCoLoss shapes differ": lambda L: L.TiCoLoss()(r32(2, 32), r32(2, 16)),
    "Whitening2d singular covariance": lambda L: L.Whitening2d(3)(torch.ones(4, 3)),
}


class _Lightly:
    MMCRLoss, EMPSSLLoss, WMSELoss, FroSSLLoss = MMCRLoss, EMPSSLLoss, WMSELoss, FroSSLLoss
    TiCoLoss, Whitening2d = TiCoLoss, Whitening2d


@pytest.mark.parametrize("case", list(ERRORS))
def test_same_exception_types_as_lightly(case):
    theirs = raised(lambda: ERRORS[case](_Lightly))
    assert theirs is not None, f"{case}: lightly raised nothing (the case is wrong)"
    ours = raised(lambda: ERRORS[case](spectral))
    assert ours is not None, f"{case}: lightly raises {type(theirs).__name__}, fastssl nothing"
    assert isinstance(ours, type(theirs)), \
        f"{case}: lightly raises {type(theirs).__name__}, fastssl {type(ours).__name__}: {ours}"


def test_tico_gather_distributed_without_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    assert isinstance(raised(lambda: TiCoLoss(gather_distributed=True)), ValueError)
    assert isinstance(raised(lambda: spectral.TiCoLoss(gather_distributed=True)), ValueError)


def test_signatures_match_lightly():
    """The same parameter names, order and defaults (fastssl's keyword-only additions
    aside)."""
    import inspect
    for name in ("MMCRLoss", "EMPSSLLoss", "WMSELoss", "Whitening2d", "FroSSLLoss",
                 "TiCoLoss"):
        for method in ("__init__", "forward"):
            ours = inspect.signature(getattr(getattr(spectral, name), method)).parameters
            theirs = inspect.signature(getattr(getattr(_Lightly, name), method)).parameters
            assert [described(p) for p in ours.values() if p.kind != p.KEYWORD_ONLY] == \
                [described(p) for p in theirs.values()], (name, method)


def described(p):
    """(name, default); a function default (W-MSE's loss_fn) by its name."""
    return p.name, (p.default.__name__ if callable(p.default) else p.default)
