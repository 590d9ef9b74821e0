"""fastssl's MSN losses (``fastssl.losses.msn``) against lightly 1.6.0's MSNLoss, PMSNLoss,
PMSNCustomLoss and its helpers (``prototype_probabilities``, ``sharpen``, ``sinkhorn``,
``_power_law_distribution``): values and gradients at least as close to the float64 formula
as lightly's own (the precision rule of ``test_lightly.py``), the same exception types on
lightly's documented errors, and the differences: at a small temperature lightly's product
form divides 0 by 0 (NaN) where fastssl's log domain stays finite; ``me_max_weight`` (the
keyword lightly 1.6.0 removed) is still accepted.
"""
import math
import warnings

import pytest
import torch

from ._peers import need
from .test_lightly import DTYPES, Sweep, as_close, compare, raised, randn

lightly = need("lightly")
from lightly.loss import msn_loss as lightly_msn  # noqa: E402
from lightly.loss import pmsn_loss as lightly_pmsn  # noqa: E402
from lightly.loss.msn_loss import MSNLoss  # noqa: E402
from lightly.loss.pmsn_loss import PMSNCustomLoss, PMSNLoss  # noqa: E402

from fastssl.losses import msn  # noqa: E402
from test_msn_losses import (ref_msn, ref_prior, ref_reg, ref_sharpen,  # noqa: E402
                             ref_sinkhorn, tilted, uniform)

SEEDS = range(3)


def quiet(fn):
    """lightly's ``_power_law_distribution`` warns (torch.tensor of a tensor) on each call."""
    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return fn(*args, **kwargs)
    return call


def pair(kind, arg, **kw):
    """(fastssl's module, lightly's) for one kind of regulariser."""
    if kind == "msn":
        return msn.MSNLoss(**kw), MSNLoss(**kw)
    if kind == "power":
        return msn.PMSNLoss(power_law_exponent=arg, **kw), PMSNLoss(power_law_exponent=arg, **kw)
    return msn.PMSNCustomLoss(arg, **kw), PMSNCustomLoss(arg, **kw)


CASES = [  # V, B, K, D, temperature, sharpen T, iterations, lambda
    (1, 4, 8, 6, 0.1, 0.25, 3, 1.0), (3, 5, 16, 3, 0.1, 0.25, 0, 1.0),
    (2, 7, 33, 257, 0.2, 0.5, 1, 0.5), (4, 16, 64, 32, 0.1, 0.25, 5, 2.0),
    (2, 8, 1024, 16, 0.1, 0.25, 3, 1.0), (2, 3, 5, 4, 0.5, 1.5, 2, 0.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,arg", [("msn", None), ("power", 0.25), ("power", 1.0),
                                      ("custom", uniform), ("custom", tilted)])
@pytest.mark.parametrize("V,B,K,D,tau,T,iterations,lam", CASES)
def test_losses(V, B, K, D, tau, T, iterations, lam, kind, arg, dtype):
    ours, theirs = pair(kind, arg, temperature=tau, sinkhorn_iterations=iterations,
                        regularization_weight=lam)
    sweep = Sweep(dtype)
    for s in SEEDS:
        seed = s + 10 * (V + B + K + D)
        inputs = [randn(V * B, D, seed=seed), randn(B, D, seed=seed + 1),
                  randn(K, D, seed=seed + 2)]
        compare(f"{type(ours).__name__}", lambda a, t, c: ours(a, t, c, T),
                quiet(lambda a, t, c: theirs(a, t, c, T)),
                lambda a, t, c: ref_msn(a, t, c, tau, T, iterations, lam, kind, arg), inputs,
                dtype, wrt=[0, 2], sweep=sweep)
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_helper_functions(dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        g = torch.Generator().manual_seed(s)
        p = torch.rand(9, 13, generator=g, dtype=torch.float64).to(dtype)
        for it in (1, 3):
            sweep.add(f"sinkhorn({it})", msn.sinkhorn(p, it), lightly_msn.sinkhorn(p, it),
                      ref_sinkhorn(p.double(), it))
        for T in (0.25, 0.7):
            sweep.add(f"sharpen({T})", msn.sharpen(p, T), lightly_msn.sharpen(p.clone(), T),
                      ref_sharpen(p.double(), T))
        q, c = randn(9, 5, seed=s).to(dtype), randn(13, 5, seed=s + 1).to(dtype)
        sweep.add("prototype_probabilities", msn.prototype_probabilities(q, c, 0.2),
                  lightly_msn.prototype_probabilities(q, c, 0.2),
                  torch.softmax(q.double() @ c.double().T / 0.2, 1))
    sweep.check()
    p = torch.rand(4, 6, dtype=dtype)
    assert msn.sinkhorn(p, 0) is p and torch.equal(lightly_msn.sinkhorn(p, 0), p)


@pytest.mark.parametrize("K,exponent", [(1, 0.25), (4, 0.5), (1000, 0.25), (7, 2.0)])
def test_power_law_distribution(K, exponent):
    ours = msn.power_law_distribution(K, exponent, torch.device("cpu"))
    theirs = quiet(lightly_pmsn._power_law_distribution)(K, exponent, torch.device("cpu"))
    assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    as_close("power_law_distribution", ours, theirs, ref_prior(K, exponent), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_regularization_loss(dtype):
    g = torch.Generator().manual_seed(5)
    pbar = torch.softmax(torch.randn(17, generator=g, dtype=torch.float64), 0).to(dtype)
    for kind, arg in (("msn", None), ("power", 0.25), ("custom", uniform)):
        ours, theirs = pair(kind, arg)
        got = ours.regularization_loss(pbar)
        want = quiet(theirs.regularization_loss)(pbar)
        assert got.dtype == want.dtype == dtype
        as_close(f"{kind} regularization_loss", got, want, ref_reg(pbar.double(), kind, arg),
                 dtype)


def test_small_temperature_lightly_nan_fastssl_finite():
    """tau = 0.02: the targets' exp(logit / (tau T)) spans exp(400); the prototype opposite
    to every target underflows to 0 in float32, and lightly's Sinkhorn divides 0 by 0."""
    a, t, c = randn(12, 5, seed=1), randn(6, 5, seed=2), randn(12, 5, seed=3)
    c[0] = -t.mean(0)
    x = [v.float() for v in (a, t, c)]
    theirs = MSNLoss(temperature=0.02)(*x)
    assert torch.isnan(theirs)
    ours = msn.MSNLoss(temperature=0.02)(*x)
    ref = ref_msn(*[v.double() for v in x], tau=0.02)
    assert torch.isfinite(ours) and abs(float(ours) - float(ref)) <= 1e-4 * abs(float(ref))


def test_me_max_weight_is_still_accepted():
    assert isinstance(raised(lambda: MSNLoss(me_max_weight=0.5)), TypeError)  # lightly 1.6.0
    with pytest.warns(DeprecationWarning):
        assert msn.MSNLoss(me_max_weight=0.5).regularization_weight == 0.5


def r32(*shape):
    return torch.randn(*shape)


ERRORS = {
    "temperature 0": lambda L: L.MSNLoss(temperature=0.0),
    "temperature -1": lambda L: L.MSNLoss(temperature=-1.0),
    "sinkhorn_iterations -1": lambda L: L.MSNLoss(sinkhorn_iterations=-1),
    "PMSN temperature 0": lambda L: L.PMSNLoss(temperature=0.0),
    "PMSNCustom sinkhorn_iterations -1": lambda L: L.PMSNCustomLoss(
        uniform, sinkhorn_iterations=-1),
    "anchors not a multiple of targets": lambda L: L.MSNLoss()(r32(5, 4), r32(2, 4),
                                                               r32(3, 4)),
    "targets dim differs": lambda L: L.MSNLoss()(r32(4, 4), r32(2, 5), r32(3, 4)),
    "prototypes dim differs": lambda L: L.MSNLoss()(r32(4, 4), r32(2, 4), r32(3, 5)),
    "PMSN anchors not a multiple": lambda L: L.PMSNLoss()(r32(7, 4), r32(3, 4), r32(3, 4)),
}


class _Lightly:
    MSNLoss, PMSNLoss, PMSNCustomLoss = MSNLoss, PMSNLoss, PMSNCustomLoss


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_have_lightly_types(case):
    theirs = raised(lambda: ERRORS[case](_Lightly))
    ours = raised(lambda: ERRORS[case](msn))
    assert theirs is not None and ours is not None, (case, theirs, ours)
    assert isinstance(ours, type(theirs)), (case, type(ours), type(theirs))


def test_gather_distributed_not_available(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for name in ("MSNLoss", "PMSNLoss"):
        theirs = raised(lambda: getattr(_Lightly, name)(gather_distributed=True))
        ours = raised(lambda: getattr(msn, name)(gather_distributed=True))
        assert isinstance(theirs, ValueError) and isinstance(ours, ValueError)
    # outside a process group gather_distributed=True is the local loss, as lightly's
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    x = [r32(6, 4), r32(3, 4), r32(5, 4)]
    torch.testing.assert_close(msn.MSNLoss(gather_distributed=True)(*x),
                               MSNLoss(gather_distributed=True)(*x), rtol=1e-5, atol=0)
    assert math.isfinite(float(msn.MSNLoss(gather_distributed=True)(*x)))
