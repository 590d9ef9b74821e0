"""VICRegLLoss, PatchKernelAlignmentLoss, roi_resample_to_grid and nearest_neighbors
(``fastssl.losses.dense``) against float64 references written from the formulas: VICRegL
with explicit pairwise squared distances, a stable sort for the matches and D x D
covariances, one VICReg call per pair of views; PKA with the explicit n x n centring matrix
H = I - 11^T / n on each image's valid tokens and the CKA of H K H; ROI resampling by a
loop over boxes, bins and bilinear samples.

Tolerance (``tol``): 16-bit inputs compute in float32 and the result is rounded to the input
dtype: 2 * eps. float32: 64 * eps. float64: only gross errors show (2**-30).
"""
import math

import pytest
import torch

from fastssl._checks import ShapeError
from fastssl.losses.dense import (PatchKernelAlignmentLoss, VICRegLLoss, nearest_neighbors,
                                  roi_resample_to_grid)
import _gloo

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)


def tol(dtype):
    if dtype == torch.float64:
        return 2.0 ** -30
    eps = torch.finfo(dtype).eps
    return 2 * eps if dtype in HALF else 64 * eps


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(2.2e-308))


def check(ours_fn, ref_fn, inputs, dtype, what, wrt=None):
    """Loss and gradients (of the inputs numbered ``wrt``, default all) of ``ours_fn`` on
    ``inputs`` rounded to ``dtype`` against ``ref_fn`` in float64 on the same values."""
    wrt = range(len(inputs)) if wrt is None else wrt
    xs = [x.detach().to(dtype).requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    loss = ours_fn(*xs)
    assert loss.dtype == dtype and loss.shape == (), (what, loss.dtype, loss.shape)
    grads = torch.autograd.grad(loss, [xs[i] for i in wrt])
    xr = [x.detach().double().requires_grad_(i in wrt) for i, x in enumerate(xs)]
    ref = ref_fn(*xr)
    ref_grads = torch.autograd.grad(ref, [xr[i] for i in wrt])
    for name, a, r in [("loss", loss, ref)] + [(f"grad[{i}]", g, gr) for i, g, gr
                                              in zip(wrt, grads, ref_grads)]:
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite"
        assert a.dtype == dtype, (what, name, a.dtype)
        e = rel(a, r)
        assert e <= tol(dtype), f"{what} {name}: {e:.3g} from float64 (tol {tol(dtype):.3g})"
    return loss


# ----------------------------------------------------------------------------- VICRegL references

def ref_var(z, eps):
    return torch.relu(1 - torch.sqrt(z.var(0) + eps)).mean()


def ref_cov(z):
    """z (B, ..., D): the off-diagonal squares of each (B - 1)-normalised D x D covariance
    over the batch, / D, averaged over the other dimensions."""
    zc = z - z.mean(0)
    c = torch.einsum("b...i,b...j->...ij", zc, zc) / (z.shape[0] - 1)
    off = c - torch.diag_embed(torch.diagonal(c, dim1=-2, dim2=-1))
    return (off.square().sum((-2, -1)) / z.shape[-1]).mean()


def ref_vicreg(x, y, lam, mu, nu, eps, rows):
    inv = (x[rows] - y[rows]).square().mean()
    return lam * inv + mu * 0.5 * (ref_var(x, eps) + ref_var(y, eps)) + \
        nu * (ref_cov(x) + ref_cov(y))


def ref_match(a, b, k):
    """a (B, n, c), b (B, m, c): each row's nearest row of b (exact squared distances), the
    k rows with the closest neighbours by a stable sort."""
    d2 = (a[:, :, None] - b[:, None]).square().sum(-1)
    best, nn = d2.min(2)
    k = a.shape[1] if k is None or k == -1 or k > a.shape[1] else k
    order = torch.argsort(best, dim=1, stable=True)[:, :k]
    return order, nn.gather(1, order)


def pick(z, idx):
    """z[b, idx[b]] for every image b: (B, k, D)."""
    return z[torch.arange(z.shape[0])[:, None], idx]


def ref_vicregl(gvf, gvg, lvf, lvg, lam=25.0, mu=25.0, nu=1.0, alpha=0.75, eps=1e-4,
                nm=(20, 4), rows=slice(None)):
    """VICRegL; the invariance terms over the batch rows ``rows`` only (the per-rank terms
    of a distributed run), variances and covariances over the whole batch."""
    views, grids = list(gvf) + list(lvf), list(gvg) + list(lvg)
    G, V = len(gvf), len(views)
    ys = [y for y, _ in views]
    inv = [(ys[i][rows] - ys[j][rows]).square().mean() for i in range(G) for j in range(V)
           if j != i]
    glob = lam * sum(inv) / len(inv) + mu * sum(ref_var(y, eps) for y in ys) / V + \
        nu * sum(ref_cov(y) for y in ys) / V
    local = []
    for i in range(G):
        for j in range(V):
            if j == i:
                continue
            za, zb = views[i][1].flatten(1, 2), views[j][1].flatten(1, 2)
            ga, gb = grids[i].flatten(1, 2), grids[j].flatten(1, 2)
            total = 0
            for pa, pb in ((za, zb), (ga, gb)):
                ia, ca = ref_match(pa, pb, nm[0])
                ib, cb = ref_match(pb, pa, nm[1])
                total = total + 0.5 * (
                    ref_vicreg(pick(za, ia), pick(zb, ca), lam, mu, nu / 2, eps, rows)
                    + ref_vicreg(pick(zb, ib), pick(za, cb), lam, mu, nu / 2, eps, rows))
            local.append(total)
    return alpha * glob + (1 - alpha) * sum(local) / len(local)


def vicregl_data(B, Dg, Dl, ghw, lhw, G, L, c, seed):
    """Flat list of tensors: G + L global embeddings, then the local maps, then grids."""
    hws = [ghw] * G + [lhw] * L
    ys = [randn(B, Dg, seed=seed) + 0.6 * randn(B, Dg, seed=seed + 1 + v) for v in range(G + L)]
    zs = [randn(B, *hw, Dl, seed=seed + 40 + v) for v, hw in enumerate(hws)]
    gs = [randn(B, *hw, c, seed=seed + 80 + v) for v, hw in enumerate(hws)]
    return ys + zs + gs


def unflat(G, L, xs):
    V = G + L
    ys, zs, gs = xs[:V], xs[V:2 * V], xs[2 * V:]
    views = list(zip(ys, zs))
    return views[:G], gs[:G], views[G:], gs[G:]


VICREGL_CASES = [  # B, Dg, Dl, global hw, local hw, G, L, grid c, num_matches, dtypes
    (2, 32, 8, (7, 7), (4, 4), 2, 6, 2, (20, 4), DTYPES),           # lightly's test sizes
    # D = 1, 1 x 1 maps. Not in 16 bits: there, 1-D features collide and the distances tie
    # exactly; the order of tied matches (which decides their rank) is topk's own choice.
    (3, 1, 1, (2, 3), (1, 1), 2, 2, 2, (20, 4), [torch.float64, torch.float32]),
    (2, 257, 257, (3, 3), (2, 2), 2, 1, 3, (5, 2), [torch.float32, torch.bfloat16]),
    (17, 5, 6, (3, 2), (2, 2), 1, 2, 1, (None, -1), DTYPES),        # one global view
    (4, 6, 3, (2, 2), None, 3, 0, 2, (3, 2), [torch.float64, torch.float16]),  # no local
]


@pytest.mark.parametrize("B,Dg,Dl,ghw,lhw,G,L,c,nm,dtypes", VICREGL_CASES)
def test_vicregl(B, Dg, Dl, ghw, lhw, G, L, c, nm, dtypes):
    """Every dtype of the case; grids stay float64 (positions, not features)."""
    kw = dict(lambda_param=3.0, mu_param=2.0, nu_param=5.0, alpha=0.6, num_matches=nm)
    if B == 2 and Dg == 32:
        kw = {}  # the defaults
    xs = vicregl_data(B, Dg, Dl, ghw, lhw, G, L, c, seed=B + Dg + Dl)
    loss_fn = VICRegLLoss(**kw)
    ref_kw = {"lam": kw.get("lambda_param", 25.0), "mu": kw.get("mu_param", 25.0),
              "nu": kw.get("nu_param", 1.0), "alpha": kw.get("alpha", 0.75),
              "nm": kw.get("num_matches", (20, 4))}
    n_feat = 2 * (G + L)
    for dtype in dtypes:
        def ours(*t):
            gvf, gvg, lvf, lvg = unflat(G, L, t + tuple(xs[n_feat:]))
            return loss_fn(gvf, gvg, lvf or None, lvg or None)

        def ref(*t):
            return ref_vicregl(*unflat(G, L, t + tuple(xs[n_feat:])), **ref_kw)
        check(ours, ref, xs[:n_feat], dtype, f"VICRegLLoss {B, Dg, Dl, G, L} {dtype}")


def test_vicregl_same_tensor_twice_is_skipped():
    """lightly's rule: a pair of views holding the same tensor object is left out of the
    pairs (and of their count); equal values in distinct tensors are a pair (mse 0)."""
    xs = vicregl_data(3, 4, 3, (2, 2), (2, 2), 2, 1, 2, seed=5)
    ys, zs, gs = xs[:3], xs[3:6], xs[6:]
    first = (ys[0], zs[0])
    loss = VICRegLLoss()([first, first], [gs[0], gs[0]], [(ys[2], zs[2])], [gs[2]])
    # The pairs (0, 1) and (1, 0) are skipped: what is left is twice (view 0, the local
    # view), while the variance and covariance terms still average over the 3 views.
    y0, y2 = ys[0], ys[2]
    glob = 25 * (y0 - y2).square().mean() + 25 * (2 * ref_var(y0, 1e-4) + ref_var(y2, 1e-4)) \
        / 3 + (2 * ref_cov(y0) + ref_cov(y2)) / 3
    local = ref_vicregl([first], [gs[0]], [(y2, zs[2])], [gs[2]], alpha=0.0)
    torch.testing.assert_close(loss, 0.75 * glob + 0.25 * local, rtol=1e-12, atol=0)
    copy = (ys[0].clone(), zs[0].clone())
    both = VICRegLLoss()([first, copy], [gs[0], gs[0]], [(ys[2], zs[2])], [gs[2]])
    ref = ref_vicregl([first, copy], [gs[0], gs[0]], [(ys[2], zs[2])], [gs[2]])
    torch.testing.assert_close(both, ref, rtol=1e-12, atol=0)


def test_vicregl_private_terms_and_vicreg_loss():
    """lightly's ``_global_loss`` and ``_local_loss`` (its tests call them) add up to the
    loss; the local weights are ``vicreg_loss``'s (nu halved)."""
    xs = vicregl_data(4, 6, 5, (3, 3), (2, 2), 2, 2, 2, seed=9)
    gvf, gvg, lvf, lvg = unflat(2, 2, xs)
    loss_fn = VICRegLLoss(alpha=0.3, nu_param=4.0)
    assert loss_fn.vicreg_loss.nu_param == 2.0 and loss_fn.vicreg_loss.lambda_param == 25.0
    g = loss_fn._global_loss(global_view_features=gvf, local_view_features=lvf)
    loc = loss_fn._local_loss(gvf, gvg, lvf, lvg)
    ref_g = ref_vicregl(gvf, gvg, lvf, lvg, nu=4.0, alpha=1.0)
    ref_l = ref_vicregl(gvf, gvg, lvf, lvg, nu=4.0, alpha=0.0)
    torch.testing.assert_close(g, ref_g, rtol=1e-12, atol=0)
    torch.testing.assert_close(loc, ref_l, rtol=1e-12, atol=0)
    torch.testing.assert_close(loss_fn(gvf, gvg, lvf, lvg), 0.3 * g + 0.7 * loc, rtol=1e-12,
                               atol=0)


def test_vicregl_non_contiguous_and_deterministic():
    xs = [x.float() for x in vicregl_data(5, 6, 4, (3, 3), (2, 2), 2, 2, 2, seed=3)]
    nc = [x.transpose(0, -1).contiguous().transpose(0, -1) for x in xs]
    assert not nc[0].is_contiguous()
    loss_fn = VICRegLLoss()
    a = loss_fn(*unflat(2, 2, xs))
    torch.testing.assert_close(loss_fn(*unflat(2, 2, nc)), a, rtol=1e-6, atol=0)
    assert torch.equal(loss_fn(*unflat(2, 2, xs)), a)


# ----------------------------------------------------------------------------- PKA

def ref_pka(s, t, mask=None, index=None, eps=1e-6):
    """Per image: the valid tokens (after the ``index`` subsample), K = Z Z^T, H = I - 11^T/n,
    CKA of H K_s H and H K_t H with lightly's floor; the mean over images with n >= 2."""
    t = t.detach()
    B, N, _ = s.shape
    valid = torch.ones(B, N, dtype=torch.bool) if mask is None else ~mask
    losses = []
    for b in range(B):
        keep = index[b] if index is not None else torch.arange(N)
        keep = keep[valid[b, keep]]
        n = len(keep)
        if n < 2:
            continue
        H = torch.eye(n, dtype=s.dtype) - 1.0 / n
        ks = H @ s[b, keep] @ s[b, keep].T @ H
        kt = H @ t[b, keep] @ t[b, keep].T @ H
        cka = (ks * kt).sum() / (torch.sqrt((ks * ks).sum().clamp_min(eps))
                                 * torch.sqrt((kt * kt).sum().clamp_min(eps)))
        losses.append(1 - cka)
    return torch.stack(losses).mean() if losses else (s * 0).sum()


def lightly_draw(B, N, mask, max_tokens, seed):
    """The tokens lightly keeps after torch.manual_seed(seed): the max_tokens smallest
    uniform scores, ignored tokens scored +inf."""
    torch.manual_seed(seed)
    scores = torch.rand(B, N)
    if mask is not None:
        scores = scores.masked_fill(mask, float("inf"))
    return scores.topk(max_tokens, dim=1, largest=False).indices


PKA_CASES = [  # B, N, D, mask probability, max_tokens
    (3, 16, 8, None, None), (1, 3, 1, None, None), (2, 7, 257, 0.3, None),
    (4, 40, 3, 0.5, 9), (2, 30, 130, None, 12), (3, 5, 2, 0.6, None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,p,max_tokens", PKA_CASES)
def test_pka(B, N, D, p, max_tokens, dtype):
    """Both formulations (D x D cross-products for 3D < 2N, else N x N kernels), masks, the
    seeded subsample; the teacher shares a component with the student (CKA away from 0)."""
    s = randn(B, N, D, seed=N + D) + 0.3
    t = s @ randn(D, D, seed=2) / D ** 0.5 + 0.7 * randn(B, N, D, seed=3)
    mask = None if p is None else torch.rand(B, N, generator=torch.Generator().manual_seed(4)) < p
    if mask is not None:
        mask[0, :2] = False  # image 0 keeps two valid tokens
    index = None if max_tokens is None else lightly_draw(B, N, mask, max_tokens, seed=7)
    loss_fn = PatchKernelAlignmentLoss(max_tokens)

    def ours(x, y):
        torch.manual_seed(7)
        return loss_fn(x, y, mask)
    check(ours, lambda x, y: ref_pka(x, y, mask, index), [s, t], dtype,
          f"PKA {B, N, D, p, max_tokens}", wrt=[0])


def test_pka_degenerate_images_and_no_image():
    """An image with fewer than two valid tokens does not count (a NaN among its ignored
    tokens does not propagate); with none left, a zero attached to the graph; identical
    features give 0; the loss is invariant to a scale of 2^100 (no overflow in float32)."""
    s, t = randn(3, 6, 4, seed=1).float(), randn(3, 6, 4, seed=2).float()
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1, 1:] = True
    s_nan = s.clone()
    s_nan[1, 3] = float("nan")
    loss = PatchKernelAlignmentLoss()(s_nan, t, mask)
    torch.testing.assert_close(loss, ref_pka(s.double(), t.double(), mask).float(),
                               rtol=1e-5, atol=0)
    x = s.clone().requires_grad_()
    zero = PatchKernelAlignmentLoss()(x, t, torch.ones(3, 6, dtype=torch.bool))
    assert zero == 0 and zero.requires_grad
    (g,) = torch.autograd.grad(zero, x)
    assert torch.equal(g, torch.zeros_like(g))
    assert abs(float(PatchKernelAlignmentLoss()(s, s.clone()))) < 1e-6
    # two tokens: both centred kernels are a [[1, -1], [-1, 1]], so CKA = 1 whatever they are
    assert abs(float(PatchKernelAlignmentLoss()(s[:, :2], t[:, :2]))) < 1e-6
    big = PatchKernelAlignmentLoss()(s * 2.0 ** 100, t * 2.0 ** 100)
    torch.testing.assert_close(big, PatchKernelAlignmentLoss()(s, t), rtol=1e-5, atol=0)
    const = PatchKernelAlignmentLoss()(torch.ones(2, 5, 3), randn(2, 5, 3, seed=4).float())
    assert const == 1.0  # HSIC(s, s) = 0 < the floor: CKA 0


def test_pka_mixed_dtypes_and_no_subsample():
    """A bfloat16 student with a float32 teacher computes in float32 (the loss in bfloat16);
    max_tokens >= N draws nothing from the generator."""
    s, t = randn(2, 9, 5, seed=1), randn(2, 9, 5, seed=2)
    loss = PatchKernelAlignmentLoss()(s.bfloat16(), t.float())
    assert loss.dtype == torch.bfloat16
    assert rel(loss, ref_pka(s.bfloat16().double(), t.float().double())) <= 2 ** -7
    torch.manual_seed(3)
    PatchKernelAlignmentLoss(max_tokens=9)(s, t)
    after = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(1))


# ----------------------------------------------------------------------------- ROI

def ref_bilinear(fm, y, x):
    """torchvision's bilinear sample of the (C, H, W) map at (y, x) (0 outside [-1, H]x[-1, W],
    clamped to the border cells inside)."""
    C, H, W = fm.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return fm.new_zeros(C)
    y, x = max(y, 0.0), max(x, 0.0)
    yl, xl = int(y), int(x)
    if yl >= H - 1:
        yl = yh = H - 1
        y = float(yl)
    else:
        yh = yl + 1
    if xl >= W - 1:
        xl = xh = W - 1
        x = float(xl)
    else:
        xh = xl + 1
    ly, lx = y - yl, x - xl
    return (1 - ly) * (1 - lx) * fm[:, yl, xl] + (1 - ly) * lx * fm[:, yl, xh] + \
        ly * (1 - lx) * fm[:, yh, xl] + ly * lx * fm[:, yh, xh]


def ref_roi(fm, boxes, oh, ow):
    """roi_align(aligned=True, adaptive sampling), one box, bin and sample at a time."""
    B, C, H, W = fm.shape
    out = []
    for b in range(B):
        x0, y0, x1, y1 = [float(v) for v in boxes[b]]
        sx, sy = x0 - 0.5, y0 - 0.5
        rw, rh = (x1 - 0.5) - sx, (y1 - 0.5) - sy
        bw, bh = rw / ow, rh / oh
        gw, gh = max(math.ceil(rw / ow), 0), max(math.ceil(rh / oh), 0)
        cells = []
        for ph in range(oh):
            for pw in range(ow):
                acc = fm.new_zeros(C)
                for iy in range(gh):
                    for ix in range(gw):
                        y = sy + ph * bh + (iy + 0.5) * bh / gh
                        x = sx + pw * bw + (ix + 0.5) * bw / gw
                        acc = acc + ref_bilinear(fm[b], y, x)
                cells.append(acc / max(gh * gw, 1))
        out.append(torch.stack(cells))
    return torch.stack(out)


BOXES = [[0.0, 0.0, 11.0, 9.0], [1.3, 2.2, 7.7, 5.1], [-3.0, -2.0, 14.0, 12.5],
         [4.0, 4.0, 4.0, 6.0], [6.0, 5.0, 2.0, 1.0], [9.6, 7.7, 10.9, 8.9]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("oh,ow", [(4, 3), (1, 1), (7, 7)])
def test_roi_resample_to_grid(oh, ow, dtype):
    """Boxes inside, fractional, beyond the map (more samples than cells), empty, inverted
    and at the far border; the output through a random weighting, so the gradient is
    checked too."""
    fm = randn(6, 5, 9, 11, seed=oh)
    boxes = torch.tensor(BOXES, dtype=torch.float64).to(dtype).double()
    weight = randn(6, oh * ow, 5, seed=2)
    check(lambda f: (roi_resample_to_grid(f, boxes.to(f.dtype), oh, ow).double()
                     * weight).sum().to(f.dtype),
          lambda f: (ref_roi(f, boxes, oh, ow).double() * weight).sum(), [fm], dtype,
          f"roi_resample_to_grid {oh, ow}")


def test_roi_subregion_is_the_crop():
    fm = randn(2, 3, 6, 6, seed=1).float()
    out = roi_resample_to_grid(fm, torch.tensor([[0.0, 0.0, 3.0, 3.0], [2.0, 1.0, 6.0, 5.0]]),
                               3, 3)
    assert out.shape == (2, 9, 3)
    torch.testing.assert_close(out[0].T.reshape(3, 3, 3), fm[0, :, :3, :3])
    # a 4 x 4 box onto 3 x 3: two samples per bin, the bilinear average
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- matching

def test_nearest_neighbors():
    a, b = randn(3, 7, 4, seed=1), randn(3, 5, 4, seed=2)
    d = torch.cdist(a, b)
    for k in (3, 7, 20, None, -1):
        fa, fb = nearest_neighbors(a, b, d, k)
        idx, nn = ref_match(a, b, k)
        assert torch.equal(fa, pick(a, idx)) and torch.equal(fb, pick(b, nn)), k


# ----------------------------------------------------------------------------- errors

def r32(*shape):
    return torch.randn(*shape)


def views(n, B=2, hw=(3, 3), Dg=8, Dl=4):
    return [(r32(B, Dg), r32(B, *hw, Dl)) for _ in range(n)], [r32(B, *hw, 2) for _ in range(n)]


GV, GG = views(2)
LV, LG = views(2, hw=(2, 2))

ERRORS = [
    (lambda: VICRegLLoss()(GV, GG[:1]), ValueError,
     "global_view_features and global_view_grids must have same length but found 2 and 1."),
    (lambda: VICRegLLoss()([], [], LV, LG[:1]), ValueError,
     "local_view_features and local_view_grids must have same length but found 2 and 1."),
    (lambda: VICRegLLoss()([], [], LV, None), ValueError,
     "must either both be set or None but found <class 'list'> and <class 'NoneType'>."),
    (lambda: VICRegLLoss()([], []), ShapeError, "at least one global view"),
    (lambda: VICRegLLoss()(GV[:1], GG[:1]), ShapeError, "two views or more"),
    (lambda: VICRegLLoss()([GV[0], GV[0]], GG), ShapeError, "two views or more"),
    (lambda: VICRegLLoss()([GV[0], (GV[1][0], GV[0][1])], GG), ShapeError, "distinct local"),
    (lambda: VICRegLLoss()(*views(2, B=1)), AssertionError, "at least 2 samples"),
    (lambda: VICRegLLoss()([GV[0], (r32(2, 7), GV[1][1])], GG), ShapeError, "shape"),
    (lambda: VICRegLLoss()([GV[0], (GV[1][0], r32(2, 9, 4))], GG), ShapeError, "height"),
    (lambda: VICRegLLoss()([GV[0], (GV[1][0], r32(2, 3, 3, 5))], GG), ShapeError, "dim 4"),
    (lambda: VICRegLLoss()(GV, [GG[0], r32(2, 3, 2, 2)]), ShapeError, "global_view_grids"),
    (lambda: VICRegLLoss()(GV, [GG[0], r32(2, 3, 3, 3)]), ShapeError, "coordinates"),
    (lambda: VICRegLLoss()(GV, GG, LV, [LG[0], r32(2, 3, 3, 2)]), ShapeError,
     "local_view_grids"),
    (lambda: VICRegLLoss()([GV[0], (GV[1][0].long(), GV[1][1])], GG), ValueError, "floating"),
    (lambda: VICRegLLoss()([GV[0], GV[1][0]], GG), TypeError, "pair"),
    (lambda: VICRegLLoss()([GV[0], (GV[1][0],)], GG), ValueError, "pair"),
    (lambda: VICRegLLoss()(r32(2, 2), GG), TypeError, "sequence"),
    (lambda: VICRegLLoss(num_matches=(0, 4)), ValueError, "num_matches"),
    (lambda: VICRegLLoss(num_matches=(1, 2, 3)), TypeError, "num_matches"),
    (lambda: VICRegLLoss(num_matches=(1.5, 2)), TypeError, "num_matches"),
    (lambda: VICRegLLoss(alpha="x"), TypeError, "alpha"),
    (lambda: VICRegLLoss(eps=-1.0), ValueError, "eps"),
    (lambda: VICRegLLoss(gather_distributed=2), TypeError, "gather_distributed"),
    (lambda: PatchKernelAlignmentLoss(max_tokens=1), ValueError, "max_tokens must be >= 2"),
    (lambda: PatchKernelAlignmentLoss(max_tokens="8"), TypeError, "max_tokens"),
    (lambda: PatchKernelAlignmentLoss()(r32(4, 8), r32(4, 8)), ValueError, "(B, N, D)"),
    (lambda: PatchKernelAlignmentLoss()(r32(2, 4, 8), r32(2, 4, 6)), ValueError,
     "same shape"),
    (lambda: PatchKernelAlignmentLoss()(r32(2, 4, 8), r32(2, 4, 8), torch.ones(2, 3) > 0),
     ValueError, "mask must have shape"),
    (lambda: PatchKernelAlignmentLoss()(r32(2, 4, 8), r32(2, 4, 8), torch.ones(2, 4)),
     ValueError, "torch.bool"),
    (lambda: PatchKernelAlignmentLoss()(r32(2, 4, 8).long(), r32(2, 4, 8)), ValueError,
     "floating"),
    (lambda: roi_resample_to_grid(r32(2, 3, 4), r32(2, 4), 2, 2), ValueError, "(B, C, H, W)"),
    (lambda: roi_resample_to_grid(r32(2, 3, 4, 4), r32(2, 3), 2, 2), ValueError, "(B, 4)"),
    (lambda: roi_resample_to_grid(r32(2, 3, 4, 4), r32(3, 4), 2, 2), ValueError, "batch size"),
    (lambda: roi_resample_to_grid(r32(2, 3, 4, 4), r32(2, 4), 0, 2), ValueError, "out_h"),
    (lambda: nearest_neighbors(r32(2, 3, 4), r32(2, 5, 4), r32(2, 5, 3), 2), ValueError,
     "distances"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_bad_arguments(i):
    call, kind, match = ERRORS[i]
    with pytest.raises(kind, match=match.replace("(", "\\(").replace(")", "\\)")):
        call()


def test_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed"):
        VICRegLLoss(gather_distributed=True)


def test_meta_device():
    """Shapes and dtypes on the meta device (nothing read back to the host)."""
    meta = torch.device("meta")
    gvf = [(torch.empty(3, 8, device=meta), torch.empty(3, 3, 3, 4, device=meta))
           for _ in range(2)]
    gvg = [torch.empty(3, 3, 3, 2, device=meta) for _ in range(2)]
    assert VICRegLLoss()(gvf, gvg).shape == ()
    s = torch.empty(2, 9, 5, device=meta, dtype=torch.bfloat16)
    assert PatchKernelAlignmentLoss(4)(s, s, torch.empty(2, 9, dtype=torch.bool,
                                                          device=meta)).dtype == torch.bfloat16
    out = roi_resample_to_grid(torch.empty(2, 3, 5, 5, device=meta), torch.empty(2, 4,
                                                                                 device=meta),
                               2, 4)
    assert out.shape == (2, 8, 3) and out.device == meta


# ----------------------------------------------------------------------------- distributed

SIZES = [3, 2]  # ranks with different batch sizes
DIST_VIEWS = (2, 1)  # global, local


def dist_inputs():
    return vicregl_data(sum(SIZES), 5, 4, (3, 3), (2, 2), *DIST_VIEWS, 2, seed=11)


def vicregl_worker(rank, world):
    o, n = sum(SIZES[:rank]), SIZES[rank]
    xs = [x[o:o + n].clone().requires_grad_() for x in dist_inputs()]
    loss = VICRegLLoss(gather_distributed=True, num_matches=(5, 2))(
        *unflat(*DIST_VIEWS, xs))
    grads = torch.autograd.grad(loss, xs[:2 * sum(DIST_VIEWS)])
    return loss.detach(), grads


def test_vicregl_gather_distributed_two_processes():
    """2 gloo ranks of 3 and 2 samples: rank r's loss is VICRegL with its own invariance
    terms and the variance / covariance terms of the global batch (the matching is per
    image, so the global batch's matches are the ranks' matches), and its input gradients
    are world_size times those of J = mean_r loss_r (fastssl.distributed's convention)."""
    world = len(SIZES)
    results = _gloo.run(vicregl_worker, world, timeout=60, what="distributed VICRegL",
                        group_timeout=30)
    xs = [x.requires_grad_() for x in dist_inputs()]
    n_feat = 2 * sum(DIST_VIEWS)
    per_rank = [ref_vicregl(*unflat(*DIST_VIEWS, xs), nm=(5, 2),
                            rows=slice(sum(SIZES[:r]), sum(SIZES[:r + 1])))
                for r in range(world)]
    ref_grads = torch.autograd.grad(sum(per_rank) / world, xs[:n_feat])
    for r in range(world):
        o, n = sum(SIZES[:r]), SIZES[r]
        loss, grads = results[r]
        assert rel(loss, per_rank[r]) <= 1e-12, r
        for g, gr in zip(grads, ref_grads):
            assert rel(g, world * gr[o:o + n]) <= 1e-12, r
