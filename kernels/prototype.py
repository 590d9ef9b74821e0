"""Tiled softmax passes over K prototypes (DINO, iBOT, SwAV heads): the (rows x K) score
matrix is never stored.

Rows X (n x D), prototypes P (K x D), an optional bias c (K,) and a scale s > 0 give

    score_ik = s (x_i . p_k - c_k),        lse_i = log sum_k exp(score_ik)

``rows``  (one program per block of rows, one pass over K; an attention forward):
          lse_i and, given values U (K x E), out_i = sum_k softmax_k(score_i) u_k
``cols``  (one program per block of prototypes, one pass over the rows; attention's dV):
          given lse (n,) and coefficients Y (n x E), out_k = sum_i exp(score_ik - lse_i) y_i

The prototype cross-entropy (``fastssl.prototype``) is two ``rows`` calls forward (the
teacher's target q_j = sum_k p_jk w_k and the student's log-partition with its softmax mean
m_i = sum_k softmax_ik w_k) and two ``cols`` calls for the prototypes' gradient; Sinkhorn-
Knopp's row and column sums are the same passes with the log-scalings as the bias.

Both keep a running maximum of the products x_i . p_k - c_k and multiply only differences
(<= 0) by the base-2 rate a = s log2(e), so no exponent overflows. lse_i = s m_i + ln l_i
(m_i the maximum product) rounds once at the scale of the scores, and the ``cols`` pass
forms s x - lse_i the same way before the base-2 factor (clamped at 0): converting lse to
base 2 first would round twice more at that scale (1 / tau ~ 100 at sharp temperatures).
Each program owns its outputs (rows x E chunk, or prototypes x E chunk): no atomics,
bitwise reproducible. E is tiled in chunks of BE, each chunk recomputing the scores.
"""
import torch
import triton
import triton.language as tl

from .infonce import _dot_tile, _interpret, _launch_opts, _precision, _TY

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _rows_kernel(X, P, U, BIAS, LSE, OUT, scale, n, K, D, E,
                 s_x0, s_x1, s_p0, s_p1, s_u0, s_u1, s_o0, s_o1,
                 HAS_VALS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pe = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = rows < n
    ee = pe * BE + tl.arange(0, BE).to(tl.int64)
    e_ok = ee < E
    a = scale * 1.4426950408889634
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BE], dtype=tl.float32)
    for k0 in range(0, K, BN):
        keys = k0 + tl.arange(0, BN).to(tl.int64)
        k_ok = keys < K
        x = _dot_tile(X, rows, n, s_x0, s_x1, P, keys, K, s_p0, s_p1, D,
                      BM, BN, BK, PRECISION, INTERPRET)
        if HAS_BIAS:
            x -= tl.load(BIAS + keys, mask=k_ok, other=0.0)[None, :]
        x = tl.where(k_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        alpha = tl.exp2(a * (m_i - m_new))
        p = tl.exp2(a * (x - m_new[:, None]))
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_VALS:
            u = tl.load(U + keys[:, None] * s_u0 + ee[None, :] * s_u1,
                        mask=k_ok[:, None] & e_ok[None, :], other=0.0)
            if INTERPRET:
                acc = acc * alpha[:, None] + tl.dot(p, u.to(tl.float32))
            else:
                acc = tl.dot(p.to(u.dtype), u, acc * alpha[:, None],
                             input_precision=PRECISION)
        m_i = m_new
    if pe == 0:
        lse = scale * m_i + tl.log2(l_i) * 0.6931471805599453  # one rounding at |score|
        tl.store(LSE + rows, lse, mask=row_ok)
    if HAS_VALS:
        tl.store(OUT + rows[:, None] * s_o0 + ee[None, :] * s_o1, acc / l_i[:, None],
                 mask=row_ok[:, None] & e_ok[None, :])


@triton.jit
def _cols_kernel(X, P, BIAS, LSE, Y, OUT, scale, ALPHA, n, K, D, E,
                 s_x0, s_x1, s_p0, s_p1, s_y0, s_y1, s_o0, s_o1,
                 HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pe = tl.program_id(1).to(tl.int64)
    keys = pid * BN + tl.arange(0, BN).to(tl.int64)
    k_ok = keys < K
    ee = pe * BE + tl.arange(0, BE).to(tl.int64)
    e_ok = ee < E
    a = scale * 1.4426950408889634
    if HAS_BIAS:
        c = tl.load(BIAS + keys, mask=k_ok, other=0.0)
    acc = tl.zeros([BN, BE], dtype=tl.float32)
    for r0 in range(0, n, BM):
        rows = r0 + tl.arange(0, BM).to(tl.int64)
        r_ok = rows < n
        x = _dot_tile(P, keys, K, s_p0, s_p1, X, rows, n, s_x0, s_x1, D,
                      BN, BM, BK, PRECISION, INTERPRET)
        if HAS_BIAS:
            x -= c[:, None]
        lse = tl.load(LSE + rows, mask=r_ok, other=0.0)
        # scale x - lse as the rows pass formed lse (scale m + log l): exact 0 at the row
        # maximum of a one-prototype row; base 2 only after the difference is small
        p = tl.exp2(tl.minimum((scale * x - lse[None, :]) * 1.4426950408889634, 0.0))
        p = tl.where(k_ok[:, None] & r_ok[None, :], p, 0.0)
        y = tl.load(Y + rows[:, None] * s_y0 + ee[None, :] * s_y1,
                    mask=r_ok[:, None] & e_ok[None, :], other=0.0)
        if INTERPRET:
            acc += tl.dot(p, y.to(tl.float32))
        else:
            acc = tl.dot(p.to(y.dtype), y, acc, input_precision=PRECISION)
    o = OUT + keys[:, None] * s_o0 + ee[None, :] * s_o1
    o_ok = k_ok[:, None] & e_ok[None, :]
    acc *= tl.load(ALPHA)
    if ACCUMULATE:
        acc += tl.load(o, mask=o_ok, other=0.0)
    tl.store(o, acc, mask=o_ok)


def config(dtype, D, interpret=None):
    """Block sizes and launch options per (dtype, D class). The interpreter gets 64-wide
    blocks so that test shapes (K = 130, D = 257) run several chunks of every loop."""
    if _interpret() if interpret is None else interpret:
        blk = dict(BM=64, BN=64, BK=64, BE=64, num_warps=4, num_stages=1)
        return {"rows": blk, "cols": blk}
    wide = dtype == torch.float32
    bk = 32 if (wide or D <= 32) else 64
    be = 64 if D <= 64 else 128
    # Four warps spilled on sm_80 at BK = BE = 64 (16-bit); eight compile clean everywhere.
    rows = dict(BM=64, BN=64, BK=bk, BE=be, num_warps=8, num_stages=1 if wide else 2)
    cols = dict(rows)
    return {"rows": rows, "cols": cols}


def _scalar(x):
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def rows(x, keys, vals, bias, scale):
    """(lse (n,) float32, out (n, E) float32 or None): see the module docstring. keys and
    vals are cast to x's dtype (one operand dtype per tile matmul)."""
    n, D = x.shape
    K = keys.shape[0]
    keys = keys.to(x.dtype)
    lse = torch.empty(n, device=x.device, dtype=torch.float32)
    out = None if vals is None else torch.empty(n, vals.shape[1], device=x.device,
                                                dtype=torch.float32)
    if n == 0:
        return lse, out
    cfg = config(x.dtype, D)["rows"]
    E = 1 if vals is None else vals.shape[1]
    u = keys if vals is None else vals.to(x.dtype)
    o = lse if out is None else out
    b = lse if bias is None else bias.to(torch.float32).contiguous()
    grid = (triton.cdiv(n, cfg["BM"]), 1 if vals is None else triton.cdiv(E, cfg["BE"]))
    _rows_kernel[grid](
        x, keys, u, b, lse, o, _scalar(scale), n, K, D, E, *x.stride(), *keys.stride(),
        *u.stride(), *(o.stride() if out is not None else (0, 0)),
        HAS_VALS=vals is not None, HAS_BIAS=bias is not None,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BE=cfg["BE"],
        PRECISION=_precision(x.dtype), INTERPRET=_interpret(), **_launch_opts(cfg))
    return lse, out


def cols(x, keys, bias, scale, lse, y, out=None, alpha=1.0):
    """out (K, E) float32 = sum_i exp(score_ik - lse_i) y_i (see the module docstring); with
    ``out`` given (float32, contiguous), out += alpha * that sum, in place.

    y is scaled by a power of two into [-1, 1] and cast to x's dtype for the tile matmul
    (exact scaling; 16-bit y keeps its relative precision), and the result scaled back."""
    n, D = x.shape
    K, E = keys.shape[0], y.shape[1]
    accumulate = out is not None
    if out is None:
        out = torch.zeros(K, E, device=x.device, dtype=torch.float32)
    if n == 0:
        return out
    keys = keys.to(x.dtype)
    from fastssl._ops import pow2_bound
    ys = pow2_bound(y)
    yy = (y.to(torch.float32) / ys).to(x.dtype)
    cfg = config(x.dtype, D)["cols"]
    b = lse if bias is None else bias.to(torch.float32).contiguous()
    grid = (triton.cdiv(K, cfg["BN"]), triton.cdiv(E, cfg["BE"]))
    factor = (ys * alpha).float().reshape(1)  # on the device: no host sync
    _cols_kernel[grid](
        x, keys, b, lse.contiguous(), yy, out, _scalar(scale), factor, n, K, D, E,
        *x.stride(), *keys.stride(), *yy.stride(), *out.stride(),
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BE=cfg["BE"],
        PRECISION=_precision(x.dtype), INTERPRET=_interpret(), **_launch_opts(cfg))
    return out


def shipped_configs():
    """Every (kernel, signature, constexprs, options) the launchers can use on a GPU."""
    out = []
    f32, i32 = "*fp32", "i32"
    ints = ("n", "K", "D", "E", "s_x0", "s_x1", "s_p0", "s_p1")
    for dtype, ty in _TY.items():
        for D in (32, 64, 256):
            c = config(dtype, D, interpret=False)
            r, k = c["rows"], c["cols"]
            for has_vals, has_bias in ((True, True), (True, False), (False, True)):
                sig = {"X": ty, "P": ty, "U": ty, "BIAS": f32, "LSE": f32, "OUT": f32,
                       "scale": "fp32"}
                sig.update({a: i32 for a in ints + ("s_u0", "s_u1", "s_o0", "s_o1")})
                out.append((_rows_kernel, sig, dict(
                    HAS_VALS=has_vals, HAS_BIAS=has_bias, BM=r["BM"], BN=r["BN"], BK=r["BK"],
                    BE=r["BE"], PRECISION="tf32", INTERPRET=False), r))
            for has_bias, accumulate in ((False, False), (True, True), (True, False)):
                sig = {"X": ty, "P": ty, "BIAS": f32, "LSE": f32, "Y": ty, "OUT": f32,
                       "scale": "fp32", "ALPHA": f32}
                sig.update({a: i32 for a in ints + ("s_y0", "s_y1", "s_o0", "s_o1")})
                out.append((_cols_kernel, sig, dict(
                    HAS_BIAS=has_bias, ACCUMULATE=accumulate, BM=k["BM"], BN=k["BN"],
                    BK=k["BK"], BE=k["BE"], PRECISION="tf32", INTERPRET=False), k))
    return out
