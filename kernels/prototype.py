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

``pairs`` (the prototype cross-entropy, ``fastssl.prototype``): student rows S against W,
            teacher rows T against V with bias c, their row statistics, and a pair table
            (pidx, pw) (n x P) giving each student row its target
            R_ik = sum_p pw_ip softmax_k(teacher score of row pidx_ip); the tile gathers the
            P paired teacher rows itself. Three modes: the value
            sum_k R_ik (l_i + s (m_i - x_ik)) per row, and with a_i, d_ik = a_i P_ik - R_ik
            formed entry by entry, ``rows`` out_i = sum_k d_ik w_k (one program per row block)
            and ``cols`` out_k = sum_i d_ik s_i (one program per prototype block).
The loss is two ``rows`` calls (log-partitions) and a ``pairs`` value call forward, two
``pairs`` calls backward; Sinkhorn-Knopp's row and column sums are ``rows`` and ``cols``
with the log-scalings as the bias.

The bias (DINO's centre, the Sinkhorn scalings c_k, kept in float64) arrives as a float32
pair hi + lo. Each pass forms x - c with a two-sum, s = x - hi and its exact rounding error
e (less lo), and the exponent as (s - m_i) + e: at eps = 0.01 one rounding of x - c would be
|x - c| / eps ~ 100 roundings of a code, where (s - m_i) is exact near the row maximum
(Sterbenz) and e is small.

Both keep a running maximum of the products x_i . p_k - c_k and multiply only differences
(<= 0) by the base-2 rate a = s log2(e), so no exponent overflows. lse_i itself is never
formed in float32: at sharp temperatures (s = 1 / tau ~ 100) it is ~100 in magnitude and
one rounding of it is ~100 roundings of a probability. The ``cols`` and ``pairs`` passes form
s (x - m_i) - l_i instead, whose large part x - m_i is exact near the row maximum (the
entries that carry the mass): a probability there is as accurate as the softmax's own, and
the loss value's log-probabilities l_i + s (m_i - x) are the eager log-softmax's.
Each program owns its outputs (rows x E chunk, or prototypes x E chunk): no atomics,
bitwise reproducible. E is tiled in chunks of BE, each chunk recomputing the scores.
"""
import torch
import triton
import triton.language as tl

from .infonce import _dot_tile, _interpret, _launch_opts, _precision, _TY, with_fp32_precisions

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _debias(x, hi, lo):
    """(s, e) with s + e = x - hi - lo to a rounding of e: Knuth's two-sum of x - hi, its
    error less lo (the bias as a float32 pair). (s - m) + e is then exact near the row
    maximum but for the rounding of e (module docstring)."""
    s = x - hi
    bb = s - x
    return s, (x - (s - bb)) + (-hi - bb) - lo


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
            x, e = _debias(x, tl.load(BIAS + keys, mask=k_ok, other=0.0)[None, :],
                           tl.load(BIAS + K + keys, mask=k_ok, other=0.0)[None, :])
        x = tl.where(k_ok[None, :], x, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(x, 1))
        alpha = tl.exp2(a * (m_i - m_new))
        if HAS_BIAS:
            p = tl.exp2(a * ((x - m_new[:, None]) + e))
        else:
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
        tl.store(ST + 2 * rows + 1, tl.log(l_i), mask=row_ok)
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
        c_lo = tl.load(BIAS + K + keys, mask=k_ok, other=0.0)
    acc = tl.zeros([BN, BE], dtype=tl.float32)
    for r0 in range(0, n, BM):
        rows = r0 + tl.arange(0, BM).to(tl.int64)
        r_ok = rows < n
        x = _dot_tile(P, keys, K, s_p0, s_p1, X, rows, n, s_x0, s_x1, D,
                      BN, BM, BK, PRECISION, INTERPRET)
        m_r = tl.load(ST + 2 * rows, mask=r_ok, other=0.0)
        l_r = tl.load(ST + 2 * rows + 1, mask=r_ok, other=0.0)
        # s (x - m) - l: x - m is exact at the row maximum; base 2 only once it is small
        if HAS_BIAS:
            x, e = _debias(x, c[:, None], c_lo[:, None])
            x = (x - m_r[None, :]) + e
        else:
            x = x - m_r[None, :]
        p = tl.exp2(tl.minimum((scale * x - l_r[None, :]) * 1.4426950408889634, 0.0))
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



@triton.jit
def _pair_tile(S, W, T, V, BIAS, ST_S, ST_T, PIDX, PW, A, rows, keys, n, n_t, K, D,
               scale_s, scale_t, s_s0, s_s1, s_w0, s_w1, s_t0, s_t1, s_v0, s_v1,
               NP: tl.constexpr, HAS_BIAS: tl.constexpr, VALUE: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """The [BM, BN] tile of the pairs passes (module docstring): the student scores, the
    target R = sum_p pw_p P^t(pidx_p) from the paired teacher rows' scores, and either
    R (l + s (m - x)) (VALUE) or a P^s - R."""
    r_ok = rows < n
    k_ok = keys < K
    xs = _dot_tile(S, rows, n, s_s0, s_s1, W, keys, K, s_w0, s_w1, D,
                   BM, BN, BK, PRECISION, INTERPRET)
    m_s = tl.load(ST_S + 2 * rows, mask=r_ok, other=0.0)
    l_s = tl.load(ST_S + 2 * rows + 1, mask=r_ok, other=0.0)
    if HAS_BIAS:
        c = tl.load(BIAS + keys, mask=k_ok, other=0.0)
        c_lo = tl.load(BIAS + K + keys, mask=k_ok, other=0.0)
    r = tl.zeros([BM, BN], dtype=tl.float32)
    for p in tl.static_range(NP):
        j = tl.load(PIDX + rows * NP + p, mask=r_ok, other=0).to(tl.int64)
        w = tl.load(PW + rows * NP + p, mask=r_ok, other=0.0)
        xt = _dot_tile(T, j, n_t, s_t0, s_t1, V, keys, K, s_v0, s_v1, D,
                       BM, BN, BK, PRECISION, INTERPRET)
        m_t = tl.load(ST_T + 2 * j, mask=r_ok, other=0.0)
        l_t = tl.load(ST_T + 2 * j + 1, mask=r_ok, other=0.0)
        if HAS_BIAS:
            xt, e = _debias(xt, c[None, :], c_lo[None, :])
            xt = (xt - m_t[:, None]) + e
        else:
            xt = xt - m_t[:, None]
        pt = tl.exp2(tl.minimum((scale_t * xt - l_t[:, None]) * 1.4426950408889634, 0.0))
        r += w[:, None] * pt
    if VALUE:
        e = r * (scale_s * tl.maximum(m_s[:, None] - xs, 0.0) + l_s[:, None])
    else:
        a = tl.load(A + rows, mask=r_ok, other=0.0)
        ps = tl.exp2(tl.minimum((scale_s * (xs - m_s[:, None]) - l_s[:, None])
                                * 1.4426950408889634, 0.0))
        e = a[:, None] * ps - r
    return tl.where(r_ok[:, None] & k_ok[None, :], e, 0.0)


@triton.jit
def _pair_rows_kernel(S, W, T, V, BIAS, ST_S, ST_T, PIDX, PW, A, OUT, scale_s, scale_t,
                      n, n_t, K, D, s_s0, s_s1, s_w0, s_w1, s_t0, s_t1, s_v0, s_v1,
                      NP: tl.constexpr, HAS_BIAS: tl.constexpr, VALUE: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
                      PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pe = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    r_ok = rows < n
    ee = pe * BE + tl.arange(0, BE).to(tl.int64)
    e_ok = ee < D
    if VALUE:
        acc = tl.zeros([BM], dtype=tl.float32)
    else:
        acc = tl.zeros([BM, BE], dtype=tl.float32)
    for k0 in range(0, K, BN):
        keys = k0 + tl.arange(0, BN).to(tl.int64)
        d = _pair_tile(S, W, T, V, BIAS, ST_S, ST_T, PIDX, PW, A, rows, keys, n, n_t, K, D,
                       scale_s, scale_t, s_s0, s_s1, s_w0, s_w1, s_t0, s_t1, s_v0, s_v1,
                       NP, HAS_BIAS, VALUE, BM, BN, BK, PRECISION, INTERPRET)
        if VALUE:
            acc += tl.sum(d, 1)
        else:
            w = tl.load(W + keys[:, None] * s_w0 + ee[None, :] * s_w1,
                        mask=(keys < K)[:, None] & e_ok[None, :], other=0.0)
            if INTERPRET:
                acc += tl.dot(d, w.to(tl.float32))
            else:
                acc = tl.dot(d.to(w.dtype), w, acc, input_precision=PRECISION)
    if VALUE:
        tl.store(OUT + rows, acc, mask=r_ok)
    else:
        tl.store(OUT + rows[:, None] * D + ee[None, :], acc, mask=r_ok[:, None] & e_ok[None, :])


@triton.jit
def _pair_cols_kernel(S, W, T, V, BIAS, ST_S, ST_T, PIDX, PW, A, OUT, scale_s, scale_t,
                      n, n_t, K, D, s_s0, s_s1, s_w0, s_w1, s_t0, s_t1, s_v0, s_v1,
                      NP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr,
                      PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pe = tl.program_id(1).to(tl.int64)
    keys = pid * BN + tl.arange(0, BN).to(tl.int64)
    k_ok = keys < K
    ee = pe * BE + tl.arange(0, BE).to(tl.int64)
    e_ok = ee < D
    acc = tl.zeros([BN, BE], dtype=tl.float32)
    for r0 in range(0, n, BM):
        rows = r0 + tl.arange(0, BM).to(tl.int64)
        d = _pair_tile(S, W, T, V, BIAS, ST_S, ST_T, PIDX, PW, A, rows, keys, n, n_t, K, D,
                       scale_s, scale_t, s_s0, s_s1, s_w0, s_w1, s_t0, s_t1, s_v0, s_v1,
                       NP, HAS_BIAS, False, BM, BN, BK, PRECISION, INTERPRET)
        x = tl.load(S + rows[:, None] * s_s0 + ee[None, :] * s_s1,
                    mask=(rows < n)[:, None] & e_ok[None, :], other=0.0)
        if INTERPRET:
            acc += tl.dot(tl.trans(d), x.to(tl.float32))
        else:
            acc = tl.dot(tl.trans(d).to(x.dtype), x, acc, input_precision=PRECISION)
    tl.store(OUT + keys[:, None] * D + ee[None, :], acc, mask=k_ok[:, None] & e_ok[None, :])


def config(dtype, D, interpret=None):
    """Block sizes and launch options per (dtype, D class). The interpreter gets 64-wide
    blocks so that test shapes (K = 130, D = 257) run several chunks of every loop."""
    if _interpret() if interpret is None else interpret:
        blk = dict(BM=64, BN=64, BK=64, BE=64, num_warps=4, num_stages=1)
        return {"rows": blk, "cols": blk, "pair_rows": blk, "pair_cols": blk}
    wide = dtype == torch.float32
    bk = 32 if (wide or D <= 32) else 64
    be = 64 if D <= 64 else 128
    # Four warps spilled on sm_80 at BK = BE = 64 (16-bit); eight compile clean everywhere.
    rows = dict(BM=64, BN=64, BK=bk, BE=be, num_warps=8, num_stages=1 if wide else 2)
    cols = dict(rows)
    # the pairs tile holds the student scores, the target and a teacher tile at once:
    # 64 x 32 tiles (BK = 32) compile without spills where 64 x 64 spilled up to 708 bytes,
    # 64 along the side that is the matmul's M (wgmma on sm_90)
    return {"rows": rows, "cols": cols, "pair_rows": dict(rows, BN=32, BK=32),
            "pair_cols": dict(rows, BM=32, BK=32)}


def _bias_pair(bias, like):
    """The bias as a (2, K) float32 pair hi + lo (lo the float64 bias's remainder, else 0);
    ``like`` stands in where there is no bias (the pointer is not read)."""
    if bias is None:
        return like
    hi = bias.to(torch.float32)
    lo = (bias - hi.to(bias.dtype)).to(torch.float32) if bias.dtype == torch.float64 \
        else torch.zeros_like(hi)
    return torch.stack([hi, lo]).contiguous()


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
    b = _bias_pair(bias, st)
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
    b = _bias_pair(bias, st)
    grid = (triton.cdiv(K, cfg["BN"]), triton.cdiv(E, cfg["BE"]))
    factor = (ys * alpha).float().reshape(1)  # on the device: no host sync
    _cols_kernel[grid](
        x, keys, b, st, yy, out, _scalar(scale), factor, n, K, D, E,
        *x.stride(), *keys.stride(), *yy.stride(), *out.stride(),
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BE=cfg["BE"],
        PRECISION=_precision(x.dtype), INTERPRET=_interpret(), **_launch_opts(cfg))
    return out



def _pair_launch(s, w, t, v, bias, scale_s, scale_t, st_s, st_t, pidx, pw, a, mode):
    """One ``pairs`` kernel launch: mode "value" (n,), "rows" (n, D) or "cols" (K, D),
    float32. w and v are cast to s's dtype; pidx (n, P) int32 and pw (n, P) float32."""
    n, D = s.shape
    K, n_t = w.shape[0], t.shape[0]
    w, v, t = w.to(s.dtype), v.to(s.dtype), t.to(s.dtype)
    shape = {"value": (n,), "rows": (n, D), "cols": (K, D)}[mode]
    out = torch.zeros(shape, device=s.device, dtype=torch.float32)
    if n == 0 or out.numel() == 0:
        return out
    cfg = config(s.dtype, D)["pair_cols" if mode == "cols" else "pair_rows"]
    st_s, st_t = st_s.to(torch.float32).contiguous(), st_t.to(torch.float32).contiguous()
    pidx = pidx.to(torch.int32).contiguous()
    pw = pw.to(torch.float32).contiguous()
    a = st_s if a is None else a.to(torch.float32).contiguous()
    b = _bias_pair(bias, st_s)
    args = (s, w, t, v, b, st_s, st_t, pidx, pw, a, out, _scalar(scale_s), _scalar(scale_t),
            n, n_t, K, D, *s.stride(), *w.stride(), *t.stride(), *v.stride())
    blocks = dict(NP=pidx.shape[1], HAS_BIAS=bias is not None, BM=cfg["BM"], BN=cfg["BN"],
                  BK=cfg["BK"], BE=cfg["BE"], PRECISION=_precision(s.dtype),
                  INTERPRET=_interpret(), **_launch_opts(cfg))
    if mode == "cols":
        grid = (triton.cdiv(K, cfg["BN"]), triton.cdiv(D, cfg["BE"]))
        _pair_cols_kernel[grid](*args, **blocks)
    else:
        grid = (triton.cdiv(n, cfg["BM"]), 1 if mode == "value" else triton.cdiv(D, cfg["BE"]))
        _pair_rows_kernel[grid](*args, VALUE=mode == "value", **blocks)
    return out


def pair_value(s, w, t, v, bias, scale_s, scale_t, st_s, st_t, pidx, pw):
    """(n,) float32: each student row's cross-entropy against its paired teacher rows'
    softmaxes (module docstring, ``pairs``)."""
    return _pair_launch(s, w, t, v, bias, scale_s, scale_t, st_s, st_t, pidx, pw, None, "value")


def pair_grad(s, w, t, v, bias, scale_s, scale_t, st_s, st_t, pidx, pw, a, need_rows,
              need_cols):
    """(sum_k d_ik w_k (n, D) or None, sum_i d_ik s_i (K, D) or None), float32, with
    d_ik = a_i P^s_ik - R_ik: a row pass and a column pass (module docstring)."""
    args = (s, w, t, v, bias, scale_s, scale_t, st_s, st_t, pidx, pw, a)
    return (_pair_launch(*args, "rows") if need_rows else None,
            _pair_launch(*args, "cols") if need_cols else None)

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
        for D in (64, 256):  # DINO's two teacher crops (NP = 2), iBOT's rows (NP = 1)
            cr, cc = (config(dtype, D, interpret=False)[k] for k in ("pair_rows", "pair_cols"))
            sig = {"S": ty, "W": ty, "T": ty, "V": ty, "BIAS": f32, "ST_S": f32, "ST_T": f32,
                   "PIDX": "*i32", "PW": f32, "A": f32, "OUT": f32, "scale_s": "fp32",
                   "scale_t": "fp32"}
            sig.update({a: i32 for a in ("n", "n_t", "K", "D", "s_s0", "s_s1", "s_w0", "s_w1",
                                         "s_t0", "s_t1", "s_v0", "s_v1")})
            br, bc = (dict(BM=c["BM"], BN=c["BN"], BK=c["BK"], BE=c["BE"], PRECISION="tf32",
                           INTERPRET=False) for c in (cr, cc))
            for np_, has_bias, value in ((2, True, True), (2, True, False), (1, False, False)):
                out.append((_pair_rows_kernel, sig, dict(NP=np_, HAS_BIAS=has_bias,
                                                          VALUE=value, **br), cr))
            for np_, has_bias in ((2, True), (1, False)):
                out.append((_pair_cols_kernel, sig, dict(NP=np_, HAS_BIAS=has_bias, **bc), cc))
    return with_fp32_precisions(out)
