"""Portable PyTorch twins of the kernels in ``fastssl.kernels`` (the CPU path).

Each function has the signature and the contract of its kernel launcher, and the math is
the one in the kernel module's docstring. Work is chunked over column blocks so that
memory is O((n + m) * D + n * block), never O(n * m).
"""
from types import SimpleNamespace

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BLOCK = None  # column block width; None picks one per call (see _block_width)


def _block_width(n):
    """Columns per block: n x block float32 temporaries of about 8 MiB, which the C
    allocator keeps and reuses, instead of fresh pages (and page faults) per block."""
    return int(min(4096, max(64, (2 ** 21 // max(n, 1)) // 64 * 64)))


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _blocks(rows, cols, negatives, neg_scale, block):
    """Yield (start, x, is_negative) for each column block: x = rows @ block^T in float32
    (float64 for float64 inputs)."""
    block = block or BLOCK or _block_width(rows.shape[0])
    acc = _acc(rows)
    r = rows.to(acc)
    for c0 in range(0, cols.shape[0], block):
        yield c0, r @ cols[c0:c0 + block].to(acc).T, False
    if negatives is not None:
        for c0 in range(0, negatives.shape[0], block):
            x = r @ negatives[c0:c0 + block].to(acc).T
            if neg_scale is not None:
                x = x * neg_scale[c0:c0 + block].to(acc)
            yield c0, x, True


def _local(idx, c0, width):
    """(clamped column index in this block [n, 1], whether it falls in the block [n, 1])."""
    local = idx - c0
    hit = (local >= 0) & (local < width)
    return local.clamp(0, width - 1)[:, None], hit[:, None]


def _mask_out(t, mask_idx, c0, value):
    """t[i, mask_idx[i] - c0] = value where that column is in this block; O(n), in place."""
    if mask_idx is None:
        return t
    loc, hit = _local(mask_idx, c0, t.shape[1])
    return t.scatter_(1, loc, torch.where(hit, value, t.gather(1, loc)))


def _rate(scale, dtype):
    """(sign(s), a = |s| log2 e, a clamped to the dtype's normal range) (kernels/infonce.py)."""
    s = scale.to(dtype)
    info = torch.finfo(dtype)
    a = s.abs() * LOG2E
    return torch.where(s < 0, -1.0, 1.0).to(dtype), a, a.clamp(info.tiny, info.max)


def _keyed_out(keys, key_mode, n, c0, width):
    """(n, width) bool: the block's columns that the keys leave out of each row's
    log-partition (mode 1: the row's own key; mode 2: every other key), or None."""
    if keys is None or key_mode == 0:
        return None
    same = keys[:n, None] == keys[n + c0:n + c0 + width][None, :]
    return same if key_mode == 1 else ~same


def infonce_forward(rows, cols, negatives, neg_scale, pos_idx, mask_idx, scale, block=None,
                    keys=None, key_mode=0):
    """Per-row loss and statistics; returns (loss, stack([mx, ll, ex, px])). ``keys`` and
    ``key_mode`` as in kernels/infonce.py's ``forward``."""
    n = rows.shape[0]
    acc = _acc(rows)
    sign, a, a_p = _rate(scale, acc)
    dev = rows.device
    m_i = torch.full((n,), float("-inf"), device=dev, dtype=acc)
    l_i = torch.zeros(n, device=dev, dtype=acc)
    e_i = torch.zeros(n, device=dev, dtype=acc)
    px = torch.zeros(n, device=dev, dtype=acc)
    has_pos = pos_idx >= 0
    for c0, x, is_neg in _blocks(rows, cols, negatives, neg_scale, block):
        y = x * sign
        if not is_neg:
            loc, hit = _local(pos_idx, c0, x.shape[1])
            px += torch.where(hit[:, 0] & has_pos, x.gather(1, loc)[:, 0], 0.0)
            _mask_out(y, mask_idx, c0, float("-inf"))
            out = _keyed_out(keys, key_mode, n, c0, x.shape[1])
            if out is not None:
                y.masked_fill_(out, float("-inf"))
        m_new = torch.maximum(m_i, y.amax(1))
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp2(a_p * (m_i - m_use))
        p = y.sub_(m_use[:, None]).mul_(a_p).exp2_()
        l_i = l_i * alpha + p.sum(1)
        e_i = e_i * alpha + p.mul_(x).sum(1)
        m_i = m_new
    m_i = torch.where(m_i == float("-inf"), 0.0, m_i)
    ll = torch.log2(l_i)
    head = torch.where(has_pos, m_i - sign * px, m_i)
    nz = head != 0
    head = torch.where(nz, a * torch.where(nz, head, 1.0), 0.0)
    ex = torch.where(l_i > 0, e_i / torch.where(l_i > 0, l_i, 1.0), 0.0)  # empty set: 0
    return (head + ll) * LN2, torch.stack([m_i, ll, ex, px])


def infonce_backward(rows, cols, negatives, neg_scale, pos_idx, mask_idx, scale, stats, grad,
                     need_rows, need_cols, block=None, keys=None, key_mode=0):
    """Gradients of sum_i grad_i * loss_i for rows and cols (None where not needed), in the
    arithmetic dtype; ``stats`` as returned by ``infonce_forward``."""
    acc = _acc(rows)
    s = scale.to(acc)
    sign, _, a_p = _rate(scale, acc)
    mx, ll = stats[0].to(acc), stats[1].to(acc)
    r = rows.to(acc)
    g = grad.to(acc)
    d_rows = torch.zeros_like(r) if need_rows else None
    d_cols = torch.zeros(cols.shape, device=cols.device, dtype=acc) if need_cols else None
    for c0, x, is_neg in _blocks(rows, cols, negatives, neg_scale, block):
        width = x.shape[1]
        # G = g_i (P_ij - [j = p_i]), built in place in the block of products.
        gm = x.mul_(sign).sub_(mx[:, None]).mul_(a_p).sub_(ll[:, None]).clamp_(max=0.0)
        gm = gm.exp2_().mul_(g[:, None])
        if is_neg:
            if neg_scale is not None:
                gm.mul_(neg_scale[c0:c0 + width].to(acc))
            if need_rows:
                d_rows += gm @ negatives[c0:c0 + width].to(acc)
            continue
        _mask_out(gm, mask_idx, c0, 0.0)
        out = _keyed_out(keys, key_mode, rows.shape[0], c0, width)
        if out is not None:
            gm.masked_fill_(out, 0.0)
        loc, hit = _local(pos_idx, c0, width)
        gm.scatter_add_(1, loc, torch.where(hit & (pos_idx >= 0)[:, None], -g[:, None], 0.0))
        if need_rows:
            d_rows += gm @ cols[c0:c0 + width].to(acc)
        if need_cols:
            d_cols[c0:c0 + width] = gm.T @ r
    d_rows = d_rows * s if need_rows else None
    d_cols = d_cols * s if need_cols else None
    return d_rows, d_cols


def _positives(pos_idx, c0, width):
    """Where each row's positive falls in columns [c0, c0 + width): (column within the block,
    clamped [n, 1]; whether it is in the block [n, 1]). O(n) and free of data-dependent
    shapes (no ``nonzero``), so it runs on meta tensors and traces into one graph."""
    return _local(pos_idx, c0, width)


def _flip(t, at):
    """Negate, in place, each row's entry at its positive column where ``at`` (from
    ``_positives``) says it lies in this block; rows without one are left as they are."""
    loc, hit = at
    picked = t.gather(1, loc)
    t.scatter_(1, loc, torch.where(hit, -picked, picked))


def _pair_derivative(v, at):
    """d = dl/dz = -t sigmoid(-t z) from v = t z, in place: sigmoid(-v), then -1 times it at
    the positives (t = +1)."""
    d = v.neg_().sigmoid_()
    _flip(d, at)
    return d


# The eager backward keeps dl/dz from the forward (instead of recomputing the logits) when
# the n x m matrix has at most this many entries (16 MiB in float32): one matrix, where the
# eager formulation holds several of that size. Above it the recomputation costs a few
# percent (n = 4096: ~5%) and keeping would double fastssl's peak memory.
KEEP_PAIRS = 1 << 22


def _siglip_fold(x, s, b, pos_idx, c0, loss, a, c, keep):
    """Fold the column block x = rows . cols[c0:c0 + w]^T into the per-row loss, a and c,
    in row chunks whose temporaries stay near 2 MiB (the allocator reuses those; a full-size
    temporary would be fresh pages on every call). ``keep``: overwrite x with d = dl/dz."""
    n, w = x.shape
    step = max(1, (1 << 19) // max(w, 1))
    for r0 in range(0, n, step):
        xr = x[r0:r0 + step]
        at = _positives(pos_idx[r0:r0 + step], c0, w)
        v = torch.mul(xr, -s).sub_(b)                                 # -z
        _flip(v, at)                                                  # t z
        loss[r0:r0 + step] -= torch.nn.functional.logsigmoid(v).sum(1)  # softplus(-t z)
        d = _pair_derivative(v, at)
        a[r0:r0 + step] += d.sum(1)
        c[r0:r0 + step] += torch.linalg.vecdot(d, xr, dim=1)
        if keep:
            xr.copy_(d)


def siglip_forward(rows, cols, pos_idx, scale, bias, block=None, keep=False):
    """Per-row sigmoid loss and statistics; returns (loss, stack([a, c])) (kernels/siglip.py):
    loss_i = sum_j softplus(-t_ij z_ij), a_i = sum_j d_ij, c_i = sum_j d_ij x_ij with
    z = s x + b and d = dl/dz, from column blocks of x folded in row chunks (v = t z is -z
    with the positives negated back; no dense label matrix). ``keep``: one block, which
    ends up holding d (n x m) and is returned too."""
    acc = _acc(rows)
    s, b = scale.to(acc), bias.to(acc)
    n = rows.shape[0]
    loss, a, c = (torch.zeros(n, device=rows.device, dtype=acc) for _ in range(3))
    kept = None
    for c0, x, _ in _blocks(rows, cols, None, None, max(cols.shape[0], 1) if keep else block):
        _siglip_fold(x, s, b, pos_idx, c0, loss, a, c, keep)
        kept = x
    stats = torch.stack([a, c])
    return (loss, stats, kept) if keep else (loss, stats)


def siglip_backward_kept(rows, cols, kept, scale, grad, need_rows, need_cols):
    """The gradients from the d = dl/dz that ``siglip_forward(keep=True)`` returned."""
    acc = _acc(rows)
    s = scale.to(acc)
    gd = kept * grad.to(acc)[:, None]
    d_rows = (gd @ cols.to(acc)).mul_(s) if need_rows else None
    d_cols = (gd.T @ rows.to(acc)).mul_(s) if need_cols else None
    return d_rows, d_cols


def siglip_backward(rows, cols, pos_idx, scale, bias, grad, need_rows, need_cols, block=None):
    """Gradients of sum_i grad_i * loss_i for rows and cols (None where not needed)."""
    acc = _acc(rows)
    s, b = scale.to(acc), bias.to(acc)
    r = rows.to(acc)
    g = grad.to(acc)[:, None]
    d_rows = torch.zeros_like(r) if need_rows else None
    d_cols = torch.zeros(cols.shape, device=cols.device, dtype=acc) if need_cols else None
    for c0, x, _ in _blocks(rows, cols, None, None, block):
        width = x.shape[1]
        at = _positives(pos_idx, c0, width)
        v = x.mul_(-s).sub_(b)
        _flip(v, at)
        gd = _pair_derivative(v, at).mul_(g)
        if need_rows:
            d_rows.addmm_(gd, cols[c0:c0 + width].to(acc))
        if need_cols:
            torch.mm(gd.T, r, out=d_cols[c0:c0 + width])
    return (d_rows.mul_(s) if need_rows else None), (d_cols.mul_(s) if need_cols else None)


def gram_inner(a, b, block=None):
    """sum_ij (a_i . a_j)(b_i . b_j) (kernels/barlow.py), in row blocks of the Gram matrices."""
    acc = _acc(a)
    a32, b32 = a.to(acc), b.to(acc)
    block = block or BLOCK or _block_width(a.shape[0])
    total = a32.new_zeros(())
    for r0 in range(0, a.shape[0], block):
        total = total + ((a32[r0:r0 + block] @ a32.T) * (b32[r0:r0 + block] @ b32.T)).sum()
    return total


def gram_apply(w, x, block=None):
    """(w w^T) x in the arithmetic dtype, in row blocks of the Gram matrix."""
    acc = _acc(w)
    w32, x32 = w.to(acc), x.to(acc)
    block = block or BLOCK or _block_width(w.shape[0])
    out = torch.empty(x.shape, device=x.device, dtype=acc)
    for r0 in range(0, w.shape[0], block):
        out[r0:r0 + block] = (w32[r0:r0 + block] @ w32.T) @ x32
    return out


def scaled_std(var_y, m, eps):
    """sqrt(m^2 var_y + eps) without overflow or underflow in the intermediate terms:
    m sqrt(var_y + eps / m^2) for m >= 1, sqrt(m^2 var_y + eps) below (var_y is the
    variance of z / m). kernels/barlow.py computes its rstd = 1 / this the same way."""
    big = m >= 1
    one = torch.ones_like(m)
    mb, ms = torch.where(big, m, one), torch.where(big, one, m)
    return torch.where(big, mb * torch.sqrt(var_y + eps / (mb * mb)),
                       torch.sqrt(ms * ms * var_y + eps))


def feature_stats(z, eps):
    """Per-feature (mean, rstd = 1 / sqrt(biased var + eps)), scale-safe: each feature is
    divided by its max |z| (m) before the sums, so no square overflows (kernels/barlow.py)."""
    zf = z.to(_acc(z))
    m = zf.abs().amax(0)
    m = torch.where(m > 0, m, torch.ones_like(m))
    # torch's batch-norm statistics kernel (one fused pass; eps 0: invstd = 1 / sqrt(var),
    # 0 for a constant feature).
    _, mean_y, invstd_y = torch.native_batch_norm(zf / m, None, None, None, None, True, 0.0, 0.0)
    var_y = torch.where(invstd_y > 0, 1.0 / invstd_y.square(), torch.zeros_like(invstd_y))
    return mean_y * m, 1.0 / scaled_std(var_y, m, eps)


def standardize(z, eps):
    """(a, [mean, rstd]) with a = (z - mean) * rstd per feature (kernels/barlow.py)."""
    mean, rstd = feature_stats(z, eps)
    return (z.to(mean.dtype) - mean) * rstd, torch.stack([mean, rstd])


def standardize_backward(z, grad_a, stats, eps):
    """dz = rstd * (da - mean(da) - a * mean(da * a)), evaluated in float64 with the
    statistics recomputed from z in float64 (O(N D), next to the O(N D^2) or O(N^2 D)
    products of the loss). With few rows the terms nearly cancel: for N = 2, dz carries the
    factor 1 - var * rstd^2 = eps / (var + eps), of which float32 statistics keep no digit
    (measured on a (2, 4) Barlow Twins batch: float32 arithmetic ~1e-3 off, torch's
    batch-norm backward ~2e-4, this ~1e-6).
    ``stats`` (the forward's, float32 or float64) sets the returned dtype."""
    mean, rstd = feature_stats(z.to(torch.float64), eps)
    a = (z.to(torch.float64) - mean).mul_(rstd)
    g = grad_a.to(torch.float64)
    ga = torch.linalg.vecdot(g, a, dim=0) / g.shape[0]
    return a.mul_(-ga).add_(g).sub_(g.mean(0)).mul_(rstd).to(stats.dtype)


# ----------------------------------------------------------------------------- prototype passes

def _debias(t, bias, k0, k1, acc):
    """(s, e): t - c for the bias columns k0:k1 as the rounded difference s and its
    rounding error e (Knuth's two-sum; c = hi + lo for a float64 bias with float32 t), so
    that (s - m) + e, with s - m exact near the row maximum, is t - c - m to a rounding of
    itself rather than of |t - c| (kernels/prototype.py's module docstring). None for no
    bias; e = None in float64."""
    if bias is None:
        return t, None
    c = bias[k0:k1]
    if acc == torch.float64:
        return t - c.to(acc), None
    hi = c.to(acc)
    s = t - hi
    bb = s - t
    e = (t - (s - bb)) + (-hi - bb)
    if c.dtype == torch.float64:
        e -= (c - hi.double()).to(acc)
    return s, e


def _shifted(s, e, m):
    """(s - m) + e in place of s: the exponent of every pass before its scale."""
    s = s.sub_(m)
    return s if e is None else s.add_(e)


def prototype_rows(x, keys, vals, bias, scale, block=None):
    """(stats (n, 2) = [m_i, l_i], out (n, E) or None) of kernels/prototype.py's ``rows``
    pass, in prototype chunks with an online softmax (max over the products, as the
    kernel)."""
    acc = _acc(x)
    n, K = x.shape[0], keys.shape[0]
    block = block or BLOCK or _block_width(n)
    xa = x.to(acc)
    m_run = torch.full((n,), -float("inf"), dtype=acc, device=x.device)
    z = torch.zeros(n, dtype=acc, device=x.device)
    out = None if vals is None else torch.zeros(n, vals.shape[1], dtype=acc, device=x.device)
    for k0 in range(0, K, block):
        t, e = _debias(xa @ keys[k0:k0 + block].to(acc).T, bias, k0, k0 + block, acc)
        m_new = torch.maximum(m_run, t.amax(1))
        alpha = torch.exp((m_run - m_new) * scale)
        t = _shifted(t, e, m_new[:, None]).mul_(scale).exp_()
        z = z * alpha + t.sum(1)
        if out is not None:
            out = torch.addmm(out * alpha[:, None], t, vals[k0:k0 + block].to(acc))
        m_run = m_new
    st = torch.stack([m_run, torch.log(z)], 1)
    return st, None if out is None else out / z[:, None]


def prototype_cols(x, keys, bias, scale, st, y, out=None, alpha=1.0, block=None):
    """out (K, E) = sum_i exp(s (x_i . p_k - c_k - m_i) - l_i) y_i with st = [m, l] from
    ``prototype_rows``, or out += alpha * that with ``out`` given (kernels/prototype.py's
    ``cols``)."""
    acc = _acc(x)
    K = keys.shape[0]
    block = block or BLOCK or _block_width(x.shape[0])
    xa, ya = x.to(acc), y.to(acc)
    m_r, l_r = st[:, 0, None].to(acc), st[:, 1, None].to(acc)
    accumulate = out is not None
    if out is None:
        out = torch.empty(K, y.shape[1], dtype=acc, device=x.device)
    for k0 in range(0, K, block):
        t, e = _debias(xa @ keys[k0:k0 + block].to(acc).T, bias, k0, k0 + block, acc)
        t = _shifted(t, e, m_r).mul_(scale).sub_(l_r).clamp_(max=0).exp_()
        if accumulate:
            out[k0:k0 + block].addmm_(t.T, ya, alpha=alpha)
        else:
            torch.mm(t.T, ya, out=out[k0:k0 + block])
            if alpha != 1.0:
                out[k0:k0 + block] *= alpha
    return out



def _pair_chunks(s, w, t, v, bias, scale_t, st_t, pidx, pw, block):
    """Yield (k0, w chunk, student scores x, target R) per prototype chunk (see
    ``prototype_pair_value``): the teacher's softmax of every row once per chunk, gathered
    into the student rows' targets."""
    acc = _acc(s)
    block = block or BLOCK or _block_width(max(s.shape[0], t.shape[0]))
    sa, ta = s.to(acc), t.to(acc)
    m_t, l_t = st_t[:, 0, None].to(acc), st_t[:, 1, None].to(acc)
    pw = pw.to(acc)
    # row r against teacher row r (iBOT's pairing): the target is the teacher's softmax
    # scaled in place, no gather
    own = pidx.shape[1] == 1 and pidx.shape[0] == t.shape[0] and torch.equal(
        pidx[:, 0], torch.arange(pidx.shape[0], device=pidx.device, dtype=pidx.dtype))
    for k0 in range(0, w.shape[0], block):
        wk = w[k0:k0 + block].to(acc)
        xt, e = _debias(ta @ v[k0:k0 + block].to(acc).T, bias, k0, k0 + block, acc)
        pt = _shifted(xt, e, m_t).mul_(scale_t).sub_(l_t).clamp_(max=0).exp_()
        if own:
            r = pt.mul_(pw)
        else:
            r = pt[pidx[:, 0]].mul_(pw[:, 0, None])
            for j in range(1, pidx.shape[1]):
                r.addcmul_(pw[:, j, None], pt[pidx[:, j]])
        del pt
        yield k0, wk, sa @ wk.T, r


def prototype_pair_value(s, w, t, v, bias, scale_s, scale_t, st_s, st_t, pidx, pw, block=None):
    """kernels/prototype.py's ``pair_value``, in prototype chunks: with the row statistics of
    ``prototype_rows`` (st_s of s against w at scale_s; st_t of t against v, bias c, at
    scale_t) and the pair table (pidx, pw) (n, P), each student row's target is
    R_ik = sum_p pw_ip P^t_{pidx_ip, k}, P = exp(scale (x - m) - l); returns (n,)
    sum_k R_ik (l_i + scale_s (m_i - x_ik)) = -sum_k R_ik log P^s_ik."""
    acc = _acc(s)
    m_s, l_s = st_s[:, 0, None].to(acc), st_s[:, 1, None].to(acc)
    out = torch.zeros(s.shape[0], dtype=acc, device=s.device)
    for _, _, xs, r in _pair_chunks(s, w, t, v, bias, scale_t, st_t, pidx, pw, block):
        out += (r * xs.neg_().add_(m_s).clamp_(min=0).mul_(scale_s).add_(l_s)).sum(1)
    return out


def prototype_pair_grad(s, w, t, v, bias, scale_s, scale_t, st_s, st_t, pidx, pw, a,
                        need_rows, need_cols, block=None):
    """kernels/prototype.py's ``pair_grad``: with d_ik = a_i P^s_ik - R_ik (the targets of
    ``prototype_pair_value`` at weights pw), (sum_k d_ik w_k (n, D) or None,
    sum_i d_ik s_i (K, D) or None), both from one pass over the chunks."""
    acc = _acc(s)
    m_s, l_s = st_s[:, 0, None].to(acc), st_s[:, 1, None].to(acc)
    a = a.to(acc)[:, None]
    rows = torch.zeros(s.shape[0], s.shape[1], dtype=acc, device=s.device) if need_rows else None
    cols = torch.empty(w.shape[0], s.shape[1], dtype=acc, device=s.device) if need_cols else None
    sa = s.to(acc)
    for k0, wk, xs, r in _pair_chunks(s, w, t, v, bias, scale_t, st_t, pidx, pw, block):
        d = xs.sub_(m_s).mul_(scale_s).sub_(l_s).clamp_(max=0).exp_().mul_(a).sub_(r)
        if need_rows:
            rows.addmm_(d, wk)
        if need_cols:
            torch.mm(d.T, sa, out=cols[k0:k0 + wk.shape[0]])
    return rows, cols

# ----------------------------------------------------------------------------- masked patches

def _patch_rows(images, p, idx):
    """The target patches of flattened patch indices ``idx`` (n L + l), (len(idx), P) in
    MAE's order (py, px, c): gathered from a strided view, no patchified copy of the batch."""
    N, C, H, W = images.shape
    Wp = W // p
    view = images.view(N, C, H // p, p, Wp, p).permute(0, 2, 4, 3, 5, 1)
    L = (H // p) * Wp
    n, l = idx // L, idx % L
    return view[n, l // Wp, l % Wp].reshape(idx.shape[0], -1)


def _elem_(d, loss, beta):
    """(elementwise loss, its derivative) of d, the loss formed in place in d's storage
    where it can be (the derivative is a second tensor only where it is asked for)."""
    if loss == "mse":
        return d.square(), d.mul(2)
    if loss == "l1":
        return d.abs(), torch.sign(d)
    small = d.abs() < beta
    return (torch.where(small, 0.5 * d * d / beta, d.abs() - 0.5 * beta),
            torch.where(small, d / beta, torch.sign(d)))


def _masked_chunks(weight, prow, P):
    """Chunks of the weighted patches that a pred row predicts: about 2^18 values each."""
    live = ((weight != 0) & (prow >= 0)).nonzero().flatten()
    chunk = max(1, 2 ** 18 // P)
    for i0 in range(0, live.numel(), chunk):
        yield live[i0:i0 + chunk]


def _residual(pred, images, p, idx, prow, mu, rstd):
    """pred rows minus the normalised targets of patches ``idx``, in the arithmetic dtype."""
    acc = _acc(pred)
    t = _patch_rows(images, p, idx).to(acc)
    if mu is not None:
        t.sub_(mu[:, None]).mul_(rstd[:, None])
    return pred[prow[idx]].to(acc).sub_(t)


def masked_patch_forward(pred, images, weight, prow, p, norm_pix, loss, beta, eps, keep=False):
    """kernels/masked.py's ``forward``, in chunks of masked patches. With ``keep`` it also
    returns d ell_r / d pred for every pred row (a pred-shaped buffer, zero where no weighted
    patch is predicted): the backward then only scales it, instead of reading the images
    again."""
    R, P = weight.shape[0], pred.shape[1]
    acc = _acc(pred)
    kept = torch.zeros_like(pred, dtype=acc, memory_format=torch.contiguous_format) \
        if keep else None
    ell = torch.zeros(R, dtype=acc, device=pred.device)
    st = torch.zeros(R, 2, dtype=acc, device=pred.device)
    st[:, 1] = 1.0
    for idx in _masked_chunks(weight, prow, P):
        mu = rstd = None
        if norm_pix:
            t = _patch_rows(images, p, idx).to(acc)
            mu = t.mean(1)
            rstd = torch.rsqrt(t.sub_(mu[:, None]).square_().sum(1).div_(P - 1).add_(eps))
            del t
            st[idx, 0], st[idx, 1] = mu, rstd
        d = _residual(pred, images, p, idx, prow, mu, rstd)
        if keep:
            e, g = _elem_(d, loss, beta)
            ell[idx] = e.mean(1)
            kept[prow[idx]] = g.div_(P)
        elif loss == "mse":
            ell[idx] = d.square_().mean(1)
        else:
            ell[idx] = _elem_(d, loss, beta)[0].mean(1)
    return (ell, st, kept) if keep else (ell, st)


def masked_patch_backward_kept(kept, weight, prow, coef):
    """The gradient from ``masked_patch_forward(..., keep=True)``'s buffer, scaled in place
    by each row's coefficient (the buffer becomes the gradient)."""
    live = (weight != 0) & (prow >= 0)
    scale = torch.zeros(kept.shape[0], dtype=kept.dtype, device=kept.device)
    scale[prow[live]] = coef[live].to(kept.dtype)
    return kept.mul_(scale[:, None])


def masked_patch_backward(pred, images, weight, prow, p, norm_pix, loss, beta, stats, coef):
    """kernels/masked.py's ``backward``: the targets recomputed from ``stats``."""
    acc = _acc(pred)
    P = pred.shape[1]
    d = torch.zeros_like(pred, memory_format=torch.contiguous_format)
    for idx in _masked_chunks(weight, prow, P):
        mu = stats[idx, 0].to(acc) if norm_pix else None
        rstd = stats[idx, 1].to(acc) if norm_pix else None
        r = _residual(pred, images, p, idx, prow, mu, rstd)
        scale = (coef[idx].to(acc) / P)[:, None]
        g = r.mul_(2 * scale) if loss == "mse" else _elem_(r, loss, beta)[1].mul_(scale)
        d[prow[idx]] = g.to(d.dtype)
    return d


# ----------------------------------------------------------------------------- latent targets

LATENT_CHUNK = 2 ** 18  # float values per temporary (one layer's) on the portable path


def latent_stats(targets, eps, acc):
    """kernels/masked.py's ``latent_stats`` in ``acc``: (2, K, N, D) mean and
    1 / sqrt(biased var + eps) over the L tokens, two passes over chunks of images of one
    layer: float temporaries of about LATENT_CHUNK values (at least one image's L D), never
    a float copy of the targets. (``torch.var_mean`` over L, the middle dimension, runs
    ~15x slower on CPU.)"""
    K, N, L, D = targets.shape
    st = torch.empty(2, K, N, D, dtype=acc, device=targets.device)
    step = max(1, LATENT_CHUNK // max(L * D, 1))
    for k in range(K):
        for n0 in range(0, N, step):
            t = targets[k, n0:n0 + step].to(acc)  # (c, L, D); may be the targets themselves
            mu = t.mean(1)
            var = (t - mu[:, None]).square_().mean(1)
            st[0, k, n0:n0 + step], st[1, k, n0:n0 + step] = mu, var.add_(eps).rsqrt_()
    return st


def _latent_chunks(weight, prow, D):
    """Chunks of the scored pairs (weight != 0, a pred row): about LATENT_CHUNK values of D."""
    live = ((weight != 0) & (prow >= 0)).nonzero().flatten()
    chunk = max(1, LATENT_CHUNK // max(D, 1))
    for i0 in range(0, live.numel(), chunk):
        yield live[i0:i0 + chunk]


def _token_rows(targets, k, trow):
    """Rows ``trow`` (n L + l) of layer k, (c, D) in the targets' dtype: a row gather of the
    (N L, D) view where the layer's strides allow one, else an advanced-index gather."""
    K, N, L, D = targets.shape
    layer = targets[k]
    if N <= 1 or layer.stride(0) == L * layer.stride(1):
        return layer.reshape(N * L, D).index_select(0, trow)  # reshape is a view here
    return layer[trow // L, trow % L]


def _latent_y(targets, trow, inorm, acc):
    """The averaged (and instance-normalised) targets y (c, D) of tokens ``trow`` (n L + l),
    gathered one layer at a time (temporaries of c D values)."""
    K, L = targets.shape[0], targets.shape[2]
    n = trow // L
    y = None
    for k in range(K):
        a = _token_rows(targets, k, trow).to(acc)  # a fresh gather
        if inorm.numel():
            a.sub_(inorm[0, k].index_select(0, n)).mul_(inorm[1, k].index_select(0, n))
        y = a if y is None else y.add_(a)
    return y.div_(K)


def _layer_norm(y, eps):
    """y (c, D) layer-normalised over D: (y', mu, rstd), torch's fused layer norm (its
    statistics one-pass and free of cancellation)."""
    out, mu, rstd = torch.native_layer_norm(y, (y.shape[1],), None, None, eps)
    return out, mu[:, 0], rstd[:, 0]


def _pair_loss(d, loss, beta, grad):
    """(sum_d l(d) per row, dl/dd or None) with fused row reductions. Smooth-L1 from
    c = clamp(d, -beta, beta): l = c (d - c / 2) / beta and dl/dd = c / beta."""
    if loss == "mse":
        return torch.linalg.vecdot(d, d), (d.mul(2) if grad else None)
    if loss == "l1":
        return d.abs().sum(1), (torch.sign(d) if grad else None)
    c = d.clamp(-beta, beta)
    ell = torch.linalg.vecdot(c, d.add(c, alpha=-0.5)).div_(beta)
    return ell, (c.div_(beta) if grad else None)


def latent_forward(pred, targets, weight, prow, trow, loss, beta, layer_norm, instance_norm,
                   scale, eps, keep=False):
    """kernels/masked.py's ``latent_forward``, in chunks of scored pairs. With ``keep`` it
    also returns d ell_j / d pred for every pred row (a pred-shaped buffer, zero in rows no
    scored pair predicts), which the backward only scales."""
    acc = _acc(pred)
    K, N, L, D = targets.shape
    Q = weight.shape[0]
    inorm = latent_stats(targets, eps, acc) if instance_norm else \
        torch.empty(0, dtype=acc, device=pred.device)
    kept = torch.zeros_like(pred, dtype=acc, memory_format=torch.contiguous_format) \
        if keep else None
    ell = torch.zeros(Q, dtype=acc, device=pred.device)
    st = torch.zeros(Q, 2, dtype=acc, device=pred.device)
    st[:, 1] = 1.0
    for idx in _latent_chunks(weight, prow, D):
        y = _latent_y(targets, trow[idx], inorm, acc)
        if layer_norm:
            y, st[idx, 0], st[idx, 1] = _layer_norm(y, eps)
        d = y.neg_().add_(pred[prow[idx]])  # pred - y', in y's storage
        e, g = _pair_loss(d, loss, beta, keep)
        ell[idx] = e.div_(scale)
        if keep:
            kept[prow[idx]] = g.div_(scale)
    return (ell, st, inorm, kept) if keep else (ell, st, inorm)


def latent_backward(pred, targets, weight, prow, trow, loss, beta, layer_norm, instance_norm,
                    scale, stats, inorm, coef):
    """kernels/masked.py's ``latent_backward``: the targets recomputed from the statistics
    (mean 0 and rstd 1 without layer_norm)."""
    acc = _acc(pred)
    D = targets.shape[3]
    inorm = inorm.to(acc)
    d = torch.zeros_like(pred, memory_format=torch.contiguous_format)
    for idx in _latent_chunks(weight, prow, D):
        y = _latent_y(targets, trow[idx], inorm, acc)
        y.sub_(stats[idx, 0].to(acc)[:, None]).mul_(stats[idx, 1].to(acc)[:, None])
        r = y.neg_().add_(pred[prow[idx]])
        g = _pair_loss(r, loss, beta, True)[1].mul_((coef[idx].to(acc) / scale)[:, None])
        d[prow[idx]] = g.to(d.dtype)
    return d



# ----------------------------------------------------------------------------- k-means

def kmeans_assign(x, centroids, spherical, block=None):
    """kernels/kmeans.py's ``assign`` in (row chunk x centroid chunk) tiles of about 2^21
    scores: (labels (N,) int64, distances (N,) in the arithmetic dtype); ties to the lowest
    index (a later centroid chunk wins only when strictly closer).

    Each tile is one GEMM with the centroid term folded in as an extra column:
    s_k = x . c_k - ||c_k||^2 / 2 (spherical: x . c_k), the nearest centroid the largest
    s_k and the distance ||x||^2 - 2 s (spherical: 1 - s). On the CPU the GEMM and the
    arg-max run in numpy, whose OpenBLAS sgemm is 1.6-2x the speed of the MKL sgemm of
    torch's x86 wheels (NOTES, "k-means on the CPU"); elsewhere in torch."""
    acc = _acc(x)
    n, K = x.shape[0], centroids.shape[0]
    D = x.shape[1]
    cols = block or BLOCK or min(K, 4096)
    rows = max(64, 2 ** 21 // max(cols, 1))
    c = centroids.to(acc)
    # (K, D + 1): [c, -||c||^2 / 2]; the row chunks carry a matching column of ones
    ca = torch.cat([c, (torch.linalg.vecdot(c, c) * -0.5)[:, None] if not spherical
                    else torch.zeros(K, 1, dtype=acc, device=x.device)], 1)
    if x.device.type == "cpu":  # in numpy: torch's and OpenBLAS's threads would contend
        return _numpy_assign(x.detach().contiguous().to(acc).numpy(), ca.numpy(), spherical,
                             rows, cols)
    label = torch.empty(n, dtype=torch.int64, device=x.device)
    best_all = torch.empty(n, dtype=acc, device=x.device)
    xa = torch.empty(min(rows, n), D + 1, dtype=acc, device=x.device)
    xa[:, D] = 1.0
    score = torch.empty(xa.shape[0], min(cols, K), dtype=acc, device=x.device)
    for r0 in range(0, n, rows):
        m = min(rows, n - r0)
        xa[:m, :D] = x[r0:r0 + m]
        best = torch.full((m,), -float("inf"), dtype=acc, device=x.device)
        arg = torch.zeros(m, dtype=torch.int64, device=x.device)
        for k0 in range(0, K, cols):
            s = torch.mm(xa[:m], ca[k0:k0 + cols].T, out=score[:m, :min(cols, K - k0)])
            tile_best, tile_arg = s.max(1)
            better = tile_best > best
            arg = torch.where(better, tile_arg + k0, arg)
            best = torch.where(better, tile_best, best)
        label[r0:r0 + m], best_all[r0:r0 + m] = arg, best
    if spherical:
        return label, 1.0 - best_all
    xa = x.to(acc)
    return label, best_all.mul_(-2.0).add_(torch.linalg.vecdot(xa, xa)).clamp_(min=0)


def _numpy_assign(x, ca, spherical, rows, cols):
    """``kmeans_assign`` on numpy arrays: x (N, D), ca (K, D + 1) = [c, -||c||^2 / 2]."""
    import numpy as np
    n, D = x.shape
    xa = np.empty((min(rows, n), D + 1), x.dtype)
    xa[:, D] = 1.0
    score = np.empty((xa.shape[0], min(cols, ca.shape[0])), x.dtype)
    label = np.empty(n, np.int64)
    best = np.empty(n, x.dtype)
    for r0 in range(0, n, rows):
        m = min(rows, n - r0)
        xa[:m, :D] = x[r0:r0 + m]
        best[r0:r0 + m], label[r0:r0 + m] = _numpy_tiles(np, xa[:m], ca, score[:m], cols)
    if spherical:
        dist = 1.0 - best
    else:
        dist = np.einsum("ij,ij->i", x, x)
        dist -= 2.0 * best
        np.maximum(dist, 0, out=dist)
    return torch.from_numpy(label), torch.from_numpy(dist)


def _numpy_tiles(np, xa, ca, score, cols):
    """(best score, arg) of one row chunk against every centroid chunk, in numpy."""
    m, K = xa.shape[0], ca.shape[0]
    rows = np.arange(m)
    best = arg = None
    for k0 in range(0, K, cols):
        s = score[:, :min(cols, K - k0)]
        np.matmul(xa, ca[k0:k0 + cols].T, out=s)
        a = s.argmax(1)
        b = s[rows, a]
        if best is None:
            best, arg = b, a
        else:
            better = b > best
            arg = np.where(better, a + k0, arg)
            best = np.where(better, b, best)
    return best, arg


def kmeans_segment_sum(x, labels, K):
    """(K, D) in the arithmetic dtype: the sum of x's rows per label (``index_add_``, in row
    order: deterministic on the CPU)."""
    acc = _acc(x)
    return torch.zeros(K, x.shape[1], dtype=acc, device=x.device).index_add_(0, labels,
                                                                            x.to(acc))


# ----------------------------------------------------------------------------- ECF sketch

def _sample_chunk(V, M, K):
    """Samples per chunk: V x chunk x M x K temporaries of about 2^21 elements."""
    return max(1, 2 ** 21 // max(V * M * K, 1))


def ecf_forward(x, t):
    """kernels/sketch.py's ``forward``: (C, S) (V, M, K) in the arithmetic dtype, the cos
    and sin sums over the samples, in chunks of samples (never an (N x M x K) tensor)."""
    acc = _acc(x)
    V, N, M = x.shape
    K = t.shape[0]
    t = t.to(acc)
    C = torch.zeros(V, M, K, dtype=acc, device=x.device)
    S = torch.zeros_like(C)
    step = _sample_chunk(V, M, K)
    for n0 in range(0, N, step):
        tx = x[:, n0:n0 + step].to(acc).unsqueeze(-1) * t
        C += tx.cos().sum(1)
        S += tx.sin_().sum(1)
    return C, S


def ecf_backward(x, t, grad_c, grad_s):
    """kernels/sketch.py's ``backward``: d x = sum_k t_k (gS cos(t_k x) - gC sin(t_k x)),
    in chunks of samples."""
    acc = _acc(x)
    V, N, M = x.shape
    t = t.to(acc)
    gc = (grad_c.to(acc) * t).unsqueeze(1)
    gs = (grad_s.to(acc) * t).unsqueeze(1)
    dx = torch.empty(V, N, M, dtype=acc, device=x.device)
    step = _sample_chunk(V, M, t.shape[0])
    for n0 in range(0, N, step):
        tx = x[:, n0:n0 + step].to(acc).unsqueeze(-1) * t
        dx[:, n0:n0 + step] = (tx.cos() * gs).sub_(tx.sin_() * gc).sum(-1)
    return dx


infonce = SimpleNamespace(forward=infonce_forward, backward=infonce_backward)
barlow = SimpleNamespace(gram_inner=gram_inner, gram_apply=gram_apply, standardize=standardize,
                         standardize_backward=standardize_backward)
siglip = SimpleNamespace(forward=siglip_forward, backward=siglip_backward,
                         backward_kept=siglip_backward_kept, KEEP_PAIRS=KEEP_PAIRS)
prototype = SimpleNamespace(rows=prototype_rows, cols=prototype_cols,
                            pair_value=prototype_pair_value, pair_grad=prototype_pair_grad)
kmeans = SimpleNamespace(assign=kmeans_assign, segment_sum=kmeans_segment_sum)
masked = SimpleNamespace(forward=masked_patch_forward, backward=masked_patch_backward,
                         backward_kept=masked_patch_backward_kept, latent_forward=latent_forward,
                         latent_backward=latent_backward)
sketch = SimpleNamespace(forward=ecf_forward, backward=ecf_backward)
