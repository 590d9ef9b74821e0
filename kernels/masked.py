"""Masked-patch reconstruction loss kernels: the target patches are read straight from the
image tensor; no patchified copy and no float32 target tensor is ever stored.

Images (N, C, H, W) (uint8 or floating, any strides) with patch size p give L = (H/p)(W/p)
patches of P = p*p*C values, element e = (py p + px) C + c inside a patch (channel fastest,
MAE's ``patchify`` order), patch l = hy (W/p) + wx. Row r = n L + l of the flattened batch
has a weight w_r (the mask: 0 skips the row) and ``prow_r``, the row of ``pred`` (R x P)
that predicts it (-1: none). With ``norm_pix`` the target is t' = (t - mu_r) / sqrt(var_r +
eps) (mean and unbiased variance over the patch's P values, two passes), else t' = t. With
d = pred - t' the per-row loss is

    mse:        ell_r = mean_e d^2
    l1:         ell_r = mean_e |d|
    smooth_l1:  ell_r = mean_e (0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta)

``forward`` writes ell_r and the row statistics (mu_r, rstd_r) (float32; rows with w_r = 0
or prow_r < 0 are skipped: 0, and never read). ``backward`` recomputes t' from the
statistics and writes d ell_r / d pred times a per-row coefficient g_r into the rows of
the gradient (pred's dtype). One program per block of BR rows, a loop over P in chunks of
BP: each program owns its rows, so results are bitwise reproducible.
"""
import torch
import triton
import triton.language as tl

from .infonce import _launch_opts, _TY

LOSSES = {"mse": 0, "l1": 1, "smooth_l1": 2}


@triton.jit
def _addresses(rows, ee, L, Wp, C, p, s_n, s_c, s_h, s_w):
    """Offsets into the image of elements ee of the patches of ``rows`` ([BR, BP]): the
    image's offset in int64 per row, the offset inside an image in int32 (the launcher
    checks that one image spans < 2^31 elements)."""
    n = rows // L
    l = (rows % L).to(tl.int32)
    hy = l // Wp
    wx = l % Wp
    pc = p * C
    py = ee // pc
    rem = ee % pc
    px = rem // C
    c = rem % C
    inner = (c[None, :] * s_c + (hy[:, None] * p + py[None, :]) * s_h
             + (wx[:, None] * p + px[None, :]) * s_w)
    return (n * s_n)[:, None] + inner


@triton.jit
def _elem_loss(d, beta, kind):
    a = tl.abs(d)
    smooth = tl.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta)
    return tl.where(kind == 0, d * d, tl.where(kind == 1, a, smooth))


@triton.jit
def _elem_grad(d, beta, kind):
    sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    smooth = tl.where(tl.abs(d) < beta, d / beta, sign)
    return tl.where(kind == 0, 2.0 * d, tl.where(kind == 1, sign, smooth))


@triton.jit
def _rows(W, PROW, R, BR: tl.constexpr):
    """This program's rows, the pred row of each and which are scored."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    in_range = rows < R
    w = tl.load(W + rows, mask=in_range, other=0.0)
    prow = tl.load(PROW + rows, mask=in_range, other=-1)
    return rows, in_range, prow, in_range & (w != 0) & (prow >= 0)


@triton.jit
def _target(IMG, rows, active, e0, L, Wp, C, p, P, s_n, s_c, s_h, s_w, BP: tl.constexpr):
    """(elements ee, their mask, the target values t in float32) of one P chunk."""
    ee = e0 + tl.arange(0, BP)
    ok = active[:, None] & (ee < P)[None, :]
    t = tl.load(IMG + _addresses(rows, ee, L, Wp, C, p, s_n, s_c, s_h, s_w), mask=ok,
                other=0).to(tl.float32)
    return ee, ok, t


@triton.jit
def _stats(IMG, rows, active, L, Wp, C, p, P, s_n, s_c, s_h, s_w, eps,
           BR: tl.constexpr, BP: tl.constexpr):
    """(mean, 1 / sqrt(unbiased var + eps)) of each row's target patch, two passes."""
    total = tl.zeros([BR], dtype=tl.float32)
    for e0 in range(0, P, BP):
        ee, ok, t = _target(IMG, rows, active, e0, L, Wp, C, p, P, s_n, s_c, s_h, s_w, BP)
        total += tl.sum(t, 1)
    mu = total / P
    ss = tl.zeros([BR], dtype=tl.float32)
    for e0 in range(0, P, BP):
        ee, ok, t = _target(IMG, rows, active, e0, L, Wp, C, p, P, s_n, s_c, s_h, s_w, BP)
        dt = tl.where(ok, t - mu[:, None], 0.0)
        ss += tl.sum(dt * dt, 1)
    return mu, 1.0 / tl.sqrt(ss / (P - 1) + eps)


@triton.jit
def _fwd_kernel(PRED, IMG, W, PROW, ELL, ST, R, L, Wp, C, p, P, s_pr, s_pe,
                s_n, s_c, s_h, s_w, eps, beta, norm, kind,
                BR: tl.constexpr, BP: tl.constexpr):
    rows, in_range, prow, active = _rows(W, PROW, R, BR)
    mu = tl.zeros([BR], dtype=tl.float32)
    rstd = tl.full([BR], 1.0, dtype=tl.float32)
    if norm != 0:
        mu, rstd = _stats(IMG, rows, active, L, Wp, C, p, P, s_n, s_c, s_h, s_w, eps, BR, BP)
    acc = tl.zeros([BR], dtype=tl.float32)
    for e0 in range(0, P, BP):
        ee, ok, t = _target(IMG, rows, active, e0, L, Wp, C, p, P, s_n, s_c, s_h, s_w, BP)
        x = tl.load(PRED + prow[:, None] * s_pr + ee[None, :] * s_pe, mask=ok,
                    other=0).to(tl.float32)
        d = tl.where(ok, x - (t - mu[:, None]) * rstd[:, None], 0.0)
        acc += tl.sum(_elem_loss(d, beta, kind), 1)
    tl.store(ELL + rows, tl.where(active, acc / P, 0.0), mask=in_range)
    tl.store(ST + 2 * rows, mu, mask=in_range)
    tl.store(ST + 2 * rows + 1, rstd, mask=in_range)


@triton.jit
def _bwd_kernel(PRED, IMG, W, PROW, ST, G, DPRED, R, L, Wp, C, p, P, s_pr, s_pe,
                s_dr, s_de, s_n, s_c, s_h, s_w, beta, kind,
                BR: tl.constexpr, BP: tl.constexpr):
    rows, in_range, prow, active = _rows(W, PROW, R, BR)
    mu = tl.load(ST + 2 * rows, mask=active, other=0.0)
    rstd = tl.load(ST + 2 * rows + 1, mask=active, other=1.0)
    g = tl.load(G + rows, mask=active, other=0.0) / P
    for e0 in range(0, P, BP):
        ee, ok, t = _target(IMG, rows, active, e0, L, Wp, C, p, P, s_n, s_c, s_h, s_w, BP)
        x = tl.load(PRED + prow[:, None] * s_pr + ee[None, :] * s_pe, mask=ok,
                    other=0).to(tl.float32)
        d = x - (t - mu[:, None]) * rstd[:, None]
        dx = _elem_grad(d, beta, kind) * g[:, None]
        tl.store(DPRED + prow[:, None] * s_dr + ee[None, :] * s_de, dx, mask=ok)


BLOCK = dict(BR=16, BP=128, num_warps=8, num_stages=1)  # 2048 values, 8 per thread


def _geometry(images, p):
    N, C, H, W = images.shape
    span = sum((d - 1) * abs(st) for d, st in zip((C, H, W), images.stride()[1:]))
    if span >= 2 ** 31:
        raise ValueError(f"one image spans {span} elements; the masked-patch kernels index "
                         "inside an image in int32 (< 2^31)")
    return N, C, (H // p) * (W // p), W // p, p * p * C


def _image(images, pred):
    """uint8, float32 and pred-dtype images are read as they are (a float32 batch beside
    16-bit predictions -- autocast -- keeps its precision); other floating images are read
    in pred's dtype (one copy)."""
    if images.dtype in (torch.uint8, torch.float32, pred.dtype):
        return images
    return images.to(pred.dtype)


def forward(pred, images, weight, prow, p, norm_pix, loss, beta, eps):
    """(ell (R,) float32, stats (R, 2) float32): see the module docstring. ``pred`` is
    (rows, P); ``weight`` and ``prow`` have one entry per patch of the batch."""
    N, C, L, Wp, P = _geometry(images, p)
    R = N * L
    ell = torch.zeros(R, device=pred.device, dtype=torch.float32)
    st = torch.zeros(R, 2, device=pred.device, dtype=torch.float32)
    if R == 0:
        return ell, st
    img = _image(images, pred)
    _fwd_kernel[(triton.cdiv(R, BLOCK["BR"]),)](
        pred, img, weight.to(torch.float32).contiguous(), prow.contiguous(), ell, st,
        R, L, Wp, C, p, P, *pred.stride(), *img.stride(), float(eps), float(beta),
        int(bool(norm_pix)), LOSSES[loss], BR=BLOCK["BR"], BP=BLOCK["BP"], **_launch_opts(BLOCK))
    return ell, st


def backward(pred, images, weight, prow, p, norm_pix, loss, beta, stats, coef):
    """d (sum_r coef_r ell_r) / d pred, (rows, P) in pred's dtype (zero where no row
    predicts a weighted patch). ``stats`` are the forward's (mean 0 and rstd 1 without
    norm_pix)."""
    N, C, L, Wp, P = _geometry(images, p)
    R = N * L
    d = torch.zeros_like(pred, memory_format=torch.contiguous_format)
    if R == 0:
        return d
    img = _image(images, pred)
    _bwd_kernel[(triton.cdiv(R, BLOCK["BR"]),)](
        pred, img, weight.to(torch.float32).contiguous(), prow.contiguous(),
        stats.to(torch.float32).contiguous(), coef.to(torch.float32).contiguous(), d,
        R, L, Wp, C, p, P, *pred.stride(), *d.stride(), *img.stride(), float(beta),
        LOSSES[loss], BR=BLOCK["BR"], BP=BLOCK["BP"], **_launch_opts(BLOCK))
    return d


def shipped_configs():
    """Every (kernel, signature, constexprs, options) the launchers can use on a GPU: one
    per pred dtype and image pointer (uint8, float32, or pred's dtype); the loss form and
    norm_pix are runtime arguments."""
    out = []
    ints = ("R", "L", "Wp", "C", "p", "P", "s_pr", "s_pe")
    img_ints = ("s_n", "s_c", "s_h", "s_w")
    ce = dict(BR=BLOCK["BR"], BP=BLOCK["BP"])
    for ty in _TY.values():
        for img in dict.fromkeys(("*u8", "*fp32", ty)):
            sig = {"PRED": ty, "IMG": img, "W": "*fp32", "PROW": "*i64", "ELL": "*fp32",
                   "ST": "*fp32", **{a: "i32" for a in ints + img_ints},
                   "eps": "fp32", "beta": "fp32", "norm": "i32", "kind": "i32"}
            out.append((_fwd_kernel, sig, ce, BLOCK))
            sig = {"PRED": ty, "IMG": img, "W": "*fp32", "PROW": "*i64", "ST": "*fp32",
                   "G": "*fp32", "DPRED": ty, **{a: "i32" for a in ints + ("s_dr", "s_de")},
                   **{a: "i32" for a in img_ints}, "beta": "fp32", "kind": "i32"}
            out.append((_bwd_kernel, sig, ce, BLOCK))
    return out
