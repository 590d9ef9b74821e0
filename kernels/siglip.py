"""Tiled sigmoid (SigLIP) loss kernels: no n x m matrix is ever stored.

Rows X (n x D), columns Y (m x D), scale s, bias b, logits z_ij = s * x_ij + b with
x_ij = x_i . y_j, and labels t_ij = +1 where j = p_i (the row's positive column, or -1:
none), -1 elsewhere. Per row

    loss_i = sum_j softplus(-t_ij z_ij)                 (= -sum_j log sigmoid(t_ij z_ij))
    a_i    = sum_j d_ij,   c_i = sum_j d_ij x_ij,       d_ij = -t_ij sigmoid(-t_ij z_ij)

so that for sum_i g_i loss_i:  d/db = sum_i g_i a_i,  d/ds = sum_i g_i c_i  (no extra pass),
and with G_ij = g_i d_ij:  dX_i = s sum_j G_ij y_j,  dY_j = s sum_i G_ij x_i, computed by a
row-block kernel and a column-block kernel (no atomics: bitwise reproducible).
"""
import torch
import triton
import triton.language as tl

from .infonce import _dot_tile, _interpret, _launch_opts, _precision, _TY, with_fp32_precisions


@triton.jit
def _pair_terms(x, s, b, is_pos):
    """softplus(-t z) and d = -t sigmoid(-t z) for a tile, in fp32 (base-2 exponentials)."""
    z = x * s + b
    u = tl.where(is_pos, -z, z)  # u = -t z
    e = tl.exp2(-tl.abs(u) * 1.4426950408889634)  # exp(-|u|) in (0, 1]
    w = 1.0 + e
    r = 1.0 / w
    # log1p(e) without libdevice: log(w) + (e - (w - 1)) / w corrects the rounding of w
    # (exactly e where w rounds to 1) -- log(1 + e) alone loses every term below 2^-24,
    # the whole loss of well-separated pairs.
    softplus = tl.maximum(u, 0.0) + (tl.log2(w) * 0.6931471805599453 + (e - (w - 1.0)) * r)
    sig = tl.where(u >= 0, r, e * r)  # sigmoid(u)
    d = tl.where(is_pos, -sig, sig)
    return softplus, d


@triton.jit
def _fwd_kernel(X, Y, POS, SCALE, BIAS, LOSS, A, C, n, m, D, s_x0, s_x1, s_y0, s_y1,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = rows < n
    s = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32)
    pos = tl.load(POS + rows, mask=row_ok, other=-1)
    loss = tl.zeros([BM], dtype=tl.float32)
    a = tl.zeros([BM], dtype=tl.float32)
    c = tl.zeros([BM], dtype=tl.float32)
    for c0 in range(0, m, BN):
        cols = c0 + tl.arange(0, BN).to(tl.int64)
        valid = (cols < m)[None, :] & row_ok[:, None]
        x = _dot_tile(X, rows, n, s_x0, s_x1, Y, cols, m, s_y0, s_y1, D,
                      BM, BN, BK, PRECISION, INTERPRET)
        sp, d = _pair_terms(x, s, b, cols[None, :] == pos[:, None])
        sp = tl.where(valid, sp, 0.0)
        d = tl.where(valid, d, 0.0)
        loss += tl.sum(sp, 1)
        a += tl.sum(d, 1)
        c += tl.sum(d * x, 1)
    tl.store(LOSS + rows, loss, mask=row_ok)
    tl.store(A + rows, a, mask=row_ok)
    tl.store(C + rows, c, mask=row_ok)


@triton.jit
def _bwd_rows_kernel(X, Y, POS, SCALE, BIAS, G, GSCALE, DX, n, m, D,
                     s_x0, s_x1, s_y0, s_y1, s_d0, s_d1,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    row_ok = rows < n
    dd = pid_d * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = dd < D
    s = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    pos = tl.load(POS + rows, mask=row_ok, other=-1)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for c0 in range(0, m, BN):
        cols = c0 + tl.arange(0, BN).to(tl.int64)
        col_ok = cols < m
        x = _dot_tile(X, rows, n, s_x0, s_x1, Y, cols, m, s_y0, s_y1, D,
                      BM, BN, BK, PRECISION, INTERPRET)
        _, d = _pair_terms(x, s, b, cols[None, :] == pos[:, None])
        d = tl.where(col_ok[None, :] & row_ok[:, None], d, 0.0)
        y = tl.load(Y + cols[:, None] * s_y0 + dd[None, :] * s_y1,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if INTERPRET:
            acc += tl.dot(d, y.to(tl.float32))
        else:
            acc = tl.dot(d.to(y.dtype), y, acc, input_precision=PRECISION)
    out = acc * (g * (s * tl.load(GSCALE)))[:, None]
    tl.store(DX + rows[:, None] * s_d0 + dd[None, :] * s_d1, out,
             mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_cols_kernel(X, Y, POS, SCALE, BIAS, G, GSCALE, DY, n, m, D,
                     s_x0, s_x1, s_y0, s_y1, s_d0, s_d1,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr,
                     PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    cols = pid * BN + tl.arange(0, BN).to(tl.int64)
    col_ok = cols < m
    dd = pid_d * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = dd < D
    s = tl.load(SCALE).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32)
    acc = tl.zeros([BN, BD], dtype=tl.float32)
    for r0 in range(0, n, BM):
        rows = r0 + tl.arange(0, BM).to(tl.int64)
        row_ok = rows < n
        xt = _dot_tile(Y, cols, m, s_y0, s_y1, X, rows, n, s_x0, s_x1, D,
                       BN, BM, BK, PRECISION, INTERPRET)
        g = tl.load(G + rows, mask=row_ok, other=0.0)
        pos = tl.load(POS + rows, mask=row_ok, other=-1)
        _, d = _pair_terms(xt, s, b, cols[:, None] == pos[None, :])
        gd = tl.where(col_ok[:, None] & row_ok[None, :], d, 0.0) * g[None, :]
        xr = tl.load(X + rows[:, None] * s_x0 + dd[None, :] * s_x1,
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if INTERPRET:
            acc += tl.dot(gd, xr.to(tl.float32))
        else:
            acc = tl.dot(gd.to(xr.dtype), xr, acc, input_precision=PRECISION)
    out = acc * (s * tl.load(GSCALE))
    tl.store(DY + cols[:, None] * s_d0 + dd[None, :] * s_d1, out,
             mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launchers

def config(dtype, D, interpret=None):
    """Block sizes per (dtype, D): the InfoNCE table, except 64-row forward blocks (the
    sigmoid terms hold more live values per tile; 128 rows spilled registers)."""
    from .infonce import config as infonce_config
    cfg = infonce_config(dtype, D, interpret)
    if not (_interpret() if interpret is None else interpret):
        cfg["fwd"] = dict(cfg["fwd"], BM=64)
    return cfg


def forward(rows, cols, pos_idx, scale, bias):
    """Per-row loss and statistics; returns (loss, stack([a, c])) (see the module docstring)."""
    n, D = rows.shape
    m = cols.shape[0]
    loss = torch.empty(n, device=rows.device, dtype=torch.float32)
    stats = torch.empty(2, n, device=rows.device, dtype=torch.float32)
    cfg = config(rows.dtype, D)["fwd"]
    _fwd_kernel[(triton.cdiv(n, cfg["BM"]),)](
        rows, cols, pos_idx, scale, bias, loss, stats[0], stats[1], n, m, D,
        *rows.stride(), *cols.stride(), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
        PRECISION=_precision(rows.dtype), INTERPRET=_interpret(), **_launch_opts(cfg))
    return loss, stats


def backward(rows, cols, pos_idx, scale, bias, grad, need_rows, need_cols):
    """float32 gradients of sum_i grad_i * loss_i for rows and cols (None where not needed)."""
    n, D = rows.shape
    m = cols.shape[0]
    if n == 0:  # a rank without rows: nothing flows back
        return (rows.new_zeros(rows.shape, dtype=torch.float32) if need_rows else None,
                cols.new_zeros(cols.shape, dtype=torch.float32) if need_cols else None)
    gscale = grad.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    g = (grad / gscale).contiguous()
    prec = _precision(rows.dtype)
    d_rows = d_cols = None
    if need_rows:
        cfg = config(rows.dtype, D)["bwd"]
        d_rows = torch.empty(rows.shape, device=rows.device, dtype=torch.float32)
        _bwd_rows_kernel[(triton.cdiv(n, cfg["BM"]), triton.cdiv(D, cfg["BD"]))](
            rows, cols, pos_idx, scale, bias, g, gscale, d_rows, n, m, D,
            *rows.stride(), *cols.stride(), *d_rows.stride(),
            BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BD=cfg["BD"], PRECISION=prec,
            INTERPRET=_interpret(), **_launch_opts(cfg))
    if need_cols:
        cfg = config(rows.dtype, D)["bwd_cols"]
        d_cols = torch.empty(cols.shape, device=cols.device, dtype=torch.float32)
        _bwd_cols_kernel[(triton.cdiv(m, cfg["BN"]), triton.cdiv(D, cfg["BD"]))](
            rows, cols, pos_idx, scale, bias, g, gscale, d_cols, n, m, D,
            *rows.stride(), *cols.stride(), *d_cols.stride(),
            BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], BD=cfg["BD"], PRECISION=prec,
            INTERPRET=_interpret(), **_launch_opts(cfg))
    return d_rows, d_cols


def shipped_configs():
    """Every (kernel, signature, constexprs, options) the launchers can use on a GPU."""
    out = []
    f32, i32 = "*fp32", "i32"
    for dtype, ty in _TY.items():
        for D in ((32, 128) if dtype == torch.float32 else (32, 128, 256)):
            c = config(dtype, D, interpret=False)
            base = {"X": ty, "Y": ty, "POS": "*i64", "SCALE": f32, "BIAS": f32}
            sig = dict(base, LOSS=f32, A=f32, C=f32)
            sig.update({a: i32 for a in ("n", "m", "D", "s_x0", "s_x1", "s_y0", "s_y1")})
            f = c["fwd"]
            out.append((_fwd_kernel, sig, dict(BM=f["BM"], BN=f["BN"], BK=f["BK"],
                                               PRECISION="tf32", INTERPRET=False), f))
            for fn, key, dname in ((_bwd_rows_kernel, "bwd", "DX"), (_bwd_cols_kernel, "bwd_cols", "DY")):
                b = c[key]
                sig = dict(base, G=f32, GSCALE=f32, **{dname: f32})
                sig.update({a: i32 for a in ("n", "m", "D", "s_x0", "s_x1", "s_y0", "s_y1",
                                             "s_d0", "s_d1")})
                out.append((fn, sig, dict(BM=b["BM"], BN=b["BN"], BK=b["BK"], BD=b["BD"],
                                          PRECISION="tf32", INTERPRET=False), b))
    return with_fp32_precisions(out)
