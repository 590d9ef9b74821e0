"""Tiled softmax passes over K prototypes (DINO, iBOT, SwAV heads): the (rows x K) score
matrix is never stored.

Rows X (n x D), prototypes P (K x D), an optional bias c (K,) and a scale s > 0 give

    score_ik = s (x_i . p_k - c_k),        lse_i = log sum_k exp(score_ik) = s m_i + l_i

with m_i = max_k (x_i . p_k - c_k) and l_i = log sum_k exp(s (x_i . p_k - c_k - m_i)).

``rows``  (one program per block of rows, one pass over K; an attention forward):
          the row statistics (m_i, l_i) and, given values U (K x E),
          out_i = sum_k softmax_k(score_i) u_k
``cols``  (one program per block of prototypes, one pass over the rows; attention's dV):
          given (m, l) (n x 2) and coefficients Y (n x E),
          out_k = sum_i exp(s (x_i . p_k - c_k - m_i) - l_i) y_i

The prototype cross-entropy (``fastssl.prototype``) is two ``rows`` calls forward (the
teacher's target q_j = sum_k p_jk w_k and the student's log-partition with its softmax mean
m_i = sum_k softmax_ik w_k) and two ``cols`` calls for the prototypes' gradient; Sinkhorn-
Knopp's row and column sums are the same passes with the log-scalings as the bias.

Both keep a running maximum of the products x_i . p_k - c_k and multiply only differences
(<= 0) by the base-2 rate a = s log2(e), so no exponent overflows. lse_i itself is never
formed in float32: at sharp temperatures (s = 1 / tau ~ 100) it is ~100 in magnitude and
one rounding of it is ~100 roundings of a probability. The ``cols`` pass forms
s (x - m_i) - l_i instead, whose large part x - m_i is exact near the row maximum (the
entries that carry the mass): a probability there is as accurate as the softmax's own.
The callers form lse_i = s m_i + l_i where they need it (the loss value).
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
def _rows_kernel(X, P, U, BIAS, ST, OUT, scale, n, K, D, E,
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
        tl.store(ST + 2 * rows, m_i, mask=row_ok)
        tl.store(ST + 2 * rows + 1, tl.log2(l_i) * 0.6931471805599453, mask=row_ok)
    if HAS_VALS:
        tl.store(OUT + rows[:, None] * s_o0 + ee[None, :] * s_o1, acc / l_i[:, None],
                 mask=row_ok[:, None] & e_ok[None, :])


@triton.jit
def _cols_kernel(X, P, BIAS, ST, Y, OUT, scale, ALPHA, n, K, D, E,
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
        m_r = tl.load(ST + 2 * rows, mask=r_ok, other=0.0)
        l_r = tl.load(ST + 2 * rows + 1, mask=r_ok, other=0.0)
        # s (x - m) - l: x - m is exact at the row maximum; base 2 only once it is small
        p = tl.exp2(tl.minimum((scale * (x - m_r[None, :]) - l_r[None, :])
                               * 1.4426950408889634, 0.0))
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
    """(stats (n, 2) float32 = [m_i, l_i], out (n, E) float32 or None): see the module
    docstring. keys and vals are cast to x's dtype (one operand dtype per tile matmul)."""
    n, D = x.shape
    K = keys.shape[0]
    keys = keys.to(x.dtype)
    st = torch.empty(n, 2, device=x.device, dtype=torch.float32)
    out = None if vals is None else torch.empty(n, vals.shape[1], device=x.device,
                                                dtype=torch.float32)
    if n == 0:
        return st, out
    cfg = config(x.dtype, D)["rows"]
    E = 1 if vals is None else vals.shape[1]
    u = keys if vals is None else vals.to(x.dtype)
    o = st if out is None else out
    b = st if bias is None else bias.to(torch.float32).contiguous()
    grid = (triton.cdiv(n, cfg["BM"]), 1 if vals is None else triton.cdiv(E, cfg["BE"]))
    _rows_kernel[grid](
        x, keys, u, b, st, o, _scalar(scale), n, K, D, E, *x.stride(), *keys.stride(),
        *u.stride(), *(o.stride() if out is not None else (0, 0)),
        HAS_VALS=vals is not None, HAS_BIAS=bias is not None,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BE=cfg["BE"],
        PRECISION=_precision(x.dtype), INTERPRET=_interpret(), **_launch_opts(cfg))
    return st, out


def cols(x, keys, bias, scale, st, y, out=None, alpha=1.0):
    """out (K, E) float32 = sum_i exp(score_ik - lse_i) y_i with the row statistics ``st``
    (n, 2) of ``rows`` (see the module docstring); with
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
    st = st.to(torch.float32).contiguous()
    b = st if bias is None else bias.to(torch.float32).contiguous()
    grid = (triton.cdiv(K, cfg["BN"]), triton.cdiv(E, cfg["BE"]))
    factor = (ys * alpha).float().reshape(1)  # on the device: no host sync
    _cols_kernel[grid](
        x, keys, b, st, yy, out, _scalar(scale), factor, n, K, D, E,
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
                sig = {"X": ty, "P": ty, "U": ty, "BIAS": f32, "ST": f32, "OUT": f32,
                       "scale": "fp32"}
                sig.update({a: i32 for a in ints + ("s_u0", "s_u1", "s_o0", "s_o1")})
                out.append((_rows_kernel, sig, dict(
                    HAS_VALS=has_vals, HAS_BIAS=has_bias, BM=r["BM"], BN=r["BN"], BK=r["BK"],
                    BE=r["BE"], PRECISION="tf32", INTERPRET=False), r))
            for has_bias, accumulate in ((False, False), (True, True), (True, False)):
                sig = {"X": ty, "P": ty, "BIAS": f32, "ST": f32, "Y": ty, "OUT": f32,
                       "scale": "fp32", "ALPHA": f32}
                sig.update({a: i32 for a in ints + ("s_y0", "s_y1", "s_o0", "s_o1")})
                out.append((_cols_kernel, sig, dict(
                    HAS_BIAS=has_bias, ACCUMULATE=accumulate, BM=k["BM"], BN=k["BN"],
                    BK=k["BK"], BE=k["BE"], PRECISION="tf32", INTERPRET=False), k))
    return out
