"""Masked Siamese Networks' prototype loss (MSN, Assran et al., 2022) and its prior-matching
variants (PMSN, Assran et al., 2023) as modules, with lightly's class names and signatures,
and the helper functions of the same names: ``prototype_probabilities``, ``sharpen``,
``sinkhorn`` (MSN's, on probabilities -- not ``fastssl.sinkhorn``, SwAV's, on scores) and
``power_law_distribution``.

With unit rows a (anchors, N = V * B rows, view-major: row i belongs to target i mod B),
t (targets, B rows) and c (prototypes, K rows), tau the temperature and T the target
sharpening temperature:

    p_i   = softmax_k(a_i . c_k / tau)                       anchor probabilities
    q_j   = softmax_k(t_j . c_k / (tau T))                   = sharpen(softmax(t_j . c / tau), T)
    q     <- MSN's Sinkhorn of q (``sinkhorn_iterations`` > 0), detached
    loss  = -(1/N) sum_i sum_k q_{i mod B, k} log p_ik  +  lambda * R(p_bar),
    p_bar = (1/N) sum_i p_i

with R(p_bar) = sum_k p_bar_k log p_bar_k + log K (MSN: mean-entropy maximisation), or
KL(pi || p_bar) = sum_k pi_k log(pi_k / p_bar_k) for a prior pi: pi_k proportional to
k^(-exponent), k = 1..K (PMSN), or a callable's output (PMSNCustomLoss). The regulariser is
applied only when lambda > 0. Gradients reach the anchors and the prototypes through p
only: the targets' side is constant.

Arithmetic: float64 inputs compute in float64, the rest in float32 (also under autocast),
and the loss has the anchors' dtype. Probabilities come from log-softmax (log p is exact
where p underflows), log p_bar from a log-sum-exp over the rows, so small temperatures give
finite losses and gradients; the regulariser (K values, where sum p_bar log p_bar + log K
cancels) is evaluated in float64. The Sinkhorn runs in the log domain on per-prototype and
per-target scalings kept in float64: a prototype that no target reaches within float32's
range gets finite codes where a product-form Sinkhorn divides 0 by 0.

Distributed (``gather_distributed`` in a process group of > 1 ranks): the Sinkhorn's
per-prototype sums run over every rank's targets, and p_bar is the mean over every rank's
anchors (an autograd-aware all-reduce). Each rank's loss is its own rows' cross-entropy
plus lambda * R(p_bar) of the global batch, so the mean over ranks of the losses is the
one-process loss on the concatenated batch (equal batches), and a rank's input gradient is
world_size times the global one (``fastssl.distributed``'s convention). Shape errors raise
``fastssl._checks.ShapeError`` (a ValueError, AssertionError and RuntimeError).
"""
import contextlib
import math
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from fastssl import _checks, _ops, distributed
from fastssl._checks import ShapeError

from ._common import _gather_flag

__all__ = ["MSNLoss", "PMSNLoss", "PMSNCustomLoss", "prototype_probabilities", "sharpen",
           "sinkhorn", "power_law_distribution"]


# ----------------------------------------------------------------------------- helpers

def _no_autocast(device):
    if device.type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _acc(*tensors) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _wide(device) -> torch.dtype:
    """The dtype of the Sinkhorn scalings and the prior: float64 (float32 on MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _matrix(x, name, what):
    _checks.floating(x, name)
    if x.dim() != 2:
        raise ShapeError(f"{what}: {name} must be 2-D, got shape {tuple(x.shape)}")
    return x


def _lse_over_rows(y: Tensor, active: bool) -> Tensor:
    """log sum_j exp(y_jk) over the rows of every rank (no gradient), shape (K,)."""
    top = y.amax(0)
    if active:
        top = distributed._all_reduce_max(top)
    total = torch.exp(y - top).sum(0)
    if active:
        torch.distributed.all_reduce(total)
    return top + torch.log(total)


@torch.no_grad()
def _balanced(log_q: Tensor, iterations: int, active: bool) -> Tensor:
    """MSN's Sinkhorn of the (B, K) matrix exp(log_q), iterations >= 1, in the log domain:
    Q_jk = exp(log_q_jk + u_k + v_j); each iteration scales every prototype's sum over the
    targets (of every rank when ``active``) to one, then every target's row to one. The
    constant factors of the product form (1 / total, 1 / K, 1 / B) cancel. Returns the rows
    softmax_k(log_q_j + u), in log_q's dtype; u and v are float64."""
    w = log_q.to(_wide(log_q.device))
    v = torch.zeros_like(w[:, :1])
    for it in range(iterations):
        u = -_lse_over_rows(w + v, active)
        if it + 1 < iterations:
            v = -torch.logsumexp(w + u, dim=1, keepdim=True)
    return torch.softmax(w + u, dim=1).to(log_q.dtype)


# ----------------------------------------------------------------------------- functions

def prototype_probabilities(queries: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    """softmax_k(queries_i . prototypes_k / temperature) for (B, D) ``queries`` and (K, D)
    ``prototypes`` (used as given, not normalised): (B, K), rows summing to one, in the
    queries' dtype (computed in float32, float64 for float64 inputs)."""
    _matrix(queries, "queries", "prototype_probabilities")
    _matrix(prototypes, "prototypes", "prototype_probabilities")
    if queries.shape[1] != prototypes.shape[1]:
        raise ShapeError(f"prototype_probabilities: queries {tuple(queries.shape)} and "
                         f"prototypes {tuple(prototypes.shape)} need a common dim")
    tau = _checks.number(temperature, "temperature", nonzero=True)
    acc = _acc(queries, prototypes)
    with _no_autocast(queries.device):
        logits = queries.to(acc) @ prototypes.to(acc).T / tau
        return torch.softmax(logits, dim=1).to(queries.dtype)


def sharpen(probabilities: Tensor, temperature: float) -> Tensor:
    """p_ik^(1/T) / sum_k p_ik^(1/T) for (B, K) ``probabilities`` and T = ``temperature`` > 0
    (T < 1 sharpens). Each row is divided by its maximum first (the result is unchanged, and
    no row underflows to 0 / 0 at small T); computed in float32 (float64 for float64)."""
    _matrix(probabilities, "probabilities", "sharpen")
    t = _checks.number(temperature, "temperature", lo=0.0, lo_open=True)
    p = probabilities.to(_acc(probabilities))
    top = p.detach().amax(1, keepdim=True) if p.shape[1] else p.new_ones(p.shape[0], 1)
    top = torch.where(top > 0, top, torch.ones_like(top))
    q = (p / top) ** (1.0 / t)
    return (q / q.sum(1, keepdim=True)).to(probabilities.dtype)


@torch.no_grad()
def sinkhorn(probabilities: Tensor, iterations: int = 3,
             gather_distributed: bool = False) -> Tensor:
    """MSN's Sinkhorn normalisation of (B, K) ``probabilities`` P (no gradient).

    ``iterations`` times: each prototype's column of P is divided by its sum over the
    targets (of every rank with ``gather_distributed`` in a process group), then each
    target's row by its sum. Returns the balanced rows (each sums to one) in P's dtype;
    ``iterations`` <= 0 returns ``probabilities`` itself. Computed in the log domain
    (log P, float64 scalings): zero entries stay zero, a prototype whose column underflows
    in a product form still gets its share; a column of exact zeros gives NaN (0 / 0)."""
    _matrix(probabilities, "probabilities", "sinkhorn")
    iterations = _checks.integer(iterations, "iterations")
    active = _checks.flag(gather_distributed, "gather_distributed") and \
        distributed.world_size() > 1
    if iterations <= 0:
        return probabilities
    with distributed.agree("sinkhorn", active, min_each=1, probabilities=probabilities):
        if probabilities.shape[0] == 0 or probabilities.shape[1] == 0:
            raise ShapeError(f"sinkhorn: probabilities needs at least one row and one "
                             f"column, got shape {tuple(probabilities.shape)}")
    log_q = torch.log(probabilities.to(_acc(probabilities)))
    return _balanced(log_q, iterations, active).to(probabilities.dtype)


def power_law_distribution(size: int, exponent: float, device=None,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """pi_k = k^(-exponent) / sum_{l=1..size} l^(-exponent), k = 1..size: a (size,) tensor
    summing to one, computed in float64 and returned in ``dtype`` on ``device``."""
    size = _checks.integer(size, "size", lo=1)
    exponent = _checks.number(exponent, "exponent")
    device = torch.device("cpu") if device is None else torch.device(device)
    k = torch.arange(1, size + 1, dtype=_wide(device), device=device)
    prior = k ** (-exponent)
    return (prior / prior.sum()).to(dtype)


# ----------------------------------------------------------------------------- modules

def _log_domain(method):
    """Marks a ``regularization_loss`` whose value ``forward`` may take from log p_bar."""
    method._log_domain = True
    return method


class MSNLoss(nn.Module):
    """MSN's loss (Assran et al., 2022); lightly's signature.

    ``forward(anchors, targets, prototypes, target_sharpen_temperature=0.25)`` with anchors
    (V * B, D) (V anchor views, view-major), targets (B, D), prototypes (K, D); every row is
    L2-normalised. With p_i = softmax(a_i . c / tau), q_j the targets' probabilities
    softmax(t_j . c / (tau T)) balanced by ``sinkhorn`` (``sinkhorn_iterations`` > 0) and
    detached, p_bar the mean of the p_i:

        loss = -(1/N) sum_i sum_k q_{i mod B, k} log p_ik
               + lambda * (sum_k p_bar_k log p_bar_k + log K)     (only when lambda > 0)

    ``regularization_loss(mean_anchor_probs)`` is the regulariser on a given p_bar;
    subclasses may override it (``forward`` then calls it with p_bar). ``me_max_weight``
    (keyword only) is the deprecated name of ``regularization_weight`` and replaces it when
    given. Errors: temperature <= 0 or sinkhorn_iterations < 0 (ValueError), anchors whose
    row count is not a multiple of the targets', or dims that differ (``ShapeError``).
    ``gather_distributed``: see the module docstring.
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 regularization_weight: float = 1.0, gather_distributed: bool = False, *,
                 me_max_weight: Optional[float] = None):
        super().__init__()
        self.temperature = _checks.number(temperature, "temperature", lo=0.0, lo_open=True)
        self.sinkhorn_iterations = _checks.integer(sinkhorn_iterations, "sinkhorn_iterations",
                                                   lo=0)
        self.gather_distributed = _gather_flag(gather_distributed, type(self).__name__)
        self.regularization_weight = _checks.number(regularization_weight,
                                                    "regularization_weight")
        if me_max_weight is not None:
            warnings.warn("me_max_weight is deprecated: use regularization_weight",
                          DeprecationWarning, stacklevel=2)
            self.regularization_weight = _checks.number(me_max_weight, "me_max_weight")

    def _check(self, anchors, targets, prototypes, sharpen_t, active):
        """(V, the anchor rows of every rank, T) after the checks (agreed across ranks)."""
        what = type(self).__name__
        stacked = prototypes[None] if isinstance(prototypes, Tensor) else prototypes
        settings = {"regularization": bool(self.regularization_weight > 0),
                    "sinkhorn": bool(self.sinkhorn_iterations > 0)}
        with distributed.agree(what, active, min_each=1, settings=settings, targets=targets,
                               anchors=anchors, prototypes=stacked) as world:
            for x, name in ((anchors, "anchors"), (targets, "targets"),
                            (prototypes, "prototypes")):
                _matrix(x, name, what)
                if x.device != anchors.device:
                    raise ValueError(f"{what}: {name} is on {x.device}, anchors on "
                                     f"{anchors.device}")
            (N, D), (B, Dt), (K, Dc) = anchors.shape, targets.shape, prototypes.shape
            if D != Dt or D != Dc or D == 0 or K == 0:
                raise ShapeError(f"{what}: anchors {(N, D)}, targets {(B, Dt)} and "
                                 f"prototypes {(K, Dc)} need one dim >= 1 and K >= 1")
            if B == 0 or N == 0 or N % B:
                raise ShapeError(f"{what}: the anchors' rows ({N}) must be a positive "
                                 f"multiple of the targets' rows ({B}): V anchor views of "
                                 f"the B targets, view-major")
            sharpen_t = _checks.number(sharpen_t, "target_sharpen_temperature", lo=0.0,
                                       lo_open=True)
        total = sum(world.sizes["anchors"]) if active else anchors.shape[0]
        return anchors.shape[0] // targets.shape[0], total, sharpen_t

    def forward(self, anchors: Tensor, targets: Tensor, prototypes: Tensor,
                target_sharpen_temperature: float = 0.25) -> Tensor:
        active = self.gather_distributed and distributed.world_size() > 1
        V, total, sharpen_t = self._check(anchors, targets, prototypes,
                                          target_sharpen_temperature, active)
        acc = _acc(anchors, targets, prototypes)
        B, K = targets.shape[0], prototypes.shape[0]
        with _no_autocast(anchors.device):
            c = _ops.unit_rows(prototypes.to(acc))
            log_p = torch.log_softmax(_ops.unit_rows(anchors.to(acc)) @ c.T / self.temperature,
                                      dim=1)
            with torch.no_grad():
                t = _ops.unit_rows(targets.detach().to(acc))
                logits = t @ c.detach().T / (self.temperature * sharpen_t)
                if self.sinkhorn_iterations > 0:
                    q = _balanced(torch.log_softmax(logits.to(_wide(logits.device)), dim=1),
                                  self.sinkhorn_iterations, active).to(acc)
                else:
                    q = torch.softmax(logits, dim=1)
            loss = -(log_p.view(V, B, K) * q).sum(-1).mean()
            if self.regularization_weight > 0:
                log_mean = self._log_mean(log_p, total, active)
                reg = self._regularizer(log_mean, acc).to(acc)
                loss = loss + self.regularization_weight * reg
        return loss.to(anchors.dtype)

    @staticmethod
    def _log_mean(log_p: Tensor, total: int, active: bool) -> Tensor:
        """log p_bar (K,) in float64: log of the mean over every row (of every rank when
        ``active``) of exp(log_p), a log-sum-exp with the gradient of the global mean."""
        top = log_p.detach().amax(0)
        if active:
            top = distributed._all_reduce_max(top)
        summed = torch.exp(log_p - top).sum(0)
        if active:
            summed = distributed._all_reduce_sum(summed)
        wide = _wide(log_p.device)
        return top.to(wide) + torch.log(summed.to(wide)) - math.log(total)

    def _regularizer(self, log_mean: Tensor, acc: torch.dtype) -> Tensor:
        if getattr(type(self).regularization_loss, "_log_domain", False):
            return self._log_regularization(torch.exp(log_mean), log_mean, acc)
        return self.regularization_loss(torch.exp(log_mean).to(acc))

    def _log_regularization(self, mean: Tensor, log_mean: Tensor, dtype) -> Tensor:
        """sum_k p_bar_k log p_bar_k + log K (0 log 0 = 0), from p_bar and log p_bar (K,) in
        float64; ``dtype`` is the one a user callable receives p_bar in (PMSNCustomLoss)."""
        terms = torch.where(mean > 0, mean * log_mean, torch.zeros_like(mean))
        return terms.sum() + math.log(mean.shape[0])

    @_log_domain
    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """The regulariser R(p_bar) on a given (K,) ``mean_anchor_probs``, in its dtype."""
        _checks.floating(mean_anchor_probs, "mean_anchor_probs")
        if mean_anchor_probs.dim() != 1 or mean_anchor_probs.shape[0] == 0:
            raise ShapeError(f"mean_anchor_probs must be (K,) with K >= 1, got shape "
                             f"{tuple(mean_anchor_probs.shape)}")
        mean = mean_anchor_probs.to(_wide(mean_anchor_probs.device))
        return self._log_regularization(mean, torch.log(mean), mean_anchor_probs.dtype).to(
            mean_anchor_probs.dtype)


def _kl_from(prior: Tensor, log_mean: Tensor) -> Tensor:
    """KL(prior || p_bar) = sum_k prior_k (log prior_k - log p_bar_k), 0 log 0 = 0."""
    return tF.kl_div(log_mean, prior.to(log_mean.dtype), reduction="sum")


class PMSNLoss(MSNLoss):
    """PMSN's loss with a power-law prior (Assran et al., 2023); lightly's signature.

    MSN's loss (``MSNLoss``) with the regulariser KL(pi || p_bar) = sum_k pi_k log(pi_k /
    p_bar_k), pi_k = k^(-power_law_exponent) / sum_l l^(-power_law_exponent), k = 1..K
    (``power_law_distribution``; the prior is computed in float64)."""

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 regularization_weight: float = 1, power_law_exponent: float = 0.25,
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
                         regularization_weight=regularization_weight,
                         gather_distributed=gather_distributed)
        self.power_law_exponent = _checks.number(power_law_exponent, "power_law_exponent")

    def _log_regularization(self, mean: Tensor, log_mean: Tensor, dtype) -> Tensor:
        prior = power_law_distribution(mean.shape[0], self.power_law_exponent, mean.device,
                                       _wide(mean.device))
        return _kl_from(prior, log_mean)


class PMSNCustomLoss(MSNLoss):
    """PMSN's loss with a custom prior; lightly's signature.

    MSN's loss (``MSNLoss``) with the regulariser KL(pi || p_bar) = sum_k pi_k log(pi_k /
    p_bar_k), pi = ``target_distribution(p_bar)``: a callable taking p_bar (K,) (in the
    arithmetic dtype, with its gradient) and returning a (K,) distribution summing to one
    (moved to p_bar's device and dtype; its gradient, if any, is kept)."""

    def __init__(self, target_distribution: Callable[[Tensor], Tensor],
                 temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 regularization_weight: float = 1, gather_distributed: bool = False):
        if not callable(target_distribution):
            raise TypeError(f"target_distribution must be callable, got "
                            f"{type(target_distribution).__name__}")
        super().__init__(temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
                         regularization_weight=regularization_weight,
                         gather_distributed=gather_distributed)
        self.target_distribution = target_distribution

    def _log_regularization(self, mean: Tensor, log_mean: Tensor, dtype) -> Tensor:
        prior = self.target_distribution(mean.to(dtype))
        if not isinstance(prior, Tensor):
            raise TypeError(f"target_distribution must return a tensor, got "
                            f"{type(prior).__name__}")
        if prior.shape != mean.shape:
            raise ShapeError(f"target_distribution returned shape {tuple(prior.shape)}; the "
                             f"mean anchor probabilities have shape {tuple(mean.shape)}")
        return _kl_from(prior.to(mean.device), log_mean)
