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

Latent targets (I-JEPA, data2vec). The teacher's tokens are K layers t_k (K, N, L, D), any
dtype and strides. Pair j scores pred row ``prow_j`` against token ``trow_j = n L + l`` (with
a weight w_j: 0 skips the pair). The target is

    y = (1/K) sum_k a_k,   a_k = (t_k[n, l] - m_kn) r_kn  with instance_norm, else t_k[n, l]
    y' = (y - mu_j) rstd_j  with layer_norm (mean and biased variance over D, two passes),
                            else y' = y

where m_kn, r_kn = 1 / sqrt(biased var + eps) are per channel over the L tokens of layer k
of image n (``latent_stats``: one program per (k, n) and block of BD channels, a loop over L
in blocks of BL, two passes). With d = pred - y' the pair loss is ell_j = sum_d l(d) / s
(l as above, s the ``scale``). ``latent_forward`` writes ell_j and (mu_j, rstd_j);
``latent_backward`` recomputes y' and writes dl/dd / s times a per-pair coefficient into
the pred rows (each pair owns its pred row: no atomics). One program per BR pairs, loops
over D in chunks of BD and, inside, over the K layers: no normalised target, difference or
float32 copy of the targets is stored.
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
    norm_pix are runtime arguments. Then the latent-target kernels' (``_latent_configs``)."""
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
    return out + _latent_configs()


# ----------------------------------------------------------------------------- latent targets

@triton.jit
def _pairs(W, PROW, TROW, Q, L, BR: tl.constexpr):
    """This program's pairs: (ids, in range, pred row, image n, token l, scored)."""
    j = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR).to(tl.int64)
    in_range = j < Q
    w = tl.load(W + j, mask=in_range, other=0.0)
    prow = tl.load(PROW + j, mask=in_range, other=-1)
    trow = tl.load(TROW + j, mask=in_range, other=0)
    return j, in_range, prow, trow // L, trow % L, in_range & (w != 0) & (prow >= 0)


@triton.jit
def _latent_chunk(TGT, MEAN, RSTD, n, l, active, d0, K, N, D, s_k, s_n, s_l, s_d, inorm,
                  BR: tl.constexpr, BD: tl.constexpr):
    """(channels dd, their mask, y in float32) of one D chunk: the mean over the K layers of
    the target rows (n, l), each instance-normalised first where ``inorm``."""
    dd = d0 + tl.arange(0, BD)
    ok = active[:, None] & (dd < D)[None, :]
    row = (n * s_n + l * s_l)[:, None] + (dd * s_d)[None, :]
    st = n.to(tl.int32)[:, None] * D + dd[None, :]  # the launcher checks N D < 2^31
    y = tl.zeros([BR, BD], dtype=tl.float32)
    tk, mk, rk = TGT, MEAN, RSTD
    for k in range(K):
        a = tl.load(tk + row, mask=ok, other=0).to(tl.float32)
        if inorm != 0:
            a = (a - tl.load(mk + st, mask=ok, other=0.0)) * tl.load(rk + st, mask=ok, other=1.0)
        y += a
        tk += s_k
        mk += N * D
        rk += N * D
    return dd, ok, tl.where(ok, y / K, 0.0)


@triton.jit
def _ln_stats(TGT, MEAN, RSTD, n, l, active, K, N, D, s_k, s_n, s_l, s_d, inorm, eps,
              BR: tl.constexpr, BD: tl.constexpr):
    """(mean, 1 / sqrt(biased var + eps)) of each pair's y over D, two passes."""
    total = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd, ok, y = _latent_chunk(TGT, MEAN, RSTD, n, l, active, d0, K, N, D, s_k, s_n, s_l,
                                  s_d, inorm, BR, BD)
        total += tl.sum(y, 1)
    mu = total / D
    ss = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd, ok, y = _latent_chunk(TGT, MEAN, RSTD, n, l, active, d0, K, N, D, s_k, s_n, s_l,
                                  s_d, inorm, BR, BD)
        dy = tl.where(ok, y - mu[:, None], 0.0)
        ss += tl.sum(dy * dy, 1)
    return mu, 1.0 / tl.sqrt(ss / D + eps)


@triton.jit
def _latent_fwd_kernel(PRED, TGT, MEAN, RSTD, W, PROW, TROW, ELL, ST, Q, K, N, L, D,
                       s_pr, s_pd, s_k, s_n, s_l, s_d, eps, beta, scale, lnorm, inorm, kind,
                       BR: tl.constexpr, BD: tl.constexpr):
    j, in_range, prow, n, l, active = _pairs(W, PROW, TROW, Q, L, BR)
    mu = tl.zeros([BR], dtype=tl.float32)
    rstd = tl.full([BR], 1.0, dtype=tl.float32)
    if lnorm != 0:
        mu, rstd = _ln_stats(TGT, MEAN, RSTD, n, l, active, K, N, D, s_k, s_n, s_l, s_d,
                             inorm, eps, BR, BD)
    acc = tl.zeros([BR], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd, ok, y = _latent_chunk(TGT, MEAN, RSTD, n, l, active, d0, K, N, D, s_k, s_n, s_l,
                                  s_d, inorm, BR, BD)
        x = tl.load(PRED + prow[:, None] * s_pr + (dd * s_pd)[None, :], mask=ok,
                    other=0).to(tl.float32)
        d = tl.where(ok, x - (y - mu[:, None]) * rstd[:, None], 0.0)
        acc += tl.sum(_elem_loss(d, beta, kind), 1)
    tl.store(ELL + j, tl.where(active, acc / scale, 0.0), mask=in_range)
    tl.store(ST + 2 * j, mu, mask=in_range)
    tl.store(ST + 2 * j + 1, rstd, mask=in_range)


@triton.jit
def _latent_bwd_kernel(PRED, TGT, MEAN, RSTD, W, PROW, TROW, ST, G, DPRED, Q, K, N, L, D,
                       s_pr, s_pd, s_dr, s_dd, s_k, s_n, s_l, s_d, beta, scale, inorm, kind,
                       BR: tl.constexpr, BD: tl.constexpr):
    j, in_range, prow, n, l, active = _pairs(W, PROW, TROW, Q, L, BR)
    mu = tl.load(ST + 2 * j, mask=active, other=0.0)
    rstd = tl.load(ST + 2 * j + 1, mask=active, other=1.0)
    g = tl.load(G + j, mask=active, other=0.0) / scale
    for d0 in range(0, D, BD):
        dd, ok, y = _latent_chunk(TGT, MEAN, RSTD, n, l, active, d0, K, N, D, s_k, s_n, s_l,
                                  s_d, inorm, BR, BD)
        x = tl.load(PRED + prow[:, None] * s_pr + (dd * s_pd)[None, :], mask=ok,
                    other=0).to(tl.float32)
        d = x - (y - mu[:, None]) * rstd[:, None]
        dx = _elem_grad(d, beta, kind) * g[:, None]
        tl.store(DPRED + prow[:, None] * s_dr + (dd * s_dd)[None, :], dx, mask=ok)


@triton.jit
def _token_tile(base, l0, dd, dmask, L, s_l, s_d, BL: tl.constexpr):
    """(the [BL, BD] tile of tokens l0.. of one layer and image in float32, its mask)."""
    ll = l0 + tl.arange(0, BL)
    ok = (ll < L)[:, None] & dmask[None, :]
    t = tl.load(base + (ll.to(tl.int64) * s_l)[:, None] + (dd * s_d)[None, :], mask=ok, other=0)
    return t.to(tl.float32), ok


@triton.jit
def _inorm_stats_kernel(TGT, MEAN, RSTD, N, L, D, s_k, s_n, s_l, s_d, eps,
                        BL: tl.constexpr, BD: tl.constexpr):
    kn = tl.program_id(0).to(tl.int64)  # k N + n
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dmask = dd < D
    base = TGT + (kn // N) * s_k + (kn % N) * s_n
    total = tl.zeros([BD], dtype=tl.float32)
    for l0 in range(0, L, BL):
        t, ok = _token_tile(base, l0, dd, dmask, L, s_l, s_d, BL)
        total += tl.sum(t, 0)
    mu = total / L
    ss = tl.zeros([BD], dtype=tl.float32)
    for l0 in range(0, L, BL):
        t, ok = _token_tile(base, l0, dd, dmask, L, s_l, s_d, BL)
        dt = tl.where(ok, t - mu[None, :], 0.0)
        ss += tl.sum(dt * dt, 0)
    tl.store(MEAN + kn * D + dd, mu, mask=dmask)
    tl.store(RSTD + kn * D + dd, 1.0 / tl.sqrt(ss / L + eps), mask=dmask)


LATENT_BLOCK = dict(BR=8, BD=128, num_warps=8, num_stages=1)   # 1024 values, 4 per thread
STATS_BLOCK = dict(BL=16, BD=128, num_warps=4, num_stages=1)   # 2048 values, 16 per thread


def latent_stats(targets, eps):
    """(2, K, N, D) float32: the instance-norm mean and rstd of every layer, image and
    channel over the L tokens (``targets`` (K, N, L, D), L >= 1)."""
    K, N, L, D = targets.shape
    st = torch.empty(2, K, N, D, device=targets.device, dtype=torch.float32)
    if st.numel() == 0:
        return st
    cfg = STATS_BLOCK
    _inorm_stats_kernel[(K * N, triton.cdiv(D, cfg["BD"]))](
        targets, st[0], st[1], N, L, D, *targets.stride(), float(eps),
        BL=cfg["BL"], BD=cfg["BD"], **_launch_opts(cfg))
    return st


def _latent_geometry(targets):
    """(K, N, L, D), checking the int32 offsets inside a target row (the channel offsets)
    and inside one layer's statistics (n D + d)."""
    K, N, L, D = targets.shape
    if N * D >= 2 ** 31 or (D - 1) * abs(targets.stride(3)) >= 2 ** 31:
        raise ValueError(f"targets of shape {tuple(targets.shape)} and strides "
                         f"{targets.stride()}: the latent kernels index a target row and a "
                         "layer's (N, D) statistics in int32 (< 2^31)")
    return K, N, L, D


def _latent_args(targets, weight, prow, trow, inorm, dummy):
    """The launch arguments shared by both latent kernels, after the pred pointer (``dummy``
    stands for the statistics that are not read without instance_norm)."""
    mean, rstd = (inorm[0], inorm[1]) if inorm.numel() else (dummy, dummy)
    return (targets, mean, rstd, weight.to(torch.float32).contiguous(), prow.contiguous(),
            trow.contiguous())


def latent_forward(pred, targets, weight, prow, trow, loss, beta, layer_norm, instance_norm,
                   scale, eps):
    """(ell (Q,) float32, stats (Q, 2) float32 [mu, rstd], inorm (2, K, N, D) float32, or
    (0,) without instance_norm): see the module docstring. ``pred`` is (rows, D);
    ``targets`` (K, N, L, D); ``weight``, ``prow`` and ``trow`` have one entry per pair."""
    K, N, L, D = _latent_geometry(targets)
    Q = weight.shape[0]
    dev = pred.device
    inorm = latent_stats(targets, eps) if instance_norm else \
        torch.empty(0, device=dev, dtype=torch.float32)
    ell = torch.zeros(Q, device=dev, dtype=torch.float32)
    st = torch.zeros(Q, 2, device=dev, dtype=torch.float32)
    if Q == 0:
        return ell, st, inorm
    cfg = LATENT_BLOCK
    _latent_fwd_kernel[(triton.cdiv(Q, cfg["BR"]),)](
        pred, *_latent_args(targets, weight, prow, trow, inorm, ell), ell, st, Q, K, N, L, D,
        *pred.stride(), *targets.stride(), float(eps), float(beta), float(scale),
        int(bool(layer_norm)), int(bool(instance_norm)), LOSSES[loss],
        BR=cfg["BR"], BD=cfg["BD"], **_launch_opts(cfg))
    return ell, st, inorm


def latent_backward(pred, targets, weight, prow, trow, loss, beta, layer_norm, instance_norm,
                    scale, stats, inorm, coef):
    """d (sum_j coef_j ell_j) / d pred, (rows, D) in pred's dtype (zero in rows no scored
    pair predicts); ``stats`` and ``inorm`` are the forward's (``layer_norm`` is carried by
    the stats: mean 0 and rstd 1 without it)."""
    K, N, L, D = _latent_geometry(targets)
    Q = weight.shape[0]
    d = torch.zeros_like(pred, memory_format=torch.contiguous_format)
    if Q == 0:
        return d
    st = stats.to(torch.float32).contiguous()
    inorm = inorm.to(torch.float32) if instance_norm else inorm.new_empty(0)
    cfg = LATENT_BLOCK
    _latent_bwd_kernel[(triton.cdiv(Q, cfg["BR"]),)](
        pred, *_latent_args(targets, weight, prow, trow, inorm, st), st,
        coef.to(torch.float32).contiguous(), d, Q, K, N, L, D, *pred.stride(), *d.stride(),
        *targets.stride(), float(beta), float(scale), int(bool(instance_norm)), LOSSES[loss],
        BR=cfg["BR"], BD=cfg["BD"], **_launch_opts(cfg))
    return d


# (pred, targets) pointer pairs compiled ahead of time: targets in pred's dtype, and bf16
# teacher tokens (autocast) beside float32 predictions. Other floating targets are read as
# they are (compiled on first use).
LATENT_DTYPES = (("*fp32", "*fp32"), ("*fp32", "*bf16"), ("*bf16", "*bf16"), ("*fp16", "*fp16"))


def _latent_configs():
    out = []
    ints = ("Q", "K", "N", "L", "D", "s_pr", "s_pd")
    tgt_ints = ("s_k", "s_n", "s_l", "s_d")
    ce = dict(BR=LATENT_BLOCK["BR"], BD=LATENT_BLOCK["BD"])
    ptrs = {"MEAN": "*fp32", "RSTD": "*fp32", "W": "*fp32", "PROW": "*i64", "TROW": "*i64"}
    for ty, tgt in LATENT_DTYPES:
        sig = {"PRED": ty, "TGT": tgt, **ptrs, "ELL": "*fp32", "ST": "*fp32",
               **{a: "i32" for a in ints + tgt_ints}, "eps": "fp32", "beta": "fp32",
               "scale": "fp32", "lnorm": "i32", "inorm": "i32", "kind": "i32"}
        out.append((_latent_fwd_kernel, sig, ce, LATENT_BLOCK))
        sig = {"PRED": ty, "TGT": tgt, **ptrs, "ST": "*fp32", "G": "*fp32", "DPRED": ty,
               **{a: "i32" for a in ints + ("s_dr", "s_dd") + tgt_ints}, "beta": "fp32",
               "scale": "fp32", "inorm": "i32", "kind": "i32"}
        out.append((_latent_bwd_kernel, sig, ce, LATENT_BLOCK))
    for tgt in dict.fromkeys(t for _, t in LATENT_DTYPES):
        sig = {"TGT": tgt, "MEAN": "*fp32", "RSTD": "*fp32",
               **{a: "i32" for a in ("N", "L", "D") + tgt_ints}, "eps": "fp32"}
        out.append((_inorm_stats_kernel, sig, dict(BL=STATS_BLOCK["BL"], BD=STATS_BLOCK["BD"]),
                    STATS_BLOCK))
    return out
