"""MSNLoss, PMSNLoss, PMSNCustomLoss and MSN's helper functions (``fastssl.losses.msn``)
against float64 references written from the formulas in their product form (the targets
sharpened as p^(1/T) / sum p^(1/T), the Sinkhorn as alternating divisions of the (K, B)
matrix, the regulariser from the mean of the anchor probabilities), on the same rounded
inputs; the small-temperature regime where a float32 product form underflows; the errors;
and 2 gloo ranks against one process on the global batch.

Tolerance (``tol``): 16-bit inputs compute in float32 and the result is rounded to the
input dtype: 2 roundings of it. For float32 the logits are scaled by 1 / (tau T) (40 at the
defaults), so a logit carries ~ eps / (tau T) of absolute rounding and so does every
probability relatively: 2 eps / (tau T) (measured: ~0.2 eps / (tau T)). float64: only gross
errors show (2**-36).
"""
import math
import warnings

import pytest
import torch

from fastssl._checks import ShapeError
from fastssl.losses import msn
from fastssl.losses.msn import MSNLoss, PMSNCustomLoss, PMSNLoss
import _gloo

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)


def tol(dtype, scale=40.0):
    eps = torch.finfo(dtype).eps
    if dtype == torch.float64:
        return 2.0 ** -36
    return eps if dtype in HALF else 2 * eps * scale


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def rel(x, ref, floor=2.2e-308):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(floor))


# ----------------------------------------------------------------------------- references

def ref_probs(x, c, tau):
    """softmax(x_i . c_k / tau) of the L2-normalised rows."""
    xn = x / x.norm(dim=1, keepdim=True)
    cn = c / c.norm(dim=1, keepdim=True)
    return torch.softmax(xn @ cn.T / tau, dim=1)


def ref_sharpen(p, T):
    q = p ** (1.0 / T)
    return q / q.sum(1, keepdim=True)


def ref_sinkhorn(p, iterations):
    """MSN's Sinkhorn as alternating divisions of Q = P^T / sum(P) (K, B)."""
    B, K = p.shape
    Q = p.T / p.sum()
    for _ in range(iterations):
        Q = Q / Q.sum(1, keepdim=True) / K
        Q = Q / Q.sum(0, keepdim=True) / B
    return (Q * B).T


def ref_prior(K, exponent):
    k = torch.arange(1, K + 1, dtype=torch.float64)
    return k ** -exponent / (k ** -exponent).sum()


def ref_reg(pbar, kind, arg):
    if kind == "msn":
        return (pbar * torch.log(pbar)).sum() + math.log(pbar.shape[0])
    prior = ref_prior(pbar.shape[0], arg) if kind == "power" else arg(pbar)
    return (prior * (torch.log(prior) - torch.log(pbar))).sum()


def ref_targets(t, c, tau, T, iterations):
    with torch.no_grad():
        q = ref_sharpen(ref_probs(t, c, tau), T)
        return ref_sinkhorn(q, iterations) if iterations else q


def ref_msn(a, t, c, tau=0.1, T=0.25, iterations=3, lam=1.0, kind="msn", arg=None):
    """-(1/N) sum_i q_{i mod B} . log p_i + lam * R(mean_i p_i) (R only for lam > 0)."""
    V = a.shape[0] // t.shape[0]
    q = ref_targets(t, c, tau, T, iterations).repeat(V, 1)
    p = ref_probs(a, c, tau)
    loss = -(q * torch.log(p)).sum(1).mean()
    return loss + lam * ref_reg(p.mean(0), kind, arg) if lam > 0 else loss


def uniform(pbar):
    return torch.full_like(pbar, 1.0 / pbar.shape[0])


def tilted(pbar):  # a prior that depends on p_bar (with its gradient)
    return torch.softmax(2 * pbar, 0)


def make(kind, arg, **kw):
    if kind == "msn":
        return MSNLoss(**kw)
    if kind == "power":
        return PMSNLoss(power_law_exponent=arg, **kw)
    return PMSNCustomLoss(arg, **kw)


def check(loss_fn, ref_fn, inputs, dtype, what, scale=40.0, floor=1e-12):
    """Loss and gradients (anchors, prototypes) on ``inputs`` rounded to ``dtype`` against
    ``ref_fn`` in float64 on the same rounded values; the targets get no gradient. A
    gradient is measured against max(its float64 norm, ``floor``): with D = 1 the rows
    normalise to +-1 and both gradients are zero in exact arithmetic (rounding noise of
    terms of size 1 / tau, the floor there)."""
    a, t, c = [x.detach().to(dtype) for x in inputs]
    a.requires_grad_()
    c.requires_grad_()
    t.requires_grad_()
    loss = loss_fn(a, t, c)
    assert loss.dtype == dtype and loss.shape == (), (what, loss.dtype, loss.shape)
    grads = torch.autograd.grad(loss, [a, c, t], allow_unused=True)
    assert grads[2] is None, f"{what}: the targets received a gradient"
    ar, tr, cr = [x.detach().double().requires_grad_() for x in (a, t, c)]
    ref = ref_fn(ar, tr, cr)
    ref_grads = torch.autograd.grad(ref, [ar, cr])
    for name, g, r in [("loss", loss, ref), ("d anchors", grads[0], ref_grads[0]),
                       ("d prototypes", grads[1], ref_grads[1])]:
        assert torch.isfinite(g).all(), f"{what} {name}: non-finite"
        assert g.dtype == dtype
        e = rel(g, r, floor if name != "loss" else 2.2e-308)
        assert e <= tol(dtype, scale), f"{what} {name}: {e:.3g} from float64"


def inputs(V, B, K, D, seed):
    return randn(V * B, D, seed=seed), randn(B, D, seed=seed + 1), randn(K, D, seed=seed + 2)


# ----------------------------------------------------------------------------- values

SHAPES = [(1, 1, 3, 1), (2, 3, 5, 257), (3, 7, 16, 3), (1, 4, 130, 8)]  # V, B, K, D


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,B,K,D", SHAPES)
@pytest.mark.parametrize("kind,arg", [("msn", None), ("power", 0.25), ("power", 1.3),
                                      ("custom", uniform), ("custom", tilted)])
def test_losses_against_the_formula(V, B, K, D, kind, arg, dtype):
    seed = V * 1000 + B * 100 + K + D
    for iterations in (0, 1, 3):
        loss_fn = make(kind, arg, sinkhorn_iterations=iterations)
        check(loss_fn, lambda a, t, c: ref_msn(a, t, c, iterations=iterations, kind=kind,
                                               arg=arg),
              inputs(V, B, K, D, seed + iterations), dtype, f"{kind} iterations={iterations}",
              floor=10.0 if D == 1 else 1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau,T,lam,iterations", [(0.5, 1.0, 0.3, 2), (0.1, 0.25, 0.0, 3),
                                                  (0.2, 0.5, -1.0, 5), (1.0, 2.0, 5.0, 1)])
def test_settings_and_the_sharpening_temperature(tau, T, lam, iterations, dtype):
    """lam <= 0 drops the regulariser; T > 1 smooths; the forward's T is used."""
    kw = dict(temperature=tau, sinkhorn_iterations=iterations, regularization_weight=lam)
    for kind, arg in (("msn", None), ("power", 0.5)):
        loss_fn = make(kind, arg, **kw)
        check(lambda a, t, c: loss_fn(a, t, c, target_sharpen_temperature=T),
              lambda a, t, c: ref_msn(a, t, c, tau, T, iterations, lam, kind, arg),
              inputs(2, 5, 9, 6, int(tau * 10 + T * 100)), dtype, f"{kind} {kw}",
              scale=max(1 / (tau * T), 10.0))


def test_small_temperature_stays_finite():
    """tau = 0.02, T = 0.25: logits / (tau T) span 400, so exp() of the smallest
    underflows in float32 (a product-form Sinkhorn divides 0 by 0 for a prototype far
    from every target); fastssl stays within float32's accuracy of the float64 formula."""
    a, t, c = inputs(2, 6, 12, 5, 7)
    c[0] = -t.mean(0) * 50  # a prototype opposite to the targets
    loss_fn = MSNLoss(temperature=0.02)
    check(loss_fn, lambda a, t, c: ref_msn(a, t, c, tau=0.02), (a, t, c), torch.float32,
          "MSN at tau = 0.02", scale=200.0)
    q = ref_sharpen(ref_probs(t.float(), c.float(), 0.02), 0.25)
    assert (q == 0).all(0).any()  # float32 product form: a column of zeros


def test_helper_functions():
    g = torch.Generator().manual_seed(3)
    p = torch.rand(7, 11, generator=g, dtype=torch.float64)
    p[2, 4] = 0.0
    for it in (1, 2, 5):
        for dtype in (torch.float64, torch.float32):
            out = msn.sinkhorn(p.to(dtype), iterations=it)
            assert out.dtype == dtype and not out.requires_grad
            assert rel(out, ref_sinkhorn(p, it)) <= tol(dtype, 1.0)
    assert msn.sinkhorn(p, 0) is p and msn.sinkhorn(p, -2) is p
    for T in (0.1, 0.5, 2.0):
        assert rel(msn.sharpen(p.float(), T), ref_sharpen(p, T)) <= tol(torch.float32, 1 / T)
    tiny = torch.full((2, 5), 1e-30)  # (1e-30)^(1/0.1) underflows: the row is still uniform
    torch.testing.assert_close(msn.sharpen(tiny, 0.1), torch.full((2, 5), 0.2))
    q, c = randn(5, 3, seed=1), randn(4, 3, seed=2)
    for dtype in DTYPES:
        out = msn.prototype_probabilities(q.to(dtype), c.to(dtype), 0.3)
        ref = torch.softmax(q.to(dtype).double() @ c.to(dtype).double().T / 0.3, 1)
        assert out.dtype == dtype and rel(out, ref) <= tol(dtype, 10.0)
    for K, e in ((1, 0.25), (4, 0.5), (1000, 1.7), (6, -0.5)):
        prior = msn.power_law_distribution(K, e)
        assert prior.dtype == torch.float32 and prior.shape == (K,)
        assert rel(prior, ref_prior(K, e)) <= 2 ** -23
        wide = msn.power_law_distribution(K, e, torch.device("cpu"), torch.float64)
        assert rel(wide, ref_prior(K, e)) <= 2 ** -50


def test_regularization_loss_on_given_probabilities():
    pbar = torch.tensor([0.1, 0.3, 0.6])
    pd = pbar.double()
    msn_reg = MSNLoss().regularization_loss(pbar)
    assert msn_reg.dtype == torch.float32
    assert rel(msn_reg, ref_reg(pd, "msn", None)) <= 1e-6
    assert rel(PMSNLoss(power_law_exponent=0.7).regularization_loss(mean_anchor_probs=pbar),
               ref_reg(pd, "power", 0.7)) <= 1e-6
    assert rel(PMSNCustomLoss(uniform).regularization_loss(pbar),
               ref_reg(pd, "custom", uniform)) <= 1e-6
    # an empty prototype: 0 log 0 = 0, as the product form's 0^0
    zero = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    assert MSNLoss().regularization_loss(zero) == pytest.approx(math.log(3) - math.log(2))


def test_an_overridden_regularization_loss_is_used():
    seen = []

    class Mine(MSNLoss):
        def regularization_loss(self, mean_anchor_probs):
            seen.append(mean_anchor_probs.detach().clone())
            return (mean_anchor_probs ** 2).sum()

    a, t, c = inputs(2, 3, 5, 4, 1)
    check(Mine(regularization_weight=0.5),
          lambda a, t, c: ref_msn(a, t, c, lam=0.0) + 0.5 * (ref_probs(a, c, 0.1).mean(0) ** 2
                                                              ).sum(),
          (a, t, c), torch.float64, "overridden regulariser")
    torch.testing.assert_close(seen[0], ref_probs(a, c, 0.1).mean(0), rtol=1e-12, atol=0)


def test_autocast_mixed_dtypes_and_non_contiguous_inputs():
    a, t, c = [x.float() for x in inputs(2, 4, 6, 5, 11)]
    want = MSNLoss()(a, t, c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = MSNLoss()(a, t, c)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    # bf16 anchors (a model under autocast) with float32 prototypes: float32 arithmetic
    mixed = MSNLoss()(a.bfloat16(), t, c)
    assert mixed.dtype == torch.bfloat16
    assert rel(mixed, MSNLoss()(a.bfloat16().float(), t, c)) <= 2 ** -8
    at, ct = a.T.contiguous().T, c.T.contiguous().T
    assert not at.is_contiguous()
    torch.testing.assert_close(MSNLoss()(at, t[:, :], ct), want, rtol=1e-6, atol=0)
    meta = MSNLoss()(*(x.to("meta") for x in (a, t, c)))
    assert meta.device.type == "meta" and meta.shape == () and meta.dtype == torch.float32


def test_me_max_weight_and_attributes():
    with pytest.warns(DeprecationWarning, match="me_max_weight"):
        loss_fn = MSNLoss(regularization_weight=0.0, me_max_weight=0.5)
    assert loss_fn.regularization_weight == 0.5
    loss_fn = PMSNLoss(0.2, 4, 0.3, 0.8)
    assert (loss_fn.temperature, loss_fn.sinkhorn_iterations, loss_fn.regularization_weight,
            loss_fn.power_law_exponent, loss_fn.gather_distributed) == (0.2, 4, 0.3, 0.8, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PMSNCustomLoss(uniform, 0.2, 0, 2.0, False)


# ----------------------------------------------------------------------------- errors

def r32(*shape):
    return torch.randn(*shape)


ERRORS = [
    (lambda: MSNLoss(temperature=0.0), ValueError, "temperature"),
    (lambda: MSNLoss(temperature=-1.0), ValueError, "temperature"),
    (lambda: MSNLoss(temperature="a"), TypeError, "temperature"),
    (lambda: MSNLoss(sinkhorn_iterations=-1), ValueError, "sinkhorn_iterations"),
    (lambda: MSNLoss(sinkhorn_iterations=1.5), TypeError, "sinkhorn_iterations"),
    (lambda: MSNLoss(regularization_weight=None), TypeError, "regularization_weight"),
    (lambda: MSNLoss(gather_distributed=2), TypeError, "gather_distributed"),
    (lambda: PMSNLoss(power_law_exponent="x"), TypeError, "power_law_exponent"),
    (lambda: PMSNLoss(temperature=0.0), ValueError, "temperature"),
    (lambda: PMSNCustomLoss(3), TypeError, "target_distribution"),
    (lambda: PMSNCustomLoss(uniform, sinkhorn_iterations=-1), ValueError, "sinkhorn"),
    (lambda: MSNLoss()(r32(5, 4), r32(2, 4), r32(3, 4)), RuntimeError, "multiple"),
    (lambda: MSNLoss()(r32(1, 4), r32(2, 4), r32(3, 4)), ShapeError, "multiple"),
    (lambda: MSNLoss()(r32(0, 4), r32(0, 4), r32(3, 4)), ShapeError, "multiple"),
    (lambda: MSNLoss()(r32(4, 4), r32(2, 5), r32(3, 4)), RuntimeError, "dim"),
    (lambda: MSNLoss()(r32(4, 4), r32(2, 4), r32(3, 5)), RuntimeError, "dim"),
    (lambda: MSNLoss()(r32(4, 4), r32(2, 4), r32(0, 4)), ShapeError, "K >= 1"),
    (lambda: MSNLoss()(r32(4), r32(2, 4), r32(3, 4)), ShapeError, "2-D"),
    (lambda: MSNLoss()(r32(4, 4), r32(2, 4).long(), r32(3, 4)), ValueError, "floating"),
    (lambda: MSNLoss()(r32(4, 4), None, r32(3, 4)), TypeError, "targets"),
    (lambda: MSNLoss()(r32(4, 4), r32(2, 4), r32(3, 4), 0.0), ValueError,
     "target_sharpen_temperature"),
    (lambda: PMSNCustomLoss(lambda p: p[:2])(r32(4, 4), r32(2, 4), r32(3, 4)), ShapeError,
     "target_distribution"),
    (lambda: PMSNCustomLoss(lambda p: 0.5)(r32(4, 4), r32(2, 4), r32(3, 4)), TypeError,
     "target_distribution"),
    (lambda: MSNLoss().regularization_loss(r32(2, 3)), ShapeError, "mean_anchor_probs"),
    (lambda: msn.sinkhorn(r32(3), 2), ShapeError, "2-D"),
    (lambda: msn.sinkhorn(r32(3, 2).abs(), 1.5), TypeError, "iterations"),
    (lambda: msn.sharpen(r32(3, 2).abs(), 0.0), ValueError, "temperature"),
    (lambda: msn.prototype_probabilities(r32(3, 2), r32(4, 3), 0.1), ShapeError, "dim"),
    (lambda: msn.prototype_probabilities(r32(3, 2), r32(4, 2), 0.0), ValueError,
     "temperature"),
    (lambda: msn.power_law_distribution(0, 0.5), ValueError, "size"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_bad_arguments(i):
    call, kind, match = ERRORS[i]
    with pytest.raises(kind, match=match):
        call()


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for make_loss in (lambda: MSNLoss(gather_distributed=True),
                      lambda: PMSNLoss(gather_distributed=True),
                      lambda: PMSNCustomLoss(uniform, gather_distributed=True)):
        with pytest.raises(ValueError, match="gather_distributed"):
            make_loss()
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    a, t, c = [x.float() for x in inputs(2, 3, 4, 5, 2)]
    # outside a process group: the local loss
    assert torch.equal(MSNLoss(gather_distributed=True)(a, t, c), MSNLoss()(a, t, c))
    p = torch.rand(3, 4)
    assert torch.equal(msn.sinkhorn(p, 2, gather_distributed=True), msn.sinkhorn(p, 2))


# ----------------------------------------------------------------------------- 2 ranks

V_DIST, K_DIST, D_DIST = 2, 6, 4
CASES = {"equal": [3, 3], "uneven": [3, 2]}  # targets per rank


def dist_data(sizes):
    """Global anchors (V, B, D), targets (B, D), prototypes (K, D), float64."""
    B = sum(sizes)
    g = torch.Generator().manual_seed(B)
    return (torch.randn(V_DIST, B, D_DIST, generator=g, dtype=torch.float64),
            torch.randn(B, D_DIST, generator=g, dtype=torch.float64),
            torch.randn(K_DIST, D_DIST, generator=g, dtype=torch.float64))


def dist_losses():
    return {"msn": MSNLoss(gather_distributed=True),
            "pmsn": PMSNLoss(sinkhorn_iterations=2, regularization_weight=0.7,
                             gather_distributed=True)}


def rank_worker(rank, world):
    results = {}
    for case, sizes in CASES.items():
        A, T, C = dist_data(sizes)
        o, n = sum(sizes[:rank]), sizes[rank]
        for name, loss_fn in dist_losses().items():
            a = A[:, o:o + n].reshape(-1, D_DIST).clone().requires_grad_()
            c = C.clone().requires_grad_()
            loss = loss_fn(a, T[o:o + n], c)
            results[case, name] = (loss.detach(), *torch.autograd.grad(loss, [a, c]))
        p = torch.softmax(T[o:o + n] @ C.T, 1)
        results[case, "sinkhorn"] = msn.sinkhorn(p, 3, gather_distributed=True)
    try:  # rank 1's anchors are not a multiple of its targets: every rank raises
        MSNLoss(gather_distributed=True)(r32(5 if rank else 4, 3), r32(2, 3), r32(4, 3))
        results["error"] = None
    except Exception as e:  # noqa: BLE001  (the type and message are compared)
        results["error"] = (type(e).__name__, str(e))
    return results


def ref_rank_losses(A, T, C, sizes, name):
    """Rank r's loss: its rows' cross-entropy against the Sinkhorn targets of the global
    batch, plus lam * R(p_bar) of every rank's anchors."""
    kw = dict(iterations=3, lam=1.0, kind="msn") if name == "msn" else \
        dict(iterations=2, lam=0.7, kind="power", arg=0.25)
    q = ref_targets(T, C, 0.1, 0.25, kw["iterations"])
    p = ref_probs(A.reshape(-1, D_DIST), C, 0.1)
    reg = kw["lam"] * ref_reg(p.mean(0), kw["kind"], kw.get("arg"))
    losses = []
    for r, n in enumerate(sizes):
        o = sum(sizes[:r])
        pr = ref_probs(A[:, o:o + n].reshape(-1, D_DIST), C, 0.1)
        losses.append(-(q[o:o + n].repeat(V_DIST, 1) * torch.log(pr)).sum(1).mean() + reg)
    return losses


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    """2 gloo ranks, gather_distributed=True, equal and uneven batches: each rank's loss is
    its rows' cross-entropy against the global batch's Sinkhorn targets plus the
    regulariser of the global p_bar; with equal batches the mean over ranks is the
    one-process loss on the concatenated batch. A rank's anchor gradient is world_size
    times the global one, and the mean of the prototype gradients is the global one."""
    world = 2
    res = _gloo.run(rank_worker, world, timeout=90, what="the 2-rank MSN run", group_timeout=30)
    for case, sizes in CASES.items():
        A, T, C = dist_data(sizes)
        for name in dist_losses():
            A_, C_ = A.clone().requires_grad_(), C.clone().requires_grad_()
            losses = ref_rank_losses(A_, T, C_, sizes, name)
            dA, dC = torch.autograd.grad(sum(losses), [A_, C_])
            if case == "equal":  # the mean over ranks is one process on the global batch
                kw = dict(iterations=3) if name == "msn" else \
                    dict(iterations=2, lam=0.7, kind="power", arg=0.25)
                one = ref_msn(A.reshape(-1, D_DIST), T, C, **kw)
                assert rel(sum(losses) / world, one) <= 1e-13
            for r, n in enumerate(sizes):
                o = sum(sizes[:r])
                loss, da, dc = res[r][case, name]
                assert rel(loss, losses[r]) <= 1e-12, (case, name, r)
                assert rel(da, dA[:, o:o + n].reshape(-1, D_DIST)) <= 1e-12, (case, name, r)
            mean_dc = sum(res[r][case, name][2] for r in range(world)) / world
            assert rel(mean_dc, dC / world) <= 1e-12, (case, name)
        p = torch.softmax(T @ C.T, 1)
        got = torch.cat([res[r][case, "sinkhorn"] for r in range(world)])
        assert rel(got, ref_sinkhorn(p, 3)) <= 1e-13, case
    for r in range(world):
        kind, message = res[r]["error"]
        assert kind == "ShapeError" and "rank 1" in message and "multiple" in message, \
            res[r]["error"]
