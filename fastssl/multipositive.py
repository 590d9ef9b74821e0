"""Contrastive losses with several positives per row, or with the positives kept out of the
log-partition: supervised contrastive learning (SupCon, both of its forms), solo-learn's
multi-positive SimCLR, and decoupled contrastive learning (DCL, DCLW).

Each is a log-partition over a set of columns chosen per row, computed by the InfoNCE
kernel without the (rows x columns) matrix: the kernel's row and column *keys* (an
instance or label id) select, besides the row's own column, either every column whose key
differs from the row's (``key_mode`` 1) or every column whose key equals it (2),

    lse_i(S) = log sum_{j in S_i} exp(s x_i . c_j),

and the positives' mean logit needs no matrix either: with the per-key column sums
T_k = sum_{j : key_j = k} c_j (a segment sum, O(N D)),

    sum_{p in P_i} x_i . c_p = x_i . (T_{key_i} - c_i)      (P_i: same key, not i).

So every loss here is O((rows + columns) D) in memory:

- SupCon, "mean of log" (Khosla et al.'s L_out, the reference implementation):
  loss_i = (T / T_base) (lse_i(all but i) - s mean_{p in P_i} x_i . c_p).
- multi-positive SimCLR, "log of sum" (solo-learn's ``simclr_loss_func``):
  loss_i = lse_i(all but i) - lse_i(P_i).
- DCL: loss_i = lse_i(every other key) - w_i s x_i . y_i, the positive left out of the
  log-partition (DCLW: w_i = 2 - N softmax_i(x_i . y_i / sigma), detached).

A row with no positive contributes 0 (and a zero gradient) but counts in the mean, as in
the reference SupCon (its division by the positive count is guarded the same way).
"""
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastssl import _checks, _ops, distributed
from fastssl._checks import ShapeError
from fastssl.functional import _gathering, _mean, scale_tensor

EXCLUDE, KEEP = 1, 2  # key modes: leave the row's key out, or keep only the row's key


def keyed_lse(rows: Tensor, cols: Tensor, row_keys: Tensor, col_keys: Tensor, scale,
              mode: int = 0, self_idx: Optional[Tensor] = None) -> Tensor:
    """(n,) lse_i = log sum_j exp(scale rows_i . cols_j) over the columns j != self_idx[i]
    (-1: none) that the keys select: all (``mode`` 0), key_j != key_i (1), key_j == key_i
    (2). An empty selection gives -inf. Raw products (no normalisation); float32
    arithmetic (float64 for float64 inputs); differentiable in rows, cols and scale."""
    n = rows.shape[0]
    pos = torch.full((n,), -1, dtype=torch.int64, device=rows.device)
    keys = torch.cat([row_keys, col_keys]).to(torch.int64) if mode else None
    s = scale if isinstance(scale, Tensor) else torch.tensor(
        float(scale), dtype=_ops.acc_dtype(rows), device=rows.device)
    loss, _ = _ops.infonce(rows, cols, None, pos, self_idx, s, False, keys, int(mode))
    return loss


def _segments(row_keys, col_keys):
    """(segment of each column (m,), segment of each row (n,), whether the row's key occurs
    among the columns (n,)): the columns' keys sorted, equal keys one segment. Static
    shapes (no ``unique``), so it runs on meta tensors and traces into one graph."""
    sk, order = torch.sort(col_keys, stable=True)
    start = torch.ones_like(sk, dtype=torch.bool)
    start[1:] = sk[1:] != sk[:-1]
    seg_sorted = torch.cumsum(start.to(torch.int64), 0) - 1
    col_seg = torch.empty_like(seg_sorted).scatter_(0, order, seg_sorted)
    at = torch.searchsorted(sk, row_keys).clamp(max=max(sk.shape[0] - 1, 0))
    found = sk[at] == row_keys if sk.numel() else torch.zeros_like(row_keys, dtype=torch.bool)
    return col_seg, seg_sorted[at] if sk.numel() else row_keys, found


def _positive_sums(rows, cols, row_keys, col_keys, self_idx):
    """(sum over P_i of rows_i . cols_p, |P_i|) with P_i = {j : key_j = key_i, j != self}:
    one segment sum of the columns per key (O((n + m) D)), then a row-wise dot."""
    col_seg, row_seg, found = _segments(row_keys, col_keys)
    acc = _ops.acc_dtype(rows)
    c = cols.to(acc)
    sums = c.new_zeros(c.shape).index_add(0, col_seg, c)
    counts = torch.zeros_like(col_seg).index_add_(0, col_seg, torch.ones_like(col_seg))
    counts = counts[row_seg] * found
    target = sums[row_seg]  # each row's key's column sum (fresh: edited in place below)
    if self_idx is not None:  # minus the row's own column: P_i leaves i out
        has = self_idx >= 0
        target.sub_(c[self_idx.clamp(min=0)] * has[:, None])
        counts = counts - has.to(counts.dtype)
    return torch.linalg.vecdot(rows.to(acc), target) * found, counts


def _features(features, labels, mask):
    """features (B, V, ...) -> (B, V, D); labels (B,) int64 or None; explicit mask checks."""
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if features.dim() < 3:
        raise ValueError("`features` needs to be [bsz, n_views, ...],"
                         "at least 3 dimensions are required")
    _checks.floating(features, "features")
    if features.dim() > 3:
        features = features.reshape(features.shape[0], features.shape[1], -1)
    if labels is not None and mask is not None:
        raise ValueError("Cannot define both `labels` and `mask`")
    B = features.shape[0]
    if labels is not None:
        labels = labels.reshape(-1)
        if labels.shape[0] != B:
            raise ValueError("Num of labels does not match num of features")
        if labels.is_floating_point() or labels.is_complex():
            labels = labels.to(torch.int64)
        labels = labels.to(device=features.device, dtype=torch.int64)
    if mask is not None and tuple(mask.shape) != (B, B):
        raise ShapeError(f"mask must have shape ({B}, {B}), got {tuple(mask.shape)}")
    return features, labels


def _supcon_eager(anchor, contrast, mask, scale, ratio, anchor_count):
    """The reference formula with an explicit (B, B) mask: it holds (rows x columns)
    matrices, as the caller's mask already is one."""
    acc = _ops.acc_dtype(anchor)
    logits = (anchor.to(acc) @ contrast.to(acc).T) * scale
    logits = logits - logits.detach().amax(1, keepdim=True)
    rows = torch.arange(logits.shape[0], device=logits.device)
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[rows, rows] = False
    m = mask.to(acc).repeat(anchor_count, contrast.shape[0] // mask.shape[0]) * keep
    log_prob = logits - torch.logsumexp(logits.masked_fill(~keep, float("-inf")), 1,
                                        keepdim=True)
    count = m.sum(1)
    mean_pos = (m * log_prob).sum(1) / torch.where(count < 1e-6, torch.ones_like(count), count)
    return -ratio * mean_pos


def supcon_loss(features: Tensor, labels: Optional[Tensor] = None, mask: Optional[Tensor] = None,
                temperature=0.07, contrast_mode: str = "all", base_temperature=0.07) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the reference ``SupConLoss``).

    ``features`` (B, V, ...) (flattened to (B, V, D), used as given: the reference expects
    unit rows), ``labels`` (B,) (None: every sample its own class, SimCLR) or an explicit
    (B, B) ``mask`` (mask_ij = 1 when j is a positive of i). The V B contrast rows are the
    views stacked view-major; the anchors are all of them (``contrast_mode="all"``) or the
    first view's (``"one"``). Per anchor i, with s = 1 / temperature:
    loss_i = (T / T_base) (log sum_{j != i} exp(s a_i . c_j) - s mean_{p in P_i} a_i . c_p),
    P_i the same-label columns but i; 0 where P_i is empty. Returns the mean over anchors.
    With labels (or none) no (rows x columns) matrix is built; an explicit mask is the
    reference's eager formula.
    """
    features, labels = _features(features, labels, mask)
    mode = contrast_mode
    if not isinstance(mode, str) or mode not in ("one", "all"):
        raise ValueError(f"Unknown mode: {contrast_mode}")  # the reference's error
    B, V, _ = features.shape
    s = scale_tensor(temperature, features, "temperature", invert=True)
    ratio = float(temperature) / float(base_temperature)
    contrast = features.transpose(0, 1).reshape(V * B, -1)
    anchor = features[:, 0] if mode == "one" else contrast
    anchor_count = 1 if mode == "one" else V
    if mask is not None:
        return _mean(_supcon_eager(anchor, contrast, mask, s, ratio, anchor_count)
                     ).to(features.dtype)
    ids = labels if labels is not None else torch.arange(B, device=features.device)
    col_keys = ids.repeat(V)
    row_keys = ids.repeat(anchor_count)
    self_idx = torch.arange(anchor.shape[0], device=features.device)
    lse = keyed_lse(anchor, contrast, row_keys, col_keys, s, 0, self_idx)
    psum, count = _positive_sums(anchor, contrast, row_keys, col_keys, self_idx)
    has = count > 0
    per = lse - s * psum / torch.where(has, count, torch.ones_like(count))
    return _mean(ratio * torch.where(has, per, torch.zeros_like(per))).to(features.dtype)


class SupConLoss(nn.Module):
    """The reference ``SupConLoss(temperature=0.07, contrast_mode='all',
    base_temperature=0.07)``: ``forward(features, labels=None, mask=None)``; see
    ``supcon_loss``."""

    def __init__(self, temperature=0.07, contrast_mode: str = "all", base_temperature=0.07):
        super().__init__()
        _checks.scalar(temperature, "temperature", nonzero=True)
        _checks.scalar(base_temperature, "base_temperature", nonzero=True)
        self.temperature, self.base_temperature = temperature, base_temperature
        self.contrast_mode = contrast_mode

    def forward(self, features: Tensor, labels: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Tensor:
        return supcon_loss(features, labels, mask, self.temperature, self.contrast_mode,
                           self.base_temperature)


def _unit(z):
    return _ops.unit_rows(z)


def simclr_loss_func(z: Tensor, indexes: Tensor, temperature: float = 0.1) -> Tensor:
    """solo-learn's multi-positive SimCLR (``solo.losses.simclr.simclr_loss_func``): rows of
    normalize(z) (N, D) with ``indexes`` (N,), the positives of row i every other row with
    its index; loss_i = log sum_{j != i} exp(s z_i . z_j) - log sum_{p in P_i} exp(s z_i .
    z_p), s = 1 / temperature, the mean over rows. Under torch.distributed (as solo-learn
    does) the columns are the gathered rows of every rank. A row without a positive gives
    +inf, as solo-learn's log(pos / (pos + neg)) does."""
    active = distributed.is_distributed() and distributed.world_size() > 1
    # the checks inside the agreement: a bad input on one rank raises on every rank
    with distributed.agree("simclr_loss_func", active, z=z) as world:
        _checks.floating(z, "z")
        if z.dim() != 2:
            raise ShapeError(f"z must be 2-D (N, D), got shape {tuple(z.shape)}")
        _checks.tensor(indexes, "indexes")
        if indexes.numel() != z.shape[0]:
            raise ShapeError(f"indexes must have {z.shape[0]} entries, got {indexes.numel()}")
        s = scale_tensor(temperature, z, "temperature", invert=True)
    indexes = indexes.reshape(-1).to(device=z.device, dtype=torch.int64)
    u = _unit(z)
    cols, col_keys, o = u, indexes, 0
    if active:
        cols, offsets = distributed.gather(u, sizes=world.sizes["z"])
        keys_f, _ = distributed.gather(indexes[:, None].to(torch.float64), with_grad=False,
                                       sizes=world.sizes["z"])
        col_keys, o = keys_f[:, 0].to(torch.int64), offsets[world.rank]
    self_idx = o + torch.arange(z.shape[0], device=z.device)
    every = keyed_lse(u, cols, indexes, col_keys, s, 0, self_idx)
    pos = keyed_lse(u, cols, indexes, col_keys, s, KEEP, self_idx)
    return _mean(every - pos).to(z.dtype)


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's weights, detached: w_i = 2 - N softmax_i(out0_i . out1_i / sigma) (lightly's
    function of the same name; the inputs as given, lightly's DCLW passes unit rows)."""
    sim = torch.linalg.vecdot(out0.detach().to(_ops.acc_dtype(out0)),
                              out1.detach().to(_ops.acc_dtype(out0))) / sigma
    return (2 - out0.shape[0] * torch.softmax(sim, 0)).to(out0.dtype)


def dcl_loss(out0: Tensor, out1: Tensor, temperature=0.1,
             weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
             gather_distributed: bool = False) -> Tensor:
    """Decoupled contrastive loss (Yeh et al. 2021, eq. 6; lightly's ``DCLLoss``).

    u = normalize(out0), v = normalize(out1); for direction u -> v, row i's loss is
    -w_i s u_i . v_i + log sum over the other samples' u_j and v_j of exp(s u_i . (.)),
    the positive left out of the log-partition (s = 1 / temperature, w_i = weight_fn(u,
    v)_i, or 1; v -> u calls weight_fn(v, u)); the result is the mean of both directions'
    means. With
    ``gather_distributed`` the other samples are the global batch's.
    """
    active = _gathering(gather_distributed)
    with distributed.agree("DCLLoss", active, out0=out0, out1=out1) as world:
        from fastssl.functional import check_embeddings
        check_embeddings(allow_empty=active, out0=out0, out1=out1)
        s = scale_tensor(temperature, out0, "temperature", invert=True)
    u, v = _unit(out0), _unit(out1)
    n = u.shape[0]
    o = 0
    if active:
        ua, offsets = distributed.gather(u, sizes=world.sizes["out0"])
        va, _ = distributed.gather(v, sizes=world.sizes["out1"])
        o = offsets[world.rank]
    else:
        ua, va = u, v
    N = ua.shape[0]
    ids = torch.arange(N, device=u.device)
    col_keys = torch.cat([ids, ids])
    row_keys = o + torch.arange(n, device=u.device)

    def one(a, b, cols):
        neg = keyed_lse(a, cols, row_keys, col_keys, s, EXCLUDE)
        pos = s * torch.linalg.vecdot(a.to(neg.dtype), b.to(neg.dtype))
        if weight_fn is not None:  # called on the unit rows, direction by direction
            pos = pos * weight_fn(a, b).to(pos.dtype)
        return _mean(neg - pos)

    loss = 0.5 * (one(u, v, torch.cat([ua, va])) + one(v, u, torch.cat([va, ua])))
    return loss.to(out0.dtype)


class DCLLoss(nn.Module):
    """lightly's ``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``:
    ``forward(out0, out1)``; see ``dcl_loss``."""

    def __init__(self, temperature: float = 0.1,
                 weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = _checks.flag(gather_distributed, "gather_distributed")
        if self.gather_distributed and not torch.distributed.is_available():
            raise ValueError("gather_distributed is True but torch.distributed is not "
                             "available. Please set gather_distributed=False or install a "
                             "torch version with distributed support.")

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return dcl_loss(out0, out1, self.temperature, self.weight_fn, self.gather_distributed)


class DCLWLoss(DCLLoss):
    """lightly's ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``: DCL
    with the negative von Mises-Fisher weights (``negative_mises_fisher_weights``) of the
    unit rows on the positive term."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5,
                 gather_distributed: bool = False):
        super().__init__(temperature, None, gather_distributed)
        self.sigma = sigma
        self.weight_fn = self._weights

    def _weights(self, u, v):
        return negative_mises_fisher_weights(u, v, self.sigma)
