"""Tiled InfoNCE kernels: row log-sum-exp over a similarity matrix that is never stored.

Rows R (n x D), columns C (m x D) and optional extra negatives Q (k x D, no gradient,
each scaled by w_j) give cosine-like products and logits

    x_ij = r_i . c_j            (j < m)         x_ij = w_j (r_i . q_j)   (extra negatives)
    l_ij = s * x_ij

Row i has a positive column p_i (or -1: none) and may mask one column q_i (or -1). With
lse_i = log sum_{j valid} exp(l_ij) the per-row loss is loss_i = lse_i - l_{i,p_i}.
With keys (one integer per row, k_i, and per column, k_j; a runtime mode) the valid columns
are further those with k_j != k_i (mode 1: every other instance, DCL's negatives) or with
k_j == k_i (mode 2: the positives' log-sum-exp); an empty set gives lse = -inf and ex = 0.
``fastssl.multipositive`` builds SupCon, multi-positive SimCLR and DCL on it.

The forward pass keeps, per row, a running max, sum of exponentials and softmax-weighted
sum of x (online softmax, base 2). The max is taken over y_ij = sign(s) x_ij, the products
themselves, and the rate a = |s| log2(e) multiplies only differences y - max <= 0, so no
exponent overflows whatever the scale: with mx_i = max_j y_ij and
ll_i = log2 sum_j 2^(a (y_ij - mx_i)),

    lse_i / ln 2 = a mx_i + ll_i,      loss_i = ln 2 (a (mx_i - sign(s) px_i) + ll_i)

where mx_i - sign(s) px_i >= 0, so a finite scale and finite products give a finite loss
or +inf (never NaN). It writes O(n) statistics: mx_i, ll_i, ex_i = sum_j P_ij x_ij,
px_i = x_{i,p_i}, and loss_i. d loss_i / d s = ex_i - px_i, so the scale gradient needs no
extra pass.

The backward pass recomputes the tiles, P_ij = 2^min(a (y_ij - mx_i) - ll_i, 0): P <= 1
holds exactly, and the clamp keeps it so when a recomputed product rounds differently from
the forward pass's at an enormous scale. With
G_ij = g_i (P_ij - [j = p_i]):
    dR_i = s * sum_j G_ij c_j      (+ s * sum_j g_i P_ij w_j q_j over extra negatives)
    dC_j = s * sum_i G_ij r_i
computed by two kernels (row blocks, column blocks), each tiled over D chunks of its
output: no atomics, so results are bitwise reproducible.
"""
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot_tile(A, a_idx, a_n, sa0, sa1, B, b_idx, b_n, sb0, sb1, D,
              BA: tl.constexpr, BB: tl.constexpr, BK: tl.constexpr,
              PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """[BA, BB] fp32 tile of A[a_idx] . B[b_idx]^T, looping over D in chunks of BK."""
    acc = tl.zeros([BA, BB], dtype=tl.float32)
    a_ok = a_idx < a_n
    b_ok = b_idx < b_n
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK).to(tl.int64)
        k_ok = kk < D
        a = tl.load(A + a_idx[:, None] * sa0 + kk[None, :] * sa1,
                    mask=a_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(B + b_idx[None, :] * sb0 + kk[:, None] * sb1,
                    mask=k_ok[:, None] & b_ok[None, :], other=0.0)
        if INTERPRET:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


FMAX = 3.4028234663852886e38   # float32's largest and smallest normal values
FTINY = 1.1754943508222875e-38


@triton.jit
def _rate(SCALE):
    """(sign(s), a = |s| log2 e, a clamped to float32's normal range) for scale s."""
    s = tl.load(SCALE).to(tl.float32)
    a = tl.abs(s) * 1.4426950408889634
    return tl.where(s < 0, -1.0, 1.0), a, tl.minimum(tl.maximum(a, 1.1754943508222875e-38),
                                                      3.4028234663852886e38)


@triton.jit
def _online_update(x, sign, a_p, valid, m_i, l_i, e_i):
    """Fold one [BM, BN] tile of products x into the running base-2 softmax statistics
    (max over y = sign x; exponents a (y - max) <= 0)."""
    y = tl.where(valid, x * sign, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(y, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(a_p * (m_i - m_use))
    p = tl.exp2(a_p * (y - m_use[:, None]))
    l_i = l_i * alpha + tl.sum(p, 1)
    e_i = e_i * alpha + tl.sum(p * x, 1)
    return m_new, l_i, e_i


@triton.jit
def _key_select(valid, kr, KC, cols, m, key_mode):
    """Keep the columns whose key differs from the row's (key_mode 1) or equals it (2)."""
    kc = tl.load(KC + cols, mask=cols < m, other=-2)
    same = kc[None, :] == kr[:, None]
    return valid & (same != (key_mode == 1))


@triton.jit
def _fwd_kernel(R, C, Q, W, POS, MASK, KR, KC, SCALE, LOSS, MX, LL, EX, PX,
                n, m, k, D, s_r0, s_r1, s_c0, s_c1, s_q0, s_q1, key_mode,
                HAS_MASK: tl.constexpr, HAS_NEG: tl.constexpr, HAS_KEYS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = rows < n
    sign, a, a_p = _rate(SCALE)
    pos = tl.load(POS + rows, mask=row_ok, other=-1)
    if HAS_MASK:
        msk = tl.load(MASK + rows, mask=row_ok, other=-1)
    if HAS_KEYS:
        kr = tl.load(KR + rows, mask=row_ok, other=-1)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    e_i = tl.zeros([BM], dtype=tl.float32)
    px = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(0, m, BN):
        cols = c0 + tl.arange(0, BN).to(tl.int64)
        x = _dot_tile(R, rows, n, s_r0, s_r1, C, cols, m, s_c0, s_c1, D,
                      BM, BN, BK, PRECISION, INTERPRET)
        is_pos = cols[None, :] == pos[:, None]
        px += tl.sum(tl.where(is_pos, x, 0.0), 1)
        valid = (cols < m)[None, :] & row_ok[:, None]
        if HAS_MASK:
            valid = valid & (cols[None, :] != msk[:, None])
        if HAS_KEYS:
            valid = _key_select(valid, kr, KC, cols, m, key_mode)
        m_i, l_i, e_i = _online_update(x, sign, a_p, valid, m_i, l_i, e_i)
    if HAS_NEG:
        for c0 in range(0, k, BN):
            cols = c0 + tl.arange(0, BN).to(tl.int64)
            col_ok = cols < k
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            x = _dot_tile(R, rows, n, s_r0, s_r1, Q, cols, k, s_q0, s_q1, D,
                          BM, BN, BK, PRECISION, INTERPRET) * w[None, :]
            valid = col_ok[None, :] & row_ok[:, None]
            m_i, l_i, e_i = _online_update(x, sign, a_p, valid, m_i, l_i, e_i)
    m_i = tl.where(m_i == float("-inf"), 0.0, m_i)
    l_i = tl.where(row_ok, l_i, 1.0)  # lanes past the last row hold no columns
    # an empty selection (keys) has l = 0 and ll = -inf, taken without a log of 0
    ll = tl.where(l_i > 0, tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    # The gap mx - sign px is >= 0 and exactly 0 when the positive is the largest logit;
    # a * 0 stays 0 even for an infinite rate.
    # The loss in natural units, |s| gap + ln2 ll: the large term rounds once (|s| times the
    # gap), not four times as a base-2 sum scaled back by ln 2 would.
    head = tl.where(pos >= 0, m_i - sign * px, m_i)
    nz = head != 0
    abs_s = tl.abs(tl.load(SCALE).to(tl.float32))
    head = tl.where(nz, abs_s * tl.where(nz, head, 1.0), 0.0)
    tl.store(LOSS + rows, head + ll * 0.6931471805599453, mask=row_ok)
    tl.store(MX + rows, m_i, mask=row_ok)
    tl.store(LL + rows, ll, mask=row_ok)
    # a row whose selected set is empty (keys) has l = 0: its ex is 0, not 0 / 0
    tl.store(EX + rows, tl.where(l_i > 0, e_i / tl.where(l_i > 0, l_i, 1.0), 0.0), mask=row_ok)
    tl.store(PX + rows, px, mask=row_ok)


@triton.jit
def _bwd_rows_kernel(R, C, Q, W, POS, MASK, KR, KC, SCALE, MX, LL, G, GSCALE, DR,
                     n, m, k, D, s_r0, s_r1, s_c0, s_c1, s_q0, s_q1, s_d0, s_d1, key_mode,
                     HAS_MASK: tl.constexpr, HAS_NEG: tl.constexpr, HAS_KEYS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = rows < n
    dd = pid_d * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = dd < D
    s = tl.load(SCALE).to(tl.float32)
    sign, _rate_abs, a_p = _rate(SCALE)
    mx = tl.load(MX + rows, mask=row_ok, other=0.0)
    ll = tl.load(LL + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    pos = tl.load(POS + rows, mask=row_ok, other=-1)
    if HAS_MASK:
        msk = tl.load(MASK + rows, mask=row_ok, other=-1)
    if HAS_KEYS:
        kr = tl.load(KR + rows, mask=row_ok, other=-1)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for c0 in range(0, m, BN):
        cols = c0 + tl.arange(0, BN).to(tl.int64)
        col_ok = cols < m
        x = _dot_tile(R, rows, n, s_r0, s_r1, C, cols, m, s_c0, s_c1, D,
                      BM, BN, BK, PRECISION, INTERPRET)
        valid = col_ok[None, :] & row_ok[:, None]
        if HAS_MASK:
            valid = valid & (cols[None, :] != msk[:, None])
        if HAS_KEYS:
            valid = _key_select(valid, kr, KC, cols, m, key_mode)
        p = tl.where(valid, tl.exp2(tl.minimum(a_p * (x * sign - mx[:, None]) - ll[:, None],
                                               0.0)), 0.0)
        gm = p - tl.where(cols[None, :] == pos[:, None], 1.0, 0.0)
        b = tl.load(C + cols[:, None] * s_c0 + dd[None, :] * s_c1,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if INTERPRET:
            acc += tl.dot(gm, b.to(tl.float32))
        else:
            acc = tl.dot(gm.to(b.dtype), b, acc, input_precision=PRECISION)
    if HAS_NEG:
        for c0 in range(0, k, BN):
            cols = c0 + tl.arange(0, BN).to(tl.int64)
            col_ok = cols < k
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            x = _dot_tile(R, rows, n, s_r0, s_r1, Q, cols, k, s_q0, s_q1, D,
                          BM, BN, BK, PRECISION, INTERPRET) * w[None, :]
            valid = col_ok[None, :] & row_ok[:, None]
            gm = tl.where(valid, tl.exp2(tl.minimum(
                a_p * (x * sign - mx[:, None]) - ll[:, None], 0.0)), 0.0) * w[None, :]
            b = tl.load(Q + cols[:, None] * s_q0 + dd[None, :] * s_q1,
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if INTERPRET:
                acc += tl.dot(gm, b.to(tl.float32))
            else:
                acc = tl.dot(gm.to(b.dtype), b, acc, input_precision=PRECISION)
    out = acc * (g * (s * tl.load(GSCALE)))[:, None]
    tl.store(DR + rows[:, None] * s_d0 + dd[None, :] * s_d1, out.to(DR.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_cols_kernel(R, C, POS, MASK, KR, KC, SCALE, MX, LL, G, GSCALE, DC,
                     n, m, D, s_r0, s_r1, s_c0, s_c1, s_d0, s_d1, key_mode,
                     HAS_MASK: tl.constexpr, HAS_KEYS: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid * BN + tl.arange(0, BN).to(tl.int64)
    col_ok = cols < m
    dd = pid_d * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = dd < D
    s = tl.load(SCALE).to(tl.float32)
    sign, _rate_abs, a_p = _rate(SCALE)
    if HAS_KEYS:
        kc = tl.load(KC + cols, mask=col_ok, other=-2)
    acc = tl.zeros([BN, BD], dtype=tl.float32)
    for r0 in range(0, n, BM):
        rows = r0 + tl.arange(0, BM).to(tl.int64)
        row_ok = rows < n
        xt = _dot_tile(C, cols, m, s_c0, s_c1, R, rows, n, s_r0, s_r1, D,
                       BN, BM, BK, PRECISION, INTERPRET)
        mx = tl.load(MX + rows, mask=row_ok, other=0.0)
        ll = tl.load(LL + rows, mask=row_ok, other=0.0)
        g = tl.load(G + rows, mask=row_ok, other=0.0)
        pos = tl.load(POS + rows, mask=row_ok, other=-1)
        valid = col_ok[:, None] & row_ok[None, :]
        if HAS_MASK:
            msk = tl.load(MASK + rows, mask=row_ok, other=-1)
            valid = valid & (cols[:, None] != msk[None, :])
        if HAS_KEYS:
            same = kc[:, None] == tl.load(KR + rows, mask=row_ok, other=-1)[None, :]
            valid = valid & (same != (key_mode == 1))
        p = tl.where(valid, tl.exp2(tl.minimum(a_p * (xt * sign - mx[None, :]) - ll[None, :],
                                               0.0)), 0.0)
        gm = (p - tl.where(cols[:, None] == pos[None, :], 1.0, 0.0)) * g[None, :]
        a = tl.load(R + rows[:, None] * s_r0 + dd[None, :] * s_r1,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if INTERPRET:
            acc += tl.dot(gm, a.to(tl.float32))
        else:
            acc = tl.dot(gm.to(a.dtype), a, acc, input_precision=PRECISION)
    out = acc * (s * tl.load(GSCALE))
    tl.store(DC + cols[:, None] * s_d0 + dd[None, :] * s_d1, out.to(DC.dtype.element_ty),
             mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launchers

def config(dtype, D, interpret=None):
    """Block sizes and launch options for one (dtype, D). One table for every kernel.

    The interpreter (CPU) runs one program after another with no register limit; it gets
    large row and column blocks, and 64-wide D chunks so that D = 130 still exercises the
    multi-chunk loops.
    """
    if _interpret() if interpret is None else interpret:
        blk = dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=1)
        return {"fwd": blk, "bwd": dict(blk, BD=64), "bwd_cols": dict(blk, BD=64)}
    wide = dtype == torch.float32
    small = D <= 32
    bk = 32 if (small or wide) else 64
    # 16-bit stage counts from the H200 sweep (bf16, 2N = 65,536; benchmarks/NOTES.md,
    # 2026-12-04), the fastest variants that compile without spills: 4 forward stages
    # (14.2 ms against 16.3 at D = 256) and 3 backward stages at D > 128 (86.5 against 117.9)
    fwd = dict(BM=64 if wide else 128, BN=64, BK=bk, num_warps=8,
               num_stages=3 if (wide or small) else 4)
    # The backward kernels recompute the similarity tile once per D chunk of their output,
    # so the chunk BD is as wide as registers allow (every entry compiles without spills).
    if small:
        bwd = dict(BM=64, BN=64, BK=bk, BD=32, num_warps=8 if wide else 4, num_stages=2)
    elif wide:
        # Two stages spilled 8-12 bytes on sm_80 once the rows kernel kept the max and the
        # log-sum separately (scale-safe exponents); one stage compiles clean on both.
        bwd = dict(BM=64, BN=64, BK=bk, BD=64, num_warps=8, num_stages=1)
    elif D <= 128:
        bwd = dict(BM=64, BN=64, BK=bk, BD=128, num_warps=8, num_stages=2)
    else:
        bwd = dict(BM=64, BN=32, BK=bk, BD=256, num_warps=8, num_stages=3)
    # The column kernel owns BN columns and walks rows in blocks of BM: the same tile
    # shapes with the roles exchanged, so its matmuls keep M = 64 rows (wgmma's minimum).
    bwd_cols = dict(bwd, BM=bwd["BN"], BN=bwd["BM"])
    return {"fwd": fwd, "bwd": bwd, "bwd_cols": bwd_cols}


FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")


def _precision(dtype):
    """``tl.dot``'s input precision for ``dtype`` operands (16-bit operands ignore it).
    float32 follows PyTorch's switch for its own float32 matmuls, so that a fused loss is as
    exact as the eager code it replaces: products in three TF32 passes ("tf32x3": the
    split operands' error terms kept, within a few float32 roundings of full products, on
    the tensor cores) unless ``torch.backends.cuda.matmul.allow_tf32``
    (``torch.set_float32_matmul_precision("high")``) allows one TF32 pass ("tf32").
    ``FASTSSL_FP32_PRECISION`` = ieee | tf32 | tf32x3 overrides both ("ieee": FMA units)."""
    if dtype != torch.float32:
        return "tf32"
    chosen = os.environ.get("FASTSSL_FP32_PRECISION")
    if chosen:
        if chosen not in FP32_PRECISIONS:
            raise ValueError(f"FASTSSL_FP32_PRECISION must be one of {', '.join(FP32_PRECISIONS)}, "
                             f"got {chosen!r}")
        return chosen
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _launch_opts(cfg):
    if _interpret():
        return {}
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _neg_args(rows, negatives, neg_scale):
    if negatives is None:
        return rows, rows.new_empty(1, dtype=torch.float32), 0, (0, 0)
    if neg_scale is None:
        neg_scale = torch.ones(negatives.shape[0], device=rows.device, dtype=torch.float32)
    # One operand dtype per tile matmul: a queue kept in another precision is cast once.
    negatives = negatives.to(rows.dtype)
    return negatives, neg_scale, negatives.shape[0], negatives.stride()


def _key_args(rows, keys, key_mode):
    """(row keys, column keys, mode) for the kernels: ``keys`` is None (mode 0) or the
    int64 (n + m,) row keys then column keys."""
    if keys is None or key_mode == 0:
        return rows.new_empty(1, dtype=torch.int64), rows.new_empty(1, dtype=torch.int64), 0
    n = rows.shape[0]
    return keys[:n].contiguous(), keys[n:].contiguous(), int(key_mode)


def forward(rows, cols, negatives, neg_scale, pos_idx, mask_idx, scale, keys=None, key_mode=0):
    """Per-row loss and statistics; see the module docstring. Returns
    (loss, [mx, ll, ex, px]). With ``keys`` (int64, n row keys then m column keys) the
    log-partition runs over the columns whose key differs from the row's (``key_mode`` 1)
    or equals it (2), besides the mask."""
    n, D = rows.shape
    m = cols.shape[0]
    q, w, k, sq = _neg_args(rows, negatives, neg_scale)
    kr, kc, mode = _key_args(rows, keys, key_mode)
    if mode and mask_idx is None:  # the keyed kernels always take a mask (-1: none)
        mask_idx = torch.full((n,), -1, dtype=torch.int64, device=rows.device)
    loss = torch.empty(n, device=rows.device, dtype=torch.float32)
    stats = torch.empty(4, n, device=rows.device, dtype=torch.float32)
    if n == 0:
        return loss, stats
    cfg = config(rows.dtype, D)["fwd"]
    grid = (triton.cdiv(n, cfg["BM"]),)
    _fwd_kernel[grid](
        rows, cols, q, w, pos_idx, pos_idx if mask_idx is None else mask_idx, kr, kc, scale,
        loss, stats[0], stats[1], stats[2], stats[3],
        n, m, k, D, *rows.stride(), *cols.stride(), *sq, mode,
        HAS_MASK=mask_idx is not None, HAS_NEG=k > 0, HAS_KEYS=mode != 0,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], PRECISION=_precision(rows.dtype),
        INTERPRET=_interpret(), **_launch_opts(cfg))
    return loss, stats


def backward(rows, cols, negatives, neg_scale, pos_idx, mask_idx, scale, stats, grad,
             need_rows, need_cols, keys=None, key_mode=0):
    """float32 gradients of sum_i grad_i * loss_i for rows and cols (None where not needed);
    ``stats`` as returned by ``forward`` (with the same ``keys``)."""
    kr, kc, mode = _key_args(rows, keys, key_mode)
    n, D = rows.shape
    m = cols.shape[0]
    if mode and mask_idx is None:
        mask_idx = torch.full((n,), -1, dtype=torch.int64, device=rows.device)
    mx, ll = stats[0].contiguous(), stats[1].contiguous()
    if n == 0:
        return (rows.new_zeros(rows.shape, dtype=torch.float32) if need_rows else None,
                cols.new_zeros(cols.shape, dtype=torch.float32) if need_cols else None)
    cfg = config(rows.dtype, D)["bwd"]
    # Upstream gradients are normalised by their largest magnitude so that the 16-bit
    # operands of the tile matmuls stay in range; the factor is applied at the end.
    gscale = grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    g = (grad / gscale).contiguous()
    mask = pos_idx if mask_idx is None else mask_idx
    prec = _precision(rows.dtype)
    d_rows = d_cols = None
    if need_rows:
        q, w, k, sq = _neg_args(rows, negatives, neg_scale)
        d_rows = torch.empty(rows.shape, device=rows.device, dtype=torch.float32)
        grid = (triton.cdiv(n, cfg["BM"]), triton.cdiv(D, cfg["BD"]))
        _bwd_rows_kernel[grid](
            rows, cols, q, w, pos_idx, mask, kr, kc, scale, mx, ll, g, gscale, d_rows,
            n, m, k, D, *rows.stride(), *cols.stride(), *sq, *d_rows.stride(), mode,
            HAS_MASK=mask_idx is not None, HAS_NEG=k > 0, HAS_KEYS=mode != 0,
            BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BD=cfg["BD"], PRECISION=prec,
            INTERPRET=_interpret(), **_launch_opts(cfg))
    if need_cols:
        cfg = config(rows.dtype, D)["bwd_cols"]
        d_cols = torch.empty(cols.shape, device=cols.device, dtype=torch.float32)
        if m > 0:
            grid = (triton.cdiv(m, cfg["BN"]), triton.cdiv(D, cfg["BD"]))
            _bwd_cols_kernel[grid](
                rows, cols, pos_idx, mask, kr, kc, scale, mx, ll, g, gscale, d_cols,
                n, m, D, *rows.stride(), *cols.stride(), *d_cols.stride(), mode,
                HAS_MASK=mask_idx is not None, HAS_KEYS=mode != 0,
                BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BD=cfg["BD"], PRECISION=prec,
                INTERPRET=_interpret(), **_launch_opts(cfg))
    return d_rows, d_cols


# ------------------------------------------------------------- ahead-of-time compile table

_TY = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def with_fp32_precisions(configs):
    """A compile table with each float32 entry twice, for both precisions a launch takes by
    default (``_precision``: "tf32x3", and "tf32" where PyTorch allows TF32); 16-bit
    entries once. The first pointer of a signature is the operands' dtype."""
    out = []
    for fn, sig, ce, opts in configs:
        out.append((fn, sig, ce, opts))
        if "PRECISION" in ce and next(iter(sig.values())) == "*fp32":
            out.append((fn, sig, dict(ce, PRECISION="tf32x3"), opts))
    return out


def shipped_configs():
    """Every (kernel, signature, constexprs, options) the launchers can use on a GPU.

    D = 32, 128 and 256 stand for the table's D classes (<= 32, <= 128, larger).
    """
    out = []
    for dtype, ty in _TY.items():
        for D in ((32, 128) if dtype == torch.float32 else (32, 128, 256)):
            c = config(dtype, D, interpret=False)
            prec = "tf32"
            f, b, bc = c["fwd"], c["bwd"], c["bwd_cols"]
            i64, f32, i32 = "*i64", "*fp32", "i32"
            # (mask, negatives, keys): the four InfoNCE forms, and the keyed log-partition
            # (the mode a runtime argument; a mask always given, -1 for none; no queue)
            forms = [(hm, hn, False) for hm in (False, True) for hn in (False, True)]
            forms += [(True, False, True)]
            for has_mask, has_neg, keys in forms:
                sig = {"R": ty, "C": ty, "Q": ty, "W": f32, "POS": i64, "MASK": i64,
                       "KR": i64, "KC": i64, "SCALE": f32, "LOSS": f32, "MX": f32, "LL": f32,
                       "EX": f32, "PX": f32}
                sig.update({a: i32 for a in ("n", "m", "k", "D", "s_r0", "s_r1", "s_c0",
                                             "s_c1", "s_q0", "s_q1", "key_mode")})
                ce = dict(HAS_MASK=has_mask, HAS_NEG=has_neg, HAS_KEYS=keys, BM=f["BM"],
                          BN=f["BN"], BK=f["BK"], PRECISION=prec, INTERPRET=False)
                out.append((_fwd_kernel, sig, ce, f))
                sig = {"R": ty, "C": ty, "Q": ty, "W": f32, "POS": i64, "MASK": i64,
                       "KR": i64, "KC": i64, "SCALE": f32, "MX": f32, "LL": f32, "G": f32,
                       "GSCALE": f32, "DR": f32}
                sig.update({a: i32 for a in ("n", "m", "k", "D", "s_r0", "s_r1", "s_c0",
                                             "s_c1", "s_q0", "s_q1", "s_d0", "s_d1",
                                             "key_mode")})
                ce = dict(HAS_MASK=has_mask, HAS_NEG=has_neg, HAS_KEYS=keys, BM=b["BM"],
                          BN=b["BN"], BK=b["BK"], BD=b["BD"], PRECISION=prec, INTERPRET=False)
                out.append((_bwd_rows_kernel, sig, ce, b))
                if has_neg:
                    continue  # the column kernel has no queue: one entry per (mask, keys)
                sig = {"R": ty, "C": ty, "POS": i64, "MASK": i64, "KR": i64, "KC": i64,
                       "SCALE": f32, "MX": f32, "LL": f32, "G": f32, "GSCALE": f32, "DC": f32}
                sig.update({a: i32 for a in ("n", "m", "D", "s_r0", "s_r1", "s_c0", "s_c1",
                                             "s_d0", "s_d1", "key_mode")})
                ce = dict(HAS_MASK=has_mask, HAS_KEYS=keys, BM=bc["BM"], BN=bc["BN"], BK=bc["BK"],
                          BD=bc["BD"], PRECISION=prec, INTERPRET=False)
                out.append((_bwd_cols_kernel, sig, ce, bc))
    return with_fp32_precisions(out)
