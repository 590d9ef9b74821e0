"""Portable PyTorch twins of the kernels in ``fastssl.kernels`` (the CPU path).

Each function has the signature and the contract of its kernel launcher, and the math is
the one in the kernel module's docstring. Work is chunked over column blocks so that
memory is O((n + m) * D + n * block), never O(n * m).
"""
import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
BLOCK = 1024


def _blocks(rows, cols, negatives, neg_scale, block):
    """Yield (start, x, is_negative) for each column block: x = rows @ block^T in fp32."""
    block = block or BLOCK
    r = rows.float()
    for c0 in range(0, cols.shape[0], block):
        yield c0, r @ cols[c0:c0 + block].float().T, False
    if negatives is not None:
        for c0 in range(0, negatives.shape[0], block):
            x = r @ negatives[c0:c0 + block].float().T
            if neg_scale is not None:
                x = x * neg_scale[c0:c0 + block].float()
            yield c0, x, True


def _valid(x, c0, mask_idx):
    """Boolean [n, B] of the columns that enter row i's softmax (all but mask_idx[i])."""
    if mask_idx is None:
        return None
    cols = torch.arange(c0, c0 + x.shape[1], device=x.device)
    return cols[None, :] != mask_idx[:, None]


def forward(rows, cols, negatives, neg_scale, pos_idx, mask_idx, scale, block=None):
    """Per-row loss and statistics; returns (loss, stack([lse2, ex, px]))."""
    n = rows.shape[0]
    s2 = scale.float() * LOG2E
    dev = rows.device
    m_i = torch.full((n,), float("-inf"), device=dev)
    l_i = torch.zeros(n, device=dev)
    e_i = torch.zeros(n, device=dev)
    px = torch.zeros(n, device=dev)
    has_pos = pos_idx >= 0
    for c0, x, is_neg in _blocks(rows, cols, negatives, neg_scale, block):
        t = x * s2
        if not is_neg:
            local = pos_idx - c0
            hit = has_pos & (local >= 0) & (local < x.shape[1])
            px = px + torch.where(hit, x.gather(1, local.clamp(0, x.shape[1] - 1)[:, None])[:, 0], 0.0)
            valid = _valid(x, c0, mask_idx)
            if valid is not None:
                t = t.masked_fill(~valid, float("-inf"))
        m_new = torch.maximum(m_i, t.amax(1))
        m_use = torch.where(m_new == float("-inf"), 0.0, m_new)
        alpha = torch.exp2(m_i - m_use)
        p = torch.exp2(t - m_use[:, None])
        l_i = l_i * alpha + p.sum(1)
        e_i = e_i * alpha + (p * x).sum(1)
        m_i = m_new
    lse2 = m_i + torch.log2(l_i)
    loss = torch.where(has_pos, (m_i - px * s2) + torch.log2(l_i), lse2) * LN2
    return loss, torch.stack([lse2, e_i / l_i, px])


def backward(rows, cols, negatives, neg_scale, pos_idx, mask_idx, scale, lse2, grad,
             need_rows, need_cols, block=None):
    """float32 gradients of sum_i grad_i * loss_i for rows and cols (None where not needed)."""
    s = scale.float()
    s2 = s * LOG2E
    r = rows.float()
    g = grad.float()
    d_rows = torch.zeros_like(r) if need_rows else None
    d_cols = torch.zeros(cols.shape, device=cols.device) if need_cols else None
    for c0, x, is_neg in _blocks(rows, cols, negatives, neg_scale, block):
        p = torch.exp2(x * s2 - lse2[:, None])
        if is_neg:
            gm = p * g[:, None]
            if neg_scale is not None:
                gm = gm * neg_scale[c0:c0 + x.shape[1]].float()
            if need_rows:
                d_rows += gm @ negatives[c0:c0 + x.shape[1]].float()
            continue
        valid = _valid(x, c0, mask_idx)
        if valid is not None:
            p = p.masked_fill(~valid, 0.0)
        cols_idx = torch.arange(c0, c0 + x.shape[1], device=x.device)
        gm = (p - (cols_idx[None, :] == pos_idx[:, None]).float()) * g[:, None]
        if need_rows:
            d_rows += gm @ cols[c0:c0 + x.shape[1]].float()
        if need_cols:
            d_cols[c0:c0 + x.shape[1]] = gm.T @ r
    d_rows = d_rows * s if need_rows else None
    d_cols = d_cols * s if need_cols else None
    return d_rows, d_cols
