"""Similarity losses between two views' embeddings as modules: negative cosine similarity
(BYOL / SimSiam, plain and symmetrised), alignment + uniformity on the hypersphere, and
DirectCLR (NT-Xent on a leading slice of the representation)."""
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastssl import _checks, _ops
from fastssl import functional as F
from fastssl._checks import ShapeError

from .contrastive import NTXentLoss


class NegativeCosineSimilarity(nn.Module):
    """-mean cosine similarity (BYOL / SimSiam), lightly's signature."""

    def __init__(self, dim: int = 1, eps: float = 1e-8):
        super().__init__()
        self.dim = _checks.integer(dim, "dim")
        self.eps = _checks.number(eps, "eps", lo=0.0)

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return F.negative_cosine_similarity(x0, x1, self.dim, self.eps)


def _view_pair(value, name):
    """(z, p) from a pair: a tuple or list of two tensors, or a tensor whose first
    dimension is 2 (what ``z, p = value`` unpacks in lightly)."""
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] != 2:
            raise ValueError(f"{name} must be a pair (z, p); got a tensor of shape "
                             f"{tuple(value.shape)}")
        return value[0], value[1]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a pair (z, p) of tensors, got "
                        f"{type(value).__name__}")
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair (z, p) of tensors, got {len(value)} items")
    return value[0], value[1]


class SymNegCosineSimilarityLoss(nn.Module):
    """SimSiam's symmetrised loss, lightly's ``SymNegCosineSimilarityLoss`` (repository
    head; not in the 1.6.0 wheel).

    ``forward(out0, out1)`` with ``out0 = (z0, p0)``, ``out1 = (z1, p1)`` (projections z,
    predictions p, each (N, ..., D)):

        D(p, z) = -1/M sum_i  p_i . sg(z_i) / (max(||p_i||, eps) max(||z_i||, eps))
        loss    = D(p0, z1) / 2 + D(p1, z0) / 2

    over the last dimension (M vectors, eps = 1e-8, sg = stop-gradient: the z's get no
    gradient). The cosines are formed in float64 (``fastssl.functional.
    negative_cosine_similarity``); the result has the inputs' dtype. Unlike lightly, the
    constructor issues no DeprecationWarning.
    """

    def forward(self, out0, out1) -> Tensor:
        z0, p0 = _view_pair(out0, "out0")
        z1, p1 = _view_pair(out1, "out1")
        return (self._neg_cosine_simililarity(p0, z1)
                + self._neg_cosine_simililarity(p1, z0)) / 2

    def _neg_cosine_simililarity(self, x: Tensor, y: Tensor) -> Tensor:
        """D(x, y) above; lightly's (misspelt) helper name, kept for code that calls it."""
        _checks.tensor(y, "y")
        return F.negative_cosine_similarity(x, y.detach(), -1, 1e-8)


SymNegCosineSimilarity = SymNegCosineSimilarityLoss  # the name without lightly's suffix


def _log_mean_gaussian(x: Tensor, t: float) -> Tensor:
    """log( mean_{i<j} exp(-t ||x_i - x_j||^2) ) for rows x (N >= 2), as a log-sum-exp
    (no underflow to log 0 at large t). ||x_i - x_j||^2 = |x_i|^2 + |x_j|^2 - 2 x_i.x_j
    from one Gram matrix, clamped at 0."""
    n = x.shape[0]
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0)
    i, j = torch.triu_indices(n, n, 1, device=x.device)
    return torch.logsumexp(-t * d2[i, j], 0) - math.log(n * (n - 1) / 2)


class HypersphereLoss(nn.Module):
    """Alignment and uniformity on the hypersphere (Wang & Isola, 2020), lightly's
    signature ``HypersphereLoss(t=1.0, lam=1.0, alpha=2.0)``, ``forward(z_a, z_b)`` on two
    (N, D) batches.

    With x_i = z_a_i / max(||z_a_i||, 1e-12) and y_i = z_b_i / max(||z_b_i||, 1e-12):

        L_align   = 1/N sum_i ||x_i - y_i||^alpha
        L_unif(x) = log( 2 / (N (N - 1)) sum_{i<j} exp(-t ||x_i - x_j||^2) )
        loss      = L_align + lam (L_unif(x) + L_unif(y)) / 2

    Computed in float32 (float64 for float64 inputs), returned in the inputs' dtype; the
    uniformity term is a log-sum-exp, so a large ``t`` gives its true (very negative) value
    where ``log(mean(exp(.)))`` underflows to -inf. Requires t > 0, lam >= 0, alpha > 0.
    The uniformity term needs pairs: N = 1 raises (lightly returns NaN) unless lam = 0.
    """

    def __init__(self, t: float = 1.0, lam: float = 1.0, alpha: float = 2.0):
        super().__init__()
        self.t = _checks.number(t, "t", lo=0.0, lo_open=True)
        self.lam = _checks.number(lam, "lam", lo=0.0)
        self.alpha = _checks.number(alpha, "alpha", lo=0.0, lo_open=True)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        F.check_embeddings(z_a=z_a, z_b=z_b)
        if z_a.shape[0] < 2 and self.lam != 0:
            raise ShapeError(f"HypersphereLoss: the uniformity term averages over pairs of "
                             f"rows, so z_a needs at least 2 rows (got shape "
                             f"{tuple(z_a.shape)}); set lam=0 for alignment alone")
        acc = _ops.acc_dtype(z_a)
        x, y = F.normalize(z_a.to(acc)), F.normalize(z_b.to(acc))
        loss = torch.linalg.vector_norm(x - y, dim=1).pow(self.alpha).mean()
        if self.lam != 0:
            unif = (_log_mean_gaussian(x, self.t) + _log_mean_gaussian(y, self.t)) / 2
            loss = loss + self.lam * unif
        return loss.to(z_a.dtype)


class DirectCLRLoss(NTXentLoss):
    """DirectCLR (Jing et al., 2021), lightly's signature: NT-Xent on the first
    ``loss_dim`` features of the (flattened) representation, with no projection head.

    r_i = flatten(out_i)[:loss_dim] (a view of the input, not a copy, for (N, D) inputs;
    all D features when D <= loss_dim), then ``NTXentLoss`` on the slices: z = [normalize
    (r0); normalize(r1)] (the slice is taken before normalising, as lightly does),

        loss = 1/(2N) sum_i [ log sum_{j != i} exp(z_i . z_j / T) - z_i . z_{p(i)} / T ]

    with p(i) the other view of row i. ``temperature``, ``memory_bank_size`` (a bank of
    ``loss_dim``-wide entries) and ``gather_distributed`` are ``fastssl.NTXentLoss``'s.
    ``loss_dim`` must be an integer >= 1.
    """

    def __init__(self, loss_dim: int = 64, temperature: float = 0.5,
                 memory_bank_size=0, gather_distributed: bool = False):
        super().__init__(temperature=temperature, memory_bank_size=memory_bank_size,
                         gather_distributed=gather_distributed)
        self.loss_dim = _checks.integer(loss_dim, "loss_dim", lo=1)

    def _leading(self, x, name):
        _checks.floating(x, name)
        if x.dim() < 2:
            raise ShapeError(f"{name} must be (batch, features, ...), got shape "
                             f"{tuple(x.shape)}")
        return x.flatten(1)[:, :self.loss_dim]

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return super().forward(self._leading(out0, "out0"), self._leading(out1, "out1"))
