"""Region-level and model-aware contrastive losses on the keyed InfoNCE kernel: DetCon's
two forms (DetConB, with prediction and target branches; DetConS, one branch) and MACL
(NT-Xent with an alignment-adaptive temperature and reweighted rows), with lightly's class
names, signatures and errors.

DetCon (Henaff et al. 2021). Each view holds b images with m mask-pooled regions; region
(a, i) of view 0 has the mask id k0[a, i] and the prediction p0[a, i], and likewise for
view 1; all vectors are L2-normalised, s = 1 / temperature. The rows are view 0's
predictions; the columns are the targets of view 1, then those of view 0 (with
``gather_distributed``, those of every rank). For row r = (a, i):

- positives P_r: view 1's regions (a, v) with k1[a, v] = k0[a, i] (same image, same mask
  id, the other view); the label mass is split evenly over them;
- left out of the log-partition: view 0's regions (a, v) with k0[a, v] = k0[a, i] (same
  image, same mask id, the same view; r itself among them); every other column stays in;
- weight w_r = [P_r not empty] / A_r, A_r = #{v : k0[a, v] = k0[a, i]} (the same-view
  regions that share the row's id).

    loss_0 = 1/(b m) sum_r w_r (lse_r - s mean_{p in P_r} p0_r . t1_p),
    lse_r  = log sum_{c kept} exp(s p0_r . c),

and loss = loss_0 + loss_1, loss_1 the same with the views exchanged. A row without a
positive contributes 0 (and no gradient) but counts in the mean.

No (rows x columns) matrix is built. Each (image, mask id) pair becomes one integer key
(a dense id from one sort per image: any integer ids, no range limit, no host
synchronisation). The log-partition is the kernel's key mode 1 (keep the columns whose key
differs from the row's): same-view columns carry their region's key, other-view columns a
key that matches no row, so exactly the same-view, same-key columns leave. The positives'
mean logit is s p0_r . (sum of view 1's targets with the row's key) / |P_r|: a segment sum
over the keys, O((rows + columns) D), as are the counts A_r and |P_r|.

MACL (Huang et al. 2023). z = [normalize(z0); normalize(z1)] (2n rows), row i's positive
p_i its other view, l_i the NT-Xent row loss at the scale 1 / t,

    t = tau (1 + alpha (A - A_0)),   A = mean_i z0_i . z1_i / (|z0_i| |z1_i|)  (detached),
    loss = mean_i V_i l_i,           V_i = 1 / (1 - P_i + 1e-8),  P_i = exp(-l_i)  (detached).

With q_i = log sum_{j not i, p_i} exp(z_i . z_j / t) - z_i . z_{p_i} / t (the negatives'
log-partition, the kernel's key mode 1 with a row and its positive sharing a key, minus the
positive's logit) l_i = softplus(q_i) and 1 - P_i = sigmoid(q_i), both accurate relative to
their own size. The direct forms lose that where P_i is close to 1 (a well-aligned pair):
l_i = lse_i - l_{i,p_i} carries an absolute rounding of a few ulps of 1, and 1 - exp(-l_i)
cancels (for l_i = 1e-6 in float32 it is off by up to 6%); V_i ~ 1 / l_i would amplify
either into the weight.

Arithmetic: float64 inputs compute in float64; float32, bfloat16 and float16 inputs in
float32 (the kernel accumulates in float32), the loss returned in the input dtype.
Distributed (``gather_distributed=True`` in an initialised group): each rank's rows against
every rank's targets, gathered with gradient (``fastssl.distributed``: a rank's input
gradient is world_size x that of the mean of the ranks' losses); images are numbered
globally, so only a rank's own targets can be positives or left out. Ranks may hold
different numbers of images (zero included); m and D must agree.
"""
import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from fastssl import _checks, _ops, distributed
from fastssl._checks import ShapeError
from fastssl.functional import _gathering, _mean, check_embeddings, scale_tensor
from fastssl.losses._common import _gather_flag, _temperature
from fastssl.multipositive import EXCLUDE

__all__ = ["DetConBLoss", "DetConSLoss", "MACLLoss", "detcon_loss", "macl_loss"]

_PRED = ("pred_view0", "pred_view1", "target_view0", "target_view1")
_MASKS = ("mask_view0", "mask_view1")
NO_ROW = -1  # the key of a column that no row's key equals (region keys are >= 0)


# ----------------------------------------------------------------------------- DetCon

def _check_regions(named, masks, allow_empty):
    """(b, m, D) floating embeddings of one shape, dtype and device; (b, m) integer masks."""
    (n0, t0), *rest = named.items()
    for name, t in named.items():
        _checks.floating(t, name)
        if t.dim() != 3:
            raise ShapeError(f"{name} must be 3-D (batch, regions, dim), got shape "
                             f"{tuple(t.shape)}")
        if t.shape[1] == 0 or t.shape[2] == 0 or (t.shape[0] == 0 and not allow_empty):
            raise ShapeError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{n0} is on {t0.device} but {name} is on {t.device}")
        if t.dtype != t0.dtype:
            raise ValueError(f"{n0} has dtype {t0.dtype} but {name} has {t.dtype}")
        if t.shape != t0.shape:
            raise ShapeError(f"{n0} has shape {tuple(t0.shape)} but {name} has "
                             f"{tuple(t.shape)}")
    for name, k in masks.items():
        _checks.tensor(k, name)
        if k.is_floating_point() or k.is_complex():
            raise TypeError(f"{name} must be an integer tensor of mask ids, got {k.dtype}")
        if tuple(k.shape) != tuple(t0.shape[:2]):
            raise ShapeError(f"{name} must have shape {tuple(t0.shape[:2])} (batch, regions) "
                             f"like {n0}, got {tuple(k.shape)}")
        if k.device != t0.device:
            raise ValueError(f"{n0} is on {t0.device} but {name} is on {k.device}")


def region_keys(mask_view0: Tensor, mask_view1: Tensor) -> tuple[Tensor, Tensor]:
    """Dense int64 keys (b m,) for both views' regions, equal exactly where the image and
    the mask id are: the 2m ids of each image sorted (one batched sort), a new key at each
    change, numbered across images. Keys lie in [0, 2 b m); static shapes, no host read."""
    b, m = mask_view0.shape
    both = torch.cat([mask_view0, mask_view1], 1).to(torch.int64)
    ids, order = torch.sort(both, dim=1, stable=True)
    start = torch.ones_like(ids, dtype=torch.bool)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    dense = (torch.cumsum(start.reshape(-1), 0) - 1).reshape(b, 2 * m)
    keys = torch.empty_like(dense).scatter_(1, order, dense)
    return keys[:, :m].reshape(-1), keys[:, m:].reshape(-1)


def _view_loss(pred, other, same, other_local, keys, other_keys, offset, s):
    """One direction: mean over the rows ``pred`` (n, D) of w_r (lse_r - s mean_P p_r . t_p).
    ``other``/``same``: the (gathered) targets of the other / same view (N, D), raw (the
    op normalises them); ``other_local``: this rank's other-view targets (n, D); ``keys``
    and ``other_keys``: the rows' and the local other-view regions' keys; ``offset``: the
    first row of this rank's regions among the gathered ones."""
    n, N = pred.shape[0], same.shape[0]
    never = keys.new_full((N,), NO_ROW)
    same_keys = torch.cat([never[:offset], keys, never[offset + n:]])
    cols = torch.cat([other, same])
    none = torch.full((n,), -1, dtype=torch.int64, device=pred.device)
    lse, _ = _ops.infonce(pred, cols, None, none, None, s, True,
                          torch.cat([keys, never, same_keys]), EXCLUDE)
    acc = lse.dtype
    ones = torch.ones(n, dtype=acc, device=pred.device)
    slots = 2 * n  # the keys of this rank's regions lie in [0, 2n)
    area = torch.zeros(slots, dtype=acc, device=pred.device).index_add(0, keys, ones)[keys]
    count = torch.zeros(slots, dtype=acc, device=pred.device).index_add(0, other_keys, ones)
    count = count[keys]
    t = _ops.unit_rows(other_local.to(acc))
    sums = t.new_zeros((slots, t.shape[1])).index_add(0, other_keys, t)[keys]
    psum = torch.linalg.vecdot(_ops.unit_rows(pred.to(acc)), sums)
    has = count > 0
    per = (lse - s * psum / torch.where(has, count, ones)) / area
    return _mean(torch.where(has, per, torch.zeros_like(per)))


def detcon_loss(pred_view0: Tensor, pred_view1: Tensor, target_view0: Tensor,
                target_view1: Tensor, mask_view0: Tensor, mask_view1: Tensor,
                temperature=0.1, gather_distributed: bool = False, *,
                _what="DetConBLoss", _names=_PRED + _MASKS) -> Tensor:
    """DetConB's loss (lightly's ``DetConBLoss.forward``; module docstring): predictions
    and targets (b, m, D) of both views, mask ids (b, m); loss_0 + loss_1. With
    ``gather_distributed`` the columns are every rank's targets."""
    tensors = (pred_view0, pred_view1, target_view0, target_view1)
    named = dict(zip(_names[:4], tensors))  # DetConS: two names (pred = target)
    masks = dict(zip(_names[4:], (mask_view0, mask_view1)))
    active = _gathering(gather_distributed)
    with distributed.agree(_what, active, **named) as world:
        _check_regions(named, masks, allow_empty=active)
        s = scale_tensor(temperature, pred_view0, "temperature", invert=True)
        _checks.flag(gather_distributed, "gather_distributed")
    b, m, D = pred_view0.shape
    p0, p1, t0, t1 = (x.reshape(b * m, D) for x in tensors)
    keys0, keys1 = region_keys(mask_view0, mask_view1)
    g0, g1, o = t0, t1, 0
    if active:
        sizes = [k * m for k in world.sizes[_names[0]]]
        g0, offsets = distributed.gather(t0, sizes=sizes)
        g1, _ = distributed.gather(t1, sizes=sizes)
        o = offsets[world.rank]
    loss = (_view_loss(p0, g1, g0, t1, keys0, keys1, o, s)
            + _view_loss(p1, g0, g1, t0, keys1, keys0, o, s))
    return loss.to(pred_view0.dtype)


class DetConBLoss(nn.Module):
    """lightly's ``DetConBLoss(temperature=0.1, gather_distributed=True)``:
    ``forward(pred_view0, pred_view1, target_view0, target_view1, mask_view0,
    mask_view1)``, predictions and targets (B, M, D) (BYOL's two branches, mask-pooled),
    mask ids (B, M) (integers, possibly repeated); see the module docstring and
    ``detcon_loss``. ``abs(temperature) < 1e-8`` raises ValueError, as lightly does."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        self.eps = 1e-8
        self.temperature = _temperature(temperature)
        self.gather_distributed = _gather_flag(gather_distributed, type(self).__name__)

    def forward(self, pred_view0: Tensor, pred_view1: Tensor, target_view0: Tensor,
                target_view1: Tensor, mask_view0: Tensor, mask_view1: Tensor) -> Tensor:
        return detcon_loss(pred_view0, pred_view1, target_view0, target_view1, mask_view0,
                           mask_view1, self.temperature, self.gather_distributed)


class DetConSLoss(nn.Module):
    """lightly's ``DetConSLoss(temperature=0.1, gather_distributed=True)``: DetCon with one
    branch (SimCLR's), ``forward(view0, view1, mask_view0, mask_view1)`` = DetConB with
    the predictions as their own targets."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__()
        self.detconbloss = DetConBLoss(temperature, gather_distributed)

    def forward(self, view0: Tensor, view1: Tensor, mask_view0: Tensor,
                mask_view1: Tensor) -> Tensor:
        inner = self.detconbloss
        return detcon_loss(view0, view1, view0, view1, mask_view0, mask_view1,
                           inner.temperature, inner.gather_distributed, _what="DetConSLoss",
                           _names=("view0", "view1", "view0", "view1") + _MASKS)


# ----------------------------------------------------------------------------- MACL

def macl_loss(z0: Tensor, z1: Tensor, temperature=0.1, alpha=0.5, A_0=0.0) -> Tensor:
    """Model-aware contrastive loss (lightly's ``MACLLoss.forward``; module docstring):
    NT-Xent rows at the temperature t = temperature (1 + alpha (A - A_0)), A the mean
    cosine of the positive pairs, each row weighted by 1 / (1 - P_i + 1e-8), t and the
    weights detached. Single process (lightly's has no gathering)."""
    check_embeddings(z0=z0, z1=z1)
    _checks.scalar(temperature, "temperature", nonzero=True)
    acc = _ops.acc_dtype(z0)
    n = z0.shape[0]
    cos = torch.linalg.vecdot(_ops.unit_rows(z0.to(acc)), _ops.unit_rows(z1.to(acc)))
    with torch.no_grad():
        t = temperature * (1 + alpha * (cos.mean() - A_0))
        s = (1 / t).to(acc)
    rows = torch.cat([z0, z1])
    sample = torch.arange(n, device=z0.device).repeat(2)  # a row, its positive: one key
    none = torch.full((2 * n,), -1, dtype=torch.int64, device=z0.device)
    if n > 1:
        neg, _ = _ops.infonce(rows, rows, None, none, None, s, True,
                              torch.cat([sample, sample]), EXCLUDE)
    else:  # no negatives: P_i = 1, l_i = 0 (the kernel is not called on empty selections)
        neg = cos.new_full((2,), float("-inf"))
    q = neg - s * cos.repeat(2)  # log of sum_neg exp(l_ij) / exp(l_ip); -inf for n = 1
    with torch.no_grad():
        V = 1 / (torch.sigmoid(q) + 1e-8)  # 1 - P_i = sigmoid(q_i)
    return _mean(V * tF.softplus(q)).to(z0.dtype)


class MACLLoss(nn.Module):
    """lightly's ``MACLLoss(temperature=0.1, alpha=0.5, A_0=0.0)``: ``forward(z0, z1)``
    with z0, z1 (N, D); see ``macl_loss``. ValueError, as lightly: temperature < 1e-8,
    alpha or A_0 outside [0, 1]."""

    def __init__(self, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0):
        super().__init__()
        value = _checks.number(temperature, "temperature")
        if value < 1e-8:
            raise ValueError(f"Illegal initial temperature: abs({value}) < 1e-8")
        _checks.number(alpha, "alpha")
        _checks.number(A_0, "A_0")
        if not 0 <= float(alpha) <= 1:
            raise ValueError(f"Alpha must be in the range [0, 1], got {alpha}")
        if not 0 <= float(A_0) <= 1:
            raise ValueError(f"A_0 must be in the range [0, 1], got {A_0}")
        self.temperature, self.alpha, self.A_0 = temperature, alpha, A_0
        self.eps = 1e-8

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        return macl_loss(z0, z1, self.temperature, self.alpha, self.A_0)
