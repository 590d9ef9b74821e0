"""solo-learn's loss functions as drop-ins, with its names, signatures and defaults:
MoCo v3, NNCLR, ReSSL, and the BYOL / SimSiam similarity losses (which NNBYOL and NNSiam
call with nearest neighbours as ``z``).

Notation: u = normalize(x) = x / max(||x||, 1e-12) per row; s = 1 / temperature;
CE_i(l, p) = log sum_j exp(l_ij) - l_{i,p}.

- ``mocov3_loss_func(query, key, temperature=0.2)``:
  2 T mean_i CE_i(s u(query) u(key_all)^T, o + i), key_all the keys of every rank
  (constants: no gradient reaches ``key``), o the rank's first global row.
- ``nnclr_loss_func(nn, p, temperature=0.1)``:
  mean_i CE_i(s u(nn) u(p_all)^T, o + i), p_all gathered from every rank WITH gradient.
- ``ressl_loss_func(q, k, queue, temperature_q=0.1, temperature_k=0.04)``:
  -mean_i sum_j softmax_j(k_i . queue_j / T_k) log softmax_j(q_i . queue_j / T_q), the
  inputs as given (solo-learn's model passes unit rows) and the teacher side detached.
- ``byol_loss_func(p, z, simplified=True)``: 2 - 2 mean cos(p, sg z);
  ``simsiam_loss_func(p, z, simplified=True)``: -mean cos(p, sg z) (sg: stop-gradient).

Kernels. MoCo v3 and NNCLR are one call of the tiled InfoNCE op (``fastssl::infonce``):
the rows are the local queries (nearest neighbours), the columns the gathered keys
(predictions), the positive of row i column o + i, normalisation inside the op; no
(n x N) logit matrix is formed. ReSSL is ``fastssl.prototype.prototype_cross_entropy`` with
the queue as the prototypes (student rows q at T_q, teacher rows k at T_k, ``pairing=
"rows"`` with weights 1 / n, no centre): exactly this cross-entropy, computed in passes
over the queue without the (n x K) matrices.

Arithmetic: float64 inputs compute in float64; float32, bfloat16 and float16 in float32;
the loss is returned in the input dtype. Under an initialised torch.distributed group of
more than one process, MoCo v3 and NNCLR gather as solo-learn does (always, no flag), with
the gradient convention of ``fastssl.distributed``: a rank's gradient is world_size times
the one-process gradient of its slice, so DDP's averaging trains as one process on the
global batch. The ranks may hold different batch sizes (solo-learn's labels assume equal
ones); a bad argument on one rank raises the same error on every rank.
"""
import torch
from torch import Tensor

from fastssl import _checks, _ops, distributed
from fastssl._checks import ShapeError
from fastssl.functional import _mean, check_embeddings, negative_cosine_similarity, scale_tensor
from fastssl.prototype import prototype_cross_entropy

__all__ = ["mocov3_loss_func", "nnclr_loss_func", "ressl_loss_func", "byol_loss_func",
           "simsiam_loss_func"]


def _active():
    """solo-learn gathers whenever a process group of more than one rank is initialised."""
    return distributed.is_distributed() and distributed.world_size() > 1


def _rows_against_gathered(what, names, rows, cols, temperature, cols_grad):
    """(mean over the local rows of CE_i(s u(rows) u(cols_all)^T, o + i) in float64, the
    temperature as a 0-d tensor in the arithmetic dtype). ``cols_grad`` False: the columns
    are constants (detached before the gather)."""
    active = _active()
    named = dict(zip(names, (rows, cols)))
    with distributed.agree(what, active, **named) as world:
        check_embeddings(allow_empty=active, **named)
        s = scale_tensor(temperature, rows, "temperature", invert=True)
        t = scale_tensor(temperature, rows, "temperature", invert=False)
    if not cols_grad:
        cols = cols.detach()
    offset = 0
    if active:
        cols, offsets = distributed.gather(cols, with_grad=cols_grad, sizes=world.sizes[names[1]])
        offset = offsets[world.rank]
    pos = offset + torch.arange(rows.shape[0], device=rows.device)
    loss, _ = _ops.infonce(rows, cols, None, pos, None, s, True)
    return _mean(loss), t


def mocov3_loss_func(query: Tensor, key: Tensor, temperature=0.2) -> Tensor:
    """MoCo v3's contrastive loss (solo-learn's ``mocov3_loss_func``).

    ``query`` (n, D) from one view, ``key`` (n, D) from the other (the momentum encoder's):

        loss = 2 T mean_i [log sum_j exp(s q_i . k_j) - s q_i . k_{o+i}],
        q = normalize(query), k = normalize(key gathered from every rank), s = 1 / T

    ``key`` receives no gradient, in one process as under torch.distributed (solo-learn's
    no-grad gather; its one-process path happens to keep the key's graph, which its MoCo v3
    model never uses: the keys come from the momentum encoder without gradient).
    ``temperature`` is a number or a one-element tensor (its gradient is kept).
    """
    loss, t = _rows_against_gathered("mocov3_loss_func", ("query", "key"), query, key,
                                     temperature, cols_grad=False)
    return (loss * (2 * t.to(loss.dtype))).to(query.dtype)


def nnclr_loss_func(nn: Tensor, p: Tensor, temperature=0.1) -> Tensor:
    """NNCLR's contrastive loss (solo-learn's ``nnclr_loss_func``).

    ``nn`` (n, D): the support set's nearest neighbours of one view's projections; ``p``
    (n, D): the other view's predictions. With u = normalize(nn), v = normalize(p gathered
    from every rank, with gradient) and s = 1 / T:

        loss = mean_i [log sum_j exp(s u_i . v_j) - s u_i . v_{o+i}]

    Both arguments receive gradients (solo-learn's model passes neighbours without one).
    """
    loss, _ = _rows_against_gathered("nnclr_loss_func", ("nn", "p"), nn, p, temperature,
                                     cols_grad=True)
    return loss.to(nn.dtype)


def _check_queue(queue, like):
    _checks.floating(queue, "queue")
    if queue.dim() != 2 or queue.shape[1] != like.shape[1]:
        raise ShapeError(f"queue must have shape (K, {like.shape[1]}), got "
                         f"{tuple(queue.shape)}")
    if queue.shape[0] == 0:
        raise ShapeError("queue must hold at least one entry, got shape "
                         f"{tuple(queue.shape)}")
    if queue.device != like.device:
        raise ValueError(f"queue is on {queue.device} but q on {like.device}")


def ressl_loss_func(q: Tensor, k: Tensor, queue: Tensor, temperature_q: float = 0.1,
                    temperature_k: float = 0.04) -> Tensor:
    """ReSSL's relational loss (solo-learn's ``ressl_loss_func``).

    ``q`` (n, D) and ``k`` (n, D), the two views' projections, and ``queue`` (K, D) of past
    keys, all used as given (solo-learn's model normalises them):

        loss = -1/n sum_i sum_j softmax_j(k_i . queue_j / T_k) log softmax_j(q_i . queue_j / T_q)

    ``k`` receives no gradient (the target distribution is detached); ``queue`` receives its
    gradient through the ``q`` side only, as in solo-learn (its model passes a detached
    copy). Computed by ``fastssl.prototype.prototype_cross_entropy`` with the queue as the
    prototypes: no (n x K) matrix. The queue may have another floating dtype than ``q``
    (a float32 buffer with 16-bit projections); it is used in q's dtype. Temperatures are
    numbers > 0.
    """
    check_embeddings(q=q, k=k)
    _check_queue(queue, q)
    tau_q = _checks.number(temperature_q, "temperature_q", lo=0.0, lo_open=True)
    tau_k = _checks.number(temperature_k, "temperature_k", lo=0.0, lo_open=True)
    n = q.shape[0]
    weights = torch.full((n,), 1.0 / n, dtype=_ops.acc_dtype(q), device=q.device)
    return prototype_cross_entropy(q, k, queue, None, tau_q, tau_k, pairing="rows",
                                   weights=weights)


def _mean_cosine(p, z, simplified, what):
    """mean cos(p, sg z) in float64 (a 0-d tensor), solo-learn's two formulations:
    ``simplified``: cosine_similarity along the last dimension (norms clamped at 1e-8
    each), the mean over every other entry; otherwise both normalised along the last
    dimension (norms clamped at 1e-12) and their product summed over dimension 1, then
    averaged (the same as the first for (n, D) inputs)."""
    for name, t in (("p", p), ("z", z)):
        _checks.floating(t, name)
    if p.shape != z.shape:
        raise ShapeError(f"{what}: p has shape {tuple(p.shape)} but z has {tuple(z.shape)}")
    if p.dtype != z.dtype or p.device != z.device:
        raise ValueError(f"{what}: p and z differ in dtype or device ({p.dtype} on "
                         f"{p.device}, {z.dtype} on {z.device})")
    simplified = _checks.flag(simplified, "simplified")
    if p.numel() == 0:
        raise ShapeError(f"{what}: p must be non-empty, got shape {tuple(p.shape)}")
    wide = torch.float64
    p64, z64 = p.to(wide), z.detach().to(wide)
    if simplified:
        return -negative_cosine_similarity(p64, z64, dim=-1, eps=1e-8)
    if p.dim() < 2:
        raise ShapeError(f"{what}(simplified=False) sums over dimension 1: p must have at "
                         f"least 2 dimensions, got shape {tuple(p.shape)}")
    D = p.shape[-1]
    u = _ops.unit_rows(p64.reshape(-1, D)).reshape(p.shape)
    v = _ops.unit_rows(z64.reshape(-1, D)).reshape(p.shape)
    return (u * v).sum(1).mean()


def byol_loss_func(p: Tensor, z: Tensor, simplified: bool = True) -> Tensor:
    """BYOL's loss (solo-learn's ``byol_loss_func``; NNBYOL passes nearest neighbours as z):
    2 - 2 mean cos(p, sg z), the cosine along the last dimension; ``z`` gets no gradient.
    ``simplified=False`` normalises both along the last dimension and sums their product
    over dimension 1 (solo-learn's second form, equal for (n, D) inputs up to the norm
    clamp, 1e-12 instead of 1e-8). The cosines and the mean are formed in float64 (the
    mean of nearly cancelling cosines), the result rounded once to p's dtype."""
    return (2 - 2 * _mean_cosine(p, z, simplified, "byol_loss_func")).to(p.dtype)


def simsiam_loss_func(p: Tensor, z: Tensor, simplified: bool = True) -> Tensor:
    """SimSiam's loss (solo-learn's ``simsiam_loss_func``; NNSiam passes nearest neighbours
    as z): -mean cos(p, sg z); ``z`` gets no gradient; ``simplified`` as in
    ``byol_loss_func``."""
    return (-_mean_cosine(p, z, simplified, "simsiam_loss_func")).to(p.dtype)
