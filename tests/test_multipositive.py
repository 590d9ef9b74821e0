"""Multi-positive and decoupled contrastive losses (fastssl.multipositive) against float64
formulas written out here with the full similarity matrix: the keyed log-partition on both
paths (every key mode, with and without the row's own column, odd shapes, 16-bit inputs),
SupCon in both contrast modes, with labels, without, and with an explicit mask, rows
without a positive, solo-learn's multi-positive SimCLR, DCL and DCLW, the custom op under
opcheck and torch.compile, and the reference implementation's errors."""
import pytest
import torch

from fastssl import _ops, multipositive as mp
import _gloo

EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _outcome(fn, inputs, dtype):
    """(value, gradients) of the scalar fn(*leaves), the leaves ``inputs`` cast to dtype."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return [value.detach().double()] + [torch.zeros_like(t, dtype=torch.float64) if d is None
                                        else d.double() for d, t in zip(grads, leaves)]


def assert_as_close_as_eager(fused, formula, inputs, dtype=torch.float32, floor=0.0):
    """``fused`` on ``inputs`` rounded to dtype, and the eager ``formula`` (full matrices)
    in float32 on the same rounded inputs, each against ``formula`` in float64: the fused
    value's and every gradient's error at most twice eager's, plus four float32 roundings
    and one rounding to dtype, of max(||float64 result||, floor). ``floor`` is the size of
    the terms a gradient sums where they cancel exactly (D = 1 unit rows, a sample whose
    only other column is its positive), where the float64 result is rounding noise; a list
    gives one per output (value, then each gradient)."""
    rounded = [t.detach().to(dtype).double() for t in inputs]
    want = _outcome(formula, rounded, torch.float64)
    eager = _outcome(formula, rounded, torch.float32)
    got = _outcome(fused, rounded, dtype)
    floors = floor if isinstance(floor, (list, tuple)) else [floor] * len(want)
    for k, (g, e, w, fl) in enumerate(zip(got, eager, want, floors)):
        err, err_eager = float((g - w).norm()), float((e - w).norm())
        scale = max(float(w.norm()), fl)
        bound = 2 * err_eager + (4 * EPS32 + torch.finfo(dtype).eps) * scale
        assert err <= bound, (k, dtype, err, err_eager, scale)


def ref_lse(rows, cols, rk, ck, s, mode, self_idx):
    """log sum over the selected columns of exp(s r . c), -inf when none, in rows' dtype."""
    x = s * rows @ cols.T
    keep = torch.ones_like(x, dtype=torch.bool)
    if mode == 1:
        keep &= rk[:, None] != ck[None, :]
    if mode == 2:
        keep &= rk[:, None] == ck[None, :]
    if self_idx is not None:
        i = torch.arange(rows.shape[0])
        ok = self_idx >= 0
        keep[i[ok], self_idx[ok]] = False
    return torch.logsumexp(x.masked_fill(~keep, float("-inf")), 1)


@pytest.mark.parametrize("n,m,D", [(1, 5, 3), (17, 33, 1), (9, 130, 257)])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("with_self", [False, True])
def test_keyed_lse_value_and_gradients(backend, n, m, D, mode, with_self):
    g = torch.Generator().manual_seed(n * 1000 + m + D + mode)
    # unit rows at s = 1 / 0.1, the regime of every loss built on it (logits within +-10)
    rows = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    cols = torch.nn.functional.normalize(torch.randn(m, D, generator=g, dtype=torch.float64), dim=1)
    rk = torch.randint(0, 4, (n,), generator=g)
    ck = torch.randint(0, 4, (m,), generator=g)
    self_idx = torch.randint(-1, m, (n,), generator=g) if with_self else None
    s = 10.0
    finite = torch.isfinite(ref_lse(rows, cols, rk, ck, s, mode, self_idx))
    w = torch.randn(n, generator=g, dtype=torch.float64)
    for dtype in DTYPES:
        got = mp.keyed_lse(rows.to(dtype), cols.to(dtype), rk, ck, s, mode, self_idx)
        assert torch.equal(torch.isfinite(got), finite), (dtype, got)
        assert (got[~finite] == float("-inf")).all()

        def weighted(lse_fn):  # a scalar of the finite rows, for values and gradients
            return lambda r, c: torch.where(finite, lse_fn(r, c), 0.0).mul(
                w.to(torch.float64 if r.dtype == torch.float64 else torch.float32)).sum()
        assert_as_close_as_eager(
            weighted(lambda r, c: mp.keyed_lse(r, c, rk, ck, s, mode, self_idx)),
            weighted(lambda r, c: ref_lse(r, c, rk, ck, s, mode, self_idx)), (rows, cols), dtype,
            floor=_gradient_terms(rows.to(dtype).double(), cols.to(dtype).double(), w * finite,
                                  rk, ck, s, mode, self_idx))


def _gradient_terms(rows, cols, w, rk, ck, s, mode, self_idx):
    """[0, ||s |w P| |C|||, ||s |w P|^T |R|||] in float64: the magnitude of the terms each
    gradient sums (P the softmax over the selected columns), the size its float32 sum's
    roundings scale with when the terms' signs cancel (test_precision.py's condition)."""
    lse = ref_lse(rows, cols, rk, ck, s, mode, self_idx)
    x = s * rows @ cols.T
    keep = torch.isfinite(lse)[:, None] & (x - torch.where(torch.isfinite(lse), lse, 0.0)[:, None]
                                           > -float("inf"))
    p = torch.exp(x - torch.where(torch.isfinite(lse), lse, 0.0)[:, None])
    p = torch.where(keep & torch.isfinite(ref_lse_mask(rows, cols, rk, ck, mode, self_idx)),
                    p, 0.0) * w.abs()[:, None]
    return [0.0, float((abs(s) * p @ cols.abs()).norm()), float((abs(s) * p.T @ rows.abs()).norm())]


def ref_lse_mask(rows, cols, rk, ck, mode, self_idx):
    """0 where a column is in the row's set, -inf where it is left out."""
    keep = torch.ones(rows.shape[0], cols.shape[0], dtype=torch.bool)
    if mode == 1:
        keep &= rk[:, None] != ck[None, :]
    if mode == 2:
        keep &= rk[:, None] == ck[None, :]
    if self_idx is not None:
        ok = self_idx >= 0
        keep[torch.arange(rows.shape[0])[ok], self_idx[ok]] = False
    return torch.where(keep, 0.0, float("-inf")).to(torch.float64)


def ref_supcon(features, labels, mask, T, mode, T_base):
    """The reference implementation's formula with full matrices, in features' dtype."""
    f = features.reshape(features.shape[0], features.shape[1], -1)
    B, V, _ = f.shape
    if mask is None:
        lab = torch.arange(B) if labels is None else labels
        mask = (lab[:, None] == lab[None, :])
    contrast = torch.cat(torch.unbind(f, 1))
    anchor, count = (f[:, 0], 1) if mode == "one" else (contrast, V)
    logits = anchor @ contrast.T / T
    m = mask.to(f.dtype).repeat(count, V)
    eye = torch.zeros_like(logits)
    eye[torch.arange(anchor.shape[0]), torch.arange(anchor.shape[0])] = 1
    m = m * (1 - eye)
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye.bool(), float("-inf")), 1,
                                        keepdim=True)
    pos = m.sum(1)
    mean = (m * log_prob).sum(1) / torch.where(pos < 1e-6, torch.ones_like(pos), pos)
    return (-(T / T_base) * mean).mean()


@pytest.mark.parametrize("B,V,D", [(1, 2, 4), (7, 3, 1), (12, 2, 257)])
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("how", ["labels", "none", "mask"])
def test_supcon_against_reference(backend, B, V, D, mode, how):
    g = torch.Generator().manual_seed(B * 100 + V * 10 + D)
    f = torch.nn.functional.normalize(torch.randn(B, V, D, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 3, (B,), generator=g)
    mask = (labels[:, None] == labels[None, :]).float() if how == "mask" else None
    lab = labels if how == "labels" else None
    ref_mask = mask if how == "mask" else None
    assert_as_close_as_eager(lambda x: mp.SupConLoss(0.1, mode, 0.07)(x, lab, mask),
                             lambda x: ref_supcon(x, lab, ref_mask, 0.1, mode, 0.07), (f,),
                             floor=1 / 0.07)  # terms of size 1/T_base


def test_supcon_rows_without_positive_and_extra_dims(backend):
    g = torch.Generator().manual_seed(3)
    f = torch.randn(6, 1, 2, 3, generator=g)  # one view, features (2, 3) flattened
    labels = torch.tensor([0, 1, 1, 2, 3, 3])  # samples 0 and 3 have no positive
    assert_as_close_as_eager(
        lambda x: mp.supcon_loss(x, labels, temperature=0.5, base_temperature=0.5),
        lambda x: ref_supcon(x, labels, None, 0.5, "all", 0.5), (f,), floor=2.0)


def test_supcon_16bit_inputs_close_to_float64(backend):
    g = torch.Generator().manual_seed(5)
    f = torch.nn.functional.normalize(torch.randn(20, 2, 64, generator=g), dim=-1)
    labels = torch.randint(0, 4, (20,), generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        assert mp.supcon_loss(f.to(dtype), labels, temperature=0.1).dtype == dtype
        assert_as_close_as_eager(lambda x: mp.supcon_loss(x, labels, temperature=0.1),
                                 lambda x: ref_supcon(x, labels, None, 0.1, "all", 0.07),
                                 (f,), dtype)


def test_supcon_errors():
    loss = mp.SupConLoss()
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        loss(torch.randn(4, 8))
    with pytest.raises(ValueError, match="Cannot define both"):
        loss(torch.randn(4, 2, 8), torch.arange(4), torch.eye(4))
    with pytest.raises(ValueError, match="Num of labels does not match"):
        loss(torch.randn(4, 2, 8), torch.arange(3))
    with pytest.raises(ValueError, match="Unknown mode"):
        mp.SupConLoss(contrast_mode="both")(torch.randn(4, 2, 8))
    with pytest.raises(ValueError, match="temperature"):
        mp.SupConLoss(temperature=0.0)


def ref_simclr_multi(z, idx, T):
    u = torch.nn.functional.normalize(z, dim=-1)
    x = u @ u.T / T
    eye = torch.eye(len(idx), dtype=torch.bool)
    pos = (idx[:, None] == idx[None, :]) & ~eye
    every = torch.logsumexp(x.masked_fill(eye, float("-inf")), 1)
    return (every - torch.logsumexp(x.masked_fill(~pos, float("-inf")), 1)).mean()


@pytest.mark.parametrize("N,D", [(2, 1), (15, 33), (24, 257)])
def test_multi_positive_simclr(backend, N, D):
    g = torch.Generator().manual_seed(N + D)
    z = torch.randn(N, D, generator=g, dtype=torch.float64)
    idx = torch.arange(N) % max(1, N // 3)  # three or more crops per image
    if N == 2:
        idx = torch.tensor([0, 0])
    for dtype in DTYPES:
        assert_as_close_as_eager(lambda x: mp.simclr_loss_func(x, idx, 0.2),
                                 lambda x: ref_simclr_multi(x, idx, 0.2), (z,), dtype,
                                 floor=1 / 0.2)


def ref_dcl(a, b, T, weights=None):
    u = torch.nn.functional.normalize(a, dim=1)
    v = torch.nn.functional.normalize(b, dim=1)

    def one(p, q):
        n = p.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        pos = (p * q).sum(1) / T
        if weights is not None:
            pos = pos * weights(p, q)
        negs = torch.cat([(p @ p.T / T)[~eye].view(n, -1), (p @ q.T / T)[~eye].view(n, -1)], 1)
        return (torch.logsumexp(negs, 1) - pos).mean()
    return 0.5 * (one(u, v) + one(v, u))


def vmf(p, q, sigma=0.5):
    return 2 - p.shape[0] * torch.softmax((p * q).sum(1) / sigma, 0)


@pytest.mark.parametrize("n,D", [(2, 1), (9, 17), (16, 257)])
@pytest.mark.parametrize("weighted", [False, True])
def test_dcl_and_dclw(backend, n, D, weighted):
    g = torch.Generator().manual_seed(n * 10 + D)
    a = torch.randn(n, D, generator=g, dtype=torch.float64)
    b = torch.randn(n, D, generator=g, dtype=torch.float64)
    loss = mp.DCLWLoss(0.1, 0.5) if weighted else mp.DCLLoss(0.1)
    fn = (lambda p, q: vmf(p.detach(), q.detach())) if weighted else None
    # D = 1: unit rows are +-1 and every gradient is exactly zero (float64: roundings)
    for dtype in DTYPES:
        assert_as_close_as_eager(loss, lambda x, y: ref_dcl(x, y, 0.1, fn), (a, b), dtype,
                                 floor=10.0)


def test_dcl_with_custom_weight_fn(backend):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    fn = lambda p, q: ((p - q) ** 2).sum(1)  # noqa: E731  (lightly's docstring example)
    assert_as_close_as_eager(mp.DCLLoss(weight_fn=fn), lambda x, y: ref_dcl(x, y, 0.1, fn),
                             (a, b))


def test_keyed_infonce_opcheck_and_compile():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 5, generator=g, requires_grad=True)
    cols = torch.randn(9, 5, generator=g, requires_grad=True)
    keys = torch.randint(0, 3, (15,), generator=g)
    pos = torch.full((6,), -1, dtype=torch.int64)
    for mode in (1, 2):
        args = (rows, cols, None, pos, torch.arange(6), torch.tensor(2.0), False, keys, mode)
        torch.library.opcheck(_ops.infonce.custom, args)
    f = torch.randn(8, 2, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (8,), generator=g)
    eager = mp.supcon_loss(f, labels)
    compiled = torch.compile(mp.supcon_loss, fullgraph=True, backend="aot_eager")(f, labels)
    assert torch.allclose(eager, compiled, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- 2 ranks

def _global_batch():
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(10, 12, generator=g), torch.randn(10, 12, generator=g)
    idx = torch.arange(10) % 4
    return a, b, idx


def _rank_worker(rank, world):
    a, b, idx = _global_batch()
    rows = slice(5 * rank, 5 * rank + 5)
    x, y = a[rows].clone().requires_grad_(), b[rows].clone().requires_grad_()
    dcl = mp.DCLLoss(0.2, gather_distributed=True)(x, y)
    dcl.backward()
    z = a[rows].clone().requires_grad_()
    multi = mp.simclr_loss_func(z, idx[rows], 0.2)
    multi.backward()
    try:  # rank 1's indexes are too short: every rank must raise, none must hang
        mp.simclr_loss_func(z, idx[rows][:4 if rank else 5], 0.2)
        error = None
    except Exception as e:
        error = (type(e).__name__, str(e))
    return {"dcl": dcl.detach(), "dx": x.grad, "dy": y.grad, "multi": multi.detach(),
            "dz": z.grad, "error": error}


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    """Each rank's loss over its 5 rows against the gathered columns: the mean of the two
    ranks' losses is the one-process loss on the 10 rows, and each rank's input gradient is
    world_size x the global gradient of its slice (the convention of fastssl.distributed)."""
    res = _gloo.run(_rank_worker, 2, timeout=120)
    a, b, idx = _global_batch()
    x, y, z = (t.clone().requires_grad_() for t in (a, b, a))
    ref = mp.DCLLoss(0.2)(x, y)
    ref.backward()
    ref_multi = mp.simclr_loss_func(z, idx, 0.2)
    ref_multi.backward()
    for key, want in (("dcl", ref), ("multi", ref_multi)):
        assert torch.allclose((res[0][key] + res[1][key]) / 2, want, rtol=1e-5, atol=1e-6)
    for key, want in (("dx", x.grad), ("dy", y.grad), ("dz", z.grad)):
        got = torch.cat([r[key] for r in res])
        assert torch.allclose(got, 2 * want, rtol=1e-4, atol=1e-6), key
    for r in res:
        assert r["error"][0] == "ShapeError" and "indexes" in r["error"][1] \
            and "rank 1" in r["error"][1], r["error"]
