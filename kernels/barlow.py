"""Kernels for the cross-correlation losses (Barlow Twins, VICReg).

Per-feature standardisation, fused (one program per block of features, looping over the
batch; no atomics):

    a = (z - mean) * rstd,   rstd = 1 / sqrt(var + eps)   (mean and biased var over N)
    dz = rstd * (da - mean(da) - a * mean(da * a))          (means over N)

The sums run on z / m, m = the feature's max |z| (found in the same pass as the sum), so
that no square overflows: mean = m mean(z / m), and rstd = (1/m) / sqrt(var' + eps / m^2)
for m >= 1, 1 / sqrt(m^2 var' + eps) below, var' the variance of z / m.

Gram products:

For A, B (N x D) the D x D cross-correlation satisfies ||A^T B||_F^2 = <A A^T, B B^T>, a
sum over N x N Gram tiles: O(N^2 D) work instead of O(N D^2), and no D x D (or N x N)
matrix in memory when N < D.

    gram_inner(A, B) = sum_ij (a_i . a_j)(b_i . b_j)
    gram_apply(W, X) = (W W^T) X,   so  d gram_inner / dA = 2 gram_apply(B, A)

``_gram_inner_kernel`` computes one (i, j) block pair of both Gram tiles (i <= j; the
mirror pairs count twice) and writes its partial sum; the partials are summed in a fixed
order (deterministic). ``_gram_apply_kernel`` walks column blocks j for a block of rows i
and a D chunk of the output. For N <= D it reads the W W^T tiles from the N x N float32
Gram matrix that ``_gram_kernel`` wrote once (no more elements than an input); for N > D it
recomputes each tile (flash-style), which repeats the tile work once per D chunk of the
output: ceil(D / BD) times, the cost that made N = 2,048, D = 8,192 take 40 ms on an H200
(benchmarks/NOTES.md).
"""
import torch
import triton
import triton.language as tl

from .infonce import _dot_tile, _interpret, _launch_opts, _precision, _TY, with_fp32_precisions


@triton.jit
def _gram_inner_kernel(A, B, PART, N, D, s_a0, s_a1, s_b0, s_b1,
                       BM: tl.constexpr, BK: tl.constexpr,
                       PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pi = tl.program_id(0)
    pj = tl.program_id(1)
    nb = tl.num_programs(0)
    if pj >= pi:
        ri = pi.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
        rj = pj.to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
        ga = _dot_tile(A, ri, N, s_a0, s_a1, A, rj, N, s_a0, s_a1, D, BM, BM, BK,
                       PRECISION, INTERPRET)
        gb = _dot_tile(B, ri, N, s_b0, s_b1, B, rj, N, s_b0, s_b1, D, BM, BM, BK,
                       PRECISION, INTERPRET)
        part = tl.sum(tl.sum(ga * gb, 1), 0)
        weight = tl.where(pj > pi, 2.0, 1.0)
        tl.store(PART + pi * nb + pj, part * weight)
    else:
        tl.store(PART + pi * nb + pj, 0.0)


@triton.jit
def _gram_kernel(W, G, N, D, s_w0, s_w1, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """One (BM x BN) float32 tile of G = W W^T (N x N, row-major)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN).to(tl.int64)
    g = _dot_tile(W, rows, N, s_w0, s_w1, W, cols, N, s_w0, s_w1, D, BM, BN, BK,
                  PRECISION, INTERPRET)
    tl.store(G + rows[:, None] * N + cols[None, :], g,
             mask=(rows < N)[:, None] & (cols < N)[None, :])


@triton.jit
def _gram_apply_kernel(W, X, G, OUT, N, D, s_w0, s_w1, s_x0, s_x1, s_o0, s_o1,
                       HAS_G: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                       PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = rows < N
    dd = pid_d * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = dd < D
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for c0 in range(0, N, BN):
        cols = c0 + tl.arange(0, BN).to(tl.int64)
        col_ok = cols < N
        if HAS_G:
            g = tl.load(G + rows[:, None] * N + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        else:
            g = _dot_tile(W, rows, N, s_w0, s_w1, W, cols, N, s_w0, s_w1, D, BM, BN, BK,
                          PRECISION, INTERPRET)
        x = tl.load(X + cols[:, None] * s_x0 + dd[None, :] * s_x1,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if INTERPRET:
            acc += tl.dot(g, x.to(tl.float32))
        else:
            acc = tl.dot(g.to(x.dtype), x, acc, input_precision=PRECISION)
    tl.store(OUT + rows[:, None] * s_o0 + dd[None, :] * s_o1, acc,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _standardize_kernel(Z, A, STATS, N, D, s_z0, s_z1, s_a0, s_a1, eps,
                        BN: tl.constexpr, BD: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BD + tl.arange(0, BD).to(tl.int64)
    c_ok = cols < D
    # Pass 1: the feature's max |z| (m) and sum of z / m together, the sum rescaled when
    # the running max grows, so that nothing overflows whatever the scale.
    m = tl.zeros([BD], dtype=tl.float32)
    total = tl.zeros([BD], dtype=tl.float32)
    for r0 in range(0, N, BN):
        rows = r0 + tl.arange(0, BN).to(tl.int64)
        ok = (rows < N)[:, None] & c_ok[None, :]
        z = tl.load(Z + rows[:, None] * s_z0 + cols[None, :] * s_z1, mask=ok,
                    other=0.0).to(tl.float32)
        m_new = tl.maximum(m, tl.max(tl.abs(z), 0))
        inv = 1.0 / tl.where(m_new > 0, m_new, 1.0)
        total = total * (m * inv) + tl.sum(z * inv[None, :], 0)
        m = m_new
    m = tl.where(m > 0, m, 1.0)
    inv_m = 1.0 / m
    mean_y = total / N
    sq = tl.zeros([BD], dtype=tl.float32)
    for r0 in range(0, N, BN):  # second pass: no cancellation for large means
        rows = r0 + tl.arange(0, BN).to(tl.int64)
        ok = (rows < N)[:, None] & c_ok[None, :]
        z = tl.load(Z + rows[:, None] * s_z0 + cols[None, :] * s_z1, mask=ok, other=0.0)
        d = tl.where(ok, z.to(tl.float32) * inv_m[None, :] - mean_y[None, :], 0.0)
        sq += tl.sum(d * d, 0)
    var_y = sq / N
    big = m >= 1.0
    m_big = tl.where(big, m, 1.0)
    m_small = tl.where(big, 1.0, m)
    rstd = tl.where(big, 1.0 / (tl.sqrt(var_y + eps / (m_big * m_big)) * m_big),
                    1.0 / tl.sqrt(m_small * m_small * var_y + eps))
    mean = mean_y * m
    tl.store(STATS + cols, mean, mask=c_ok)
    tl.store(STATS + D + cols, rstd, mask=c_ok)
    for r0 in range(0, N, BN):
        rows = r0 + tl.arange(0, BN).to(tl.int64)
        ok = (rows < N)[:, None] & c_ok[None, :]
        z = tl.load(Z + rows[:, None] * s_z0 + cols[None, :] * s_z1, mask=ok, other=0.0)
        a = (z.to(tl.float32) - mean[None, :]) * rstd[None, :]
        tl.store(A + rows[:, None] * s_a0 + cols[None, :] * s_a1, a, mask=ok)


@triton.jit
def _standardize_bwd_kernel(Z, DA, STATS, DZ, N, D, s_z0, s_z1, s_g0, s_g1, s_d0, s_d1,
                            BN: tl.constexpr, BD: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BD + tl.arange(0, BD).to(tl.int64)
    c_ok = cols < D
    mean = tl.load(STATS + cols, mask=c_ok, other=0.0)
    rstd = tl.load(STATS + D + cols, mask=c_ok, other=0.0)
    s1 = tl.zeros([BD], dtype=tl.float32)
    s2 = tl.zeros([BD], dtype=tl.float32)
    for r0 in range(0, N, BN):
        rows = r0 + tl.arange(0, BN).to(tl.int64)
        ok = (rows < N)[:, None] & c_ok[None, :]
        z = tl.load(Z + rows[:, None] * s_z0 + cols[None, :] * s_z1, mask=ok, other=0.0)
        g = tl.load(DA + rows[:, None] * s_g0 + cols[None, :] * s_g1, mask=ok, other=0.0)
        a = tl.where(ok, (z.to(tl.float32) - mean[None, :]) * rstd[None, :], 0.0)
        s1 += tl.sum(g, 0)
        s2 += tl.sum(g * a, 0)
    m1 = s1 / N
    m2 = s2 / N
    for r0 in range(0, N, BN):
        rows = r0 + tl.arange(0, BN).to(tl.int64)
        ok = (rows < N)[:, None] & c_ok[None, :]
        z = tl.load(Z + rows[:, None] * s_z0 + cols[None, :] * s_z1, mask=ok, other=0.0)
        g = tl.load(DA + rows[:, None] * s_g0 + cols[None, :] * s_g1, mask=ok, other=0.0)
        a = (z.to(tl.float32) - mean[None, :]) * rstd[None, :]
        dz = rstd[None, :] * (g - m1[None, :] - a * m2[None, :])
        tl.store(DZ + rows[:, None] * s_d0 + cols[None, :] * s_d1, dz, mask=ok)


# ----------------------------------------------------------------------------- launchers

_STD = dict(BN=32, BD=64, num_warps=4, num_stages=2)


def standardize(z, eps):
    """(a float32 (N, D), stats float32 (2, D) = [mean, rstd]) — see the module docstring."""
    N, D = z.shape
    a = torch.empty(N, D, device=z.device, dtype=torch.float32)
    stats = torch.empty(2, D, device=z.device, dtype=torch.float32)
    _standardize_kernel[(triton.cdiv(D, _STD["BD"]),)](
        z, a, stats, N, D, *z.stride(), *a.stride(), float(eps), BN=_STD["BN"], BD=_STD["BD"],
        **_launch_opts(_STD))
    return a, stats


def standardize_backward(z, grad_a, stats, eps=None):
    """float32 dz for a float32 upstream gradient of the standardised views, from the saved
    float32 statistics (``eps`` is not needed; the portable twin recomputes them in float64,
    which matters only for a handful of rows, see ``fastssl._reference``)."""
    N, D = z.shape
    dz = torch.empty(N, D, device=z.device, dtype=torch.float32)
    _standardize_bwd_kernel[(triton.cdiv(D, _STD["BD"]),)](
        z, grad_a, stats, dz, N, D, *z.stride(), *grad_a.stride(), *dz.stride(),
        BN=_STD["BN"], BD=_STD["BD"], **_launch_opts(_STD))
    return dz


def config(dtype, D, interpret=None):
    """Block sizes: the InfoNCE table's tile shapes (they compile without spills)."""
    from .infonce import config as infonce_config
    cfg = infonce_config(dtype, D, interpret)
    bwd = cfg["bwd"]
    inner = dict(BM=64, BK=cfg["fwd"]["BK"], num_warps=8, num_stages=3)
    if _interpret() if interpret is None else interpret:
        inner = dict(BM=128, BK=64, num_warps=4, num_stages=1)
    return {"inner": inner, "apply": bwd}


def gram_inner(a, b):
    """sum_ij (a_i . a_j)(b_i . b_j) as a 0-d float32 tensor."""
    N, D = a.shape
    cfg = config(a.dtype, D)["inner"]
    nb = triton.cdiv(N, cfg["BM"])
    part = torch.empty(nb, nb, device=a.device, dtype=torch.float32)
    _gram_inner_kernel[(nb, nb)](a, b, part, N, D, *a.stride(), *b.stride(),
                                 BM=cfg["BM"], BK=cfg["BK"], PRECISION=_precision(a.dtype),
                                 INTERPRET=_interpret(), **_launch_opts(cfg))
    return part.sum()


def gram_apply(w, x):
    """(w w^T) x in float32; for N <= w's width through the N x N Gram matrix, written once."""
    N, D = x.shape
    cfg = config(w.dtype, w.shape[1])["apply"]
    prec = _precision(w.dtype)
    out = torch.empty(N, D, device=x.device, dtype=torch.float32)
    g = out.new_empty(1)
    if N <= w.shape[1]:
        g = torch.empty(N, N, device=x.device, dtype=torch.float32)
        _gram_kernel[(triton.cdiv(N, cfg["BM"]), triton.cdiv(N, cfg["BN"]))](
            w, g, N, w.shape[1], *w.stride(), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
            PRECISION=prec, INTERPRET=_interpret(), **_launch_opts(cfg))
    grid = (triton.cdiv(N, cfg["BM"]), triton.cdiv(D, cfg["BD"]))
    _gram_apply_kernel[grid](w, x, g, out, N, w.shape[1], *w.stride(), *x.stride(),
                             *out.stride(), HAS_G=g.dim() == 2,
                             BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BD=cfg["BD"],
                             PRECISION=prec, INTERPRET=_interpret(), **_launch_opts(cfg))
    return out


def shipped_configs():
    """Every (kernel, signature, constexprs, options) the launchers can use on a GPU."""
    out = []
    for dtype, ty in _TY.items():
        sig = {"Z": ty, "A": "*fp32", "STATS": "*fp32"}
        sig.update({k: "i32" for k in ("N", "D", "s_z0", "s_z1", "s_a0", "s_a1")})
        sig["eps"] = "fp32"
        out.append((_standardize_kernel, sig, dict(BN=_STD["BN"], BD=_STD["BD"]), _STD))
        sig = {"Z": ty, "DA": "*fp32", "STATS": "*fp32", "DZ": "*fp32"}
        sig.update({k: "i32" for k in ("N", "D", "s_z0", "s_z1", "s_g0", "s_g1", "s_d0", "s_d1")})
        out.append((_standardize_bwd_kernel, sig, dict(BN=_STD["BN"], BD=_STD["BD"]), _STD))
        for D in ((32, 128) if dtype == torch.float32 else (32, 128, 256)):
            c = config(dtype, D, interpret=False)
            i, a = c["inner"], c["apply"]
            sig = {"A": ty, "B": ty, "PART": "*fp32"}
            sig.update({k: "i32" for k in ("N", "D", "s_a0", "s_a1", "s_b0", "s_b1")})
            out.append((_gram_inner_kernel, sig, dict(BM=i["BM"], BK=i["BK"], PRECISION="tf32",
                                                      INTERPRET=False), i))
            sig = {"W": ty, "G": "*fp32"}
            sig.update({k: "i32" for k in ("N", "D", "s_w0", "s_w1")})
            out.append((_gram_kernel, sig, dict(BM=a["BM"], BN=a["BN"], BK=a["BK"],
                                                PRECISION="tf32", INTERPRET=False), a))
            sig = {"W": ty, "X": ty, "G": "*fp32", "OUT": "*fp32"}
            sig.update({k: "i32" for k in ("N", "D", "s_w0", "s_w1", "s_x0", "s_x1", "s_o0",
                                           "s_o1")})
            for has_g in (False, True):
                out.append((_gram_apply_kernel, sig, dict(HAS_G=has_g, BM=a["BM"], BN=a["BN"],
                                                          BK=a["BK"], BD=a["BD"],
                                                          PRECISION="tf32", INTERPRET=False), a))
    return with_fp32_precisions(out)
