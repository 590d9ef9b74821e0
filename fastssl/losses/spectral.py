"""Covariance and spectral losses as modules, with lightly's class names and signatures:
MMCR (nuclear norms), EMP-SSL (total coding rate), W-MSE (Cholesky whitening), FroSSL
(Frobenius norm of the trace-normalised covariance) and TiCo (covariance EMA).

Arithmetic: float64 inputs compute in float64; float32, bfloat16 and float16 inputs compute
in float32 (the decompositions -- SVD, Cholesky, triangular solves -- have no 16-bit
kernels), and the loss is returned in the input dtype. Shape errors raise
``fastssl._checks.ShapeError``, which is a ValueError, an AssertionError and a RuntimeError,
so code written against lightly's exceptions (AssertionError for MMCR / TiCo shapes,
RuntimeError / ValueError for W-MSE batch sizes) catches it.
"""
from typing import Callable, List, Optional

import torch
import torch.nn.functional as tF
from torch import Tensor, nn

from fastssl import _checks, distributed
from fastssl._checks import ShapeError
from fastssl._ops import acc_dtype

from ._common import _gather_flag

__all__ = ["MMCRLoss", "EMPSSLLoss", "Whitening2d", "WMSELoss", "FroSSLLoss", "TiCoLoss",
           "norm_mse_loss"]


# ----------------------------------------------------------------------------- helpers

def _acc(x: Tensor) -> Tensor:
    return x.to(acc_dtype(x))


def _check_like(name, t, name0, t0):
    if t.device != t0.device:
        raise ValueError(f"{name0} is on {t0.device} but {name} is on {t.device}")
    if t.dtype != t0.dtype:
        raise ValueError(f"{name0} has dtype {t0.dtype} but {name} has {t.dtype}")
    if t.shape != t0.shape:
        raise ShapeError(f"{name0} has shape {tuple(t0.shape)} but {name} has "
                         f"{tuple(t.shape)}")


def _check_rows(what, name, t, ndim, min_rows):
    """A floating tensor of ``ndim`` dims, no empty dimension, >= ``min_rows`` rows."""
    _checks.floating(t, name)
    if t.dim() != ndim:
        raise ShapeError(f"{what}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if any(s == 0 for s in t.shape[1:]):
        raise ShapeError(f"{what}: {name} has an empty dimension: shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise ShapeError(f"{what}: {name} needs at least {min_rows} rows (samples), got "
                         f"shape {tuple(t.shape)}")


def _check_views(what, z_views, min_views):
    """A list or tuple of >= ``min_views`` (batch, dim) tensors of one shape, dtype, device."""
    if isinstance(z_views, Tensor) or not isinstance(z_views, (list, tuple)):
        raise TypeError(f"{what}: z_views must be a list of tensors, got "
                        f"{type(z_views).__name__}")
    if len(z_views) < min_views:
        raise ShapeError(f"{what}: z_views must contain at least {min_views} view"
                         f"{'s' if min_views > 1 else ''}, got {len(z_views)}")
    for i, z in enumerate(z_views):
        _check_rows(what, f"z_views[{i}]", z, 2, 1)
        _check_like(f"z_views[{i}]", z, "z_views[0]", z_views[0])


def _cholesky(a: Tensor, what: str) -> Tensor:
    try:
        return torch.linalg.cholesky(a)
    except torch.linalg.LinAlgError as e:  # same type as lightly's, with the context added
        raise type(e)(f"{what}: the matrix to factor is not positive definite (collapsed "
                      f"or too few samples for the dimension; raise eps): {e}") from e


# ----------------------------------------------------------------------------- MMCR

class MMCRLoss(nn.Module):
    """Maximum Manifold Capacity Representations (Yerxa et al., 2023); lightly's signature.

    ``forward(online, momentum)`` with both (B, k, D). Z_b = [online_b; momentum_b] is the
    (2k, D) matrix of sample b's views, c_b = mean of Z_b's rows, C = [c_1; ...; c_B] (B, D):

        L = -||C||_* + (lmda / B) * sum_b ||Z_b||_*,      ||A||_* = sum_i sigma_i(A).

    Singular values come from ``torch.linalg.svdvals`` (batched over b), not from the
    eigenvalues of the smaller Gram side: an SVD gives every sigma_i to an absolute error
    of ~u * sigma_max, while eigvalsh(A A^T) gives lambda_i = sigma_i^2 to ~u * sigma_max^2,
    so sqrt(lambda_i) is off by ~u * sigma_max^2 / sigma_i -- up to sqrt(u) * sigma_max
    (3e-4 relative in float32) for small sigma_i -- and d sqrt / d lambda is infinite at a
    zero eigenvalue (zero or rank-deficient inputs). The gradient of a nuclear norm is
    U V^T, which the SVD backward gives without dividing by gaps between singular values.
    16-bit inputs compute in float32 (lightly's SVD raises for them). lmda < 0 is a
    ValueError; inputs of different shapes an AssertionError (``ShapeError``).
    """

    def __init__(self, lmda: float = 5e-3):
        super().__init__()
        self.lmda = _checks.number(lmda, "lmda", lo=0.0)

    def forward(self, online: Tensor, momentum: Tensor) -> Tensor:
        _check_rows("MMCRLoss", "online", online, 3, 1)
        _checks.floating(momentum, "momentum")
        _check_like("momentum", momentum, "online", online)
        z = _acc(torch.cat([online, momentum], dim=1))  # (B, 2k, D)
        c = z.mean(dim=1)                               # (B, D)
        nuclear_c = torch.linalg.svdvals(c).sum()
        nuclear_z = torch.linalg.svdvals(z).sum()
        loss = self.lmda * nuclear_z / z.shape[0] - nuclear_c
        return loss.to(online.dtype)


# ----------------------------------------------------------------------------- EMP-SSL

def _logdet_identity_plus(z: Tensor, a: float) -> Tensor:
    """logdet(I_D + a Z^T Z) for each (B, D) matrix Z in the (V, B, D) stack ``z``, a > 0.

    Sylvester's identity, logdet(I_D + a Z^T Z) = logdet(I_B + a Z Z^T), puts the work on
    the smaller side; the matrix is symmetric positive definite, so its log-determinant is
    2 * sum(log(diag(L))) with L its Cholesky factor (stable, no pivoting, no sign)."""
    _, B, D = z.shape
    gram = z @ z.mT if B <= D else z.mT @ z
    eye = torch.eye(gram.shape[-1], dtype=z.dtype, device=z.device)
    chol = _cholesky(eye + a * gram, "EMPSSLLoss")
    return 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


class EMPSSLLoss(nn.Module):
    """EMP-SSL (Tong et al., 2023); lightly's signature, the paper's sign.

    ``forward(z_views)`` with a list of V tensors Z_v of shape (B, D), z_bar_b the mean over
    views of sample b, a = D / (B * tcr_eps) (tcr_eps not squared, as the reference code):

        L = -(1/V) sum_v 1/2 logdet(I_D + a Z_v^T Z_v)
            - inv_coef * (1/(V B)) sum_{v,b} cos(z_vb, z_bar_b)

    Deliberate difference from lightly 1.6: lightly adds +1/2 logdet (so it *minimises* the
    total coding rate, pushing towards collapse); the EMP-SSL paper and its reference code
    maximise the total coding rate, i.e. minimise -1/2 logdet, as here. The invariance term
    is lightly's (and the reference's). The logdet is taken on the smaller Gram side
    (Sylvester's identity) through a Cholesky factor, in float32 for 16-bit inputs.
    tcr_eps must be > 0 (the matrix is then positive definite); lightly does not check.
    """

    def __init__(self, tcr_eps: float = 0.2, inv_coef: float = 200.0) -> None:
        super().__init__()
        self.tcr_eps = _checks.number(tcr_eps, "tcr_eps", lo=0.0, lo_open=True)
        self.inv_coef = _checks.number(inv_coef, "inv_coef")

    def forward(self, z_views: List[Tensor]) -> Tensor:
        _check_views("EMPSSLLoss", z_views, 1)
        z = _acc(torch.stack(list(z_views)))  # (V, B, D)
        _, B, D = z.shape
        tcr = 0.5 * _logdet_identity_plus(z, D / (B * self.tcr_eps)).mean()
        cos = tF.cosine_similarity(z, z.mean(0, keepdim=True), dim=-1).mean()
        return (-tcr - self.inv_coef * cos).to(z_views[0].dtype)


# ----------------------------------------------------------------------------- W-MSE

def norm_mse_loss(x0: Tensor, x1: Tensor) -> Tensor:
    """W-MSE's default pair loss: mean_r ||x0_r/|x0_r| - x1_r/|x1_r| ||^2 = 2 - 2 mean cos."""
    u0, u1 = tF.normalize(x0, dim=1), tF.normalize(x1, dim=1)
    return 2 - 2 * (u0 * u1).sum(dim=-1).mean()


class Whitening2d(nn.Module):
    """Cholesky whitening of a batch (W-MSE, Ermolov et al., 2021); lightly's signature.

    ``forward(x)`` with x (N, num_features): mu = mean of the rows, S = (x - mu)^T (x - mu)
    / (N - 1), S_eps = (1 - eps) S + eps I = L L^T (Cholesky), and each row becomes

        y_r = L^{-1} (x_r - mu),   so that  y^T y / (N - 1) = I  (for eps = 0).

    y is obtained by a triangular solve (y = (x - mu) L^{-T}), not by forming L^{-1}. In
    training mode with ``track_running_stats`` the buffers ``running_mean`` (shape
    (1, D, 1, 1), as lightly's) and ``running_variance`` (D, D) move by
    r <- momentum * batch + (1 - momentum) * r after each batch; in eval mode they replace
    mu and S. 16-bit inputs are whitened in float32 and returned in their dtype.
    """

    def __init__(self, num_features: int, momentum: float = 0.01,
                 track_running_stats: bool = True, eps: float = 0):
        super().__init__()
        self.num_features = _checks.integer(num_features, "num_features", lo=1)
        self.momentum = _checks.probability(momentum, "momentum")
        self.track_running_stats = _checks.flag(track_running_stats, "track_running_stats")
        self.eps = _checks.probability(eps, "eps")
        D = self.num_features
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros([1, D, 1, 1]))
            self.register_buffer("running_variance", torch.eye(D))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_variance", None)

    def _uses_running(self) -> bool:
        return self.track_running_stats and not self.training

    def check_input(self, x: Tensor, name: str = "x", what: str = "Whitening2d") -> None:
        _check_rows(what, name, x, 2, 1 if self._uses_running() else 2)
        if x.shape[1] != self.num_features:
            raise ShapeError(f"{what}: {name} must have {self.num_features} features "
                             f"(num_features), got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return self.whiten(_acc(x)[None])[0].to(x.dtype)

    def whiten(self, xs: Tensor) -> Tensor:
        """Whiten each (n, D) matrix of the stack ``xs`` (K, n, D) by its own statistics (or
        the running ones in eval mode); in training the running statistics take the K
        batches' statistics one after the other, in order."""
        D = xs.shape[-1]
        if self._uses_running():
            mean = self.running_mean.reshape(1, 1, D).to(xs)
            cov = self.running_variance.to(xs)[None]
        else:
            mean = xs.mean(1, keepdim=True)
            centred = xs - mean
            cov = centred.mT @ centred / (xs.shape[1] - 1)
        eye = torch.eye(D, dtype=xs.dtype, device=xs.device)
        chol = _cholesky((1 - self.eps) * cov + self.eps * eye, "Whitening2d")
        y = torch.linalg.solve_triangular(chol.mT, xs - mean, upper=True, left=False)
        if self.training and self.track_running_stats:
            self._update(mean.detach(), cov.detach())
        return y

    @torch.no_grad()
    def _update(self, means: Tensor, covs: Tensor) -> None:
        m = self.momentum
        for mu, cov in zip(means, covs):
            self.running_mean.copy_(m * mu.reshape(self.running_mean.shape)
                                    + (1 - m) * self.running_mean)
            self.running_variance.copy_(m * cov + (1 - m) * self.running_variance)


class WMSELoss(nn.Module):
    """W-MSE (Ermolov et al., 2021); lightly's signature.

    ``forward(input)`` with input (num_samples * bs, embedding_dim): sample i's views are
    rows [i bs, (i+1) bs). For each of ``w_iter`` iterations the bs indices are shuffled
    (``torch.randperm(bs)`` on the default CPU generator, as lightly: the same seed gives
    the same sub-batches) and cut into bs / w_size sub-batches; each sub-batch of each
    sample is whitened by ``Whitening2d`` (its own mean and covariance: y = L^{-1}(x - mu),
    L L^T = (1 - eps) S + eps I). With z^i the whitened rows of sample i in their original
    order and P = num_samples (num_samples - 1) / 2 pairs,

        L = 1 / (w_iter P) * sum_iter sum_{i<j} loss_fn(z^i, z^j),
        loss_fn default: norm_mse_loss = 2 - 2 * mean_r cos(z^i_r, z^j_r).

    The sub-batches of one iteration are whitened in one batched Cholesky / triangular
    solve instead of lightly's Python loop (the running statistics still move once per
    sub-batch and sample, in lightly's order). Errors as lightly's: embedding_dim * 2 >
    w_size (ValueError), a batch not divisible by num_samples (RuntimeError), bs < w_size
    (ValueError); bs not a multiple of w_size raises a ShapeError naming w_size (lightly: a
    RuntimeError from ``view``). ``generator`` (keyword-only, a fastssl addition) draws the
    permutations from a given torch.Generator instead of the global one.
    """

    def __init__(self, embedding_dim: int = 128, momentum: float = 0.01, eps: float = 0.0,
                 track_running_stats: bool = True, w_iter: int = 1, w_size: int = 256,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = norm_mse_loss,
                 num_samples: int = 2, *, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.whitening = Whitening2d(num_features=embedding_dim, momentum=momentum, eps=eps,
                                     track_running_stats=track_running_stats)
        self.w_iter = _checks.integer(w_iter, "w_iter", lo=1)
        self.w_size = _checks.integer(w_size, "w_size", lo=2)
        if 2 * self.whitening.num_features > self.w_size:
            raise ValueError(f"w_size must be at least 2 * embedding_dim to avoid an unstable "
                             f"whitening, got w_size={w_size}, embedding_dim={embedding_dim}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_f = loss_fn
        self.num_samples = _checks.integer(num_samples, "num_samples", lo=2)
        self.num_pairs = self.num_samples * (self.num_samples - 1) // 2
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got "
                            f"{type(generator).__name__}")
        self.generator = generator

    def _check(self, input: Tensor) -> int:
        self.whitening.check_input(input, "input", "WMSELoss")
        if input.shape[0] % self.num_samples != 0:
            raise ShapeError(f"WMSELoss: input batch size must be divisible by num_samples="
                             f"{self.num_samples}, got {input.shape[0]} rows")
        bs = input.shape[0] // self.num_samples
        if bs < self.w_size:
            raise ShapeError(f"WMSELoss: batch size must be >= w_size={self.w_size}, got "
                             f"{bs} per sample")
        if bs % self.w_size != 0:
            raise ShapeError(f"WMSELoss: the batch size per sample ({bs}) must be a multiple "
                             f"of w_size={self.w_size}")
        return bs

    def _permutation(self, bs: int, device: torch.device) -> Tensor:
        g = self.generator
        perm = torch.randperm(bs) if g is None else torch.randperm(bs, generator=g,
                                                                   device=g.device)
        return perm.to(device)

    def _whitened(self, x: Tensor, perm: Tensor) -> Tensor:
        """x (S, bs, D) -> the whitened rows (S, bs, D) in their original order."""
        S, bs, D = x.shape
        C = bs // self.w_size
        chunks = x[:, perm.view(C, self.w_size)]                  # (S, C, w, D)
        flat = chunks.transpose(0, 1).reshape(C * S, self.w_size, D)  # lightly's order
        y = self.whitening.whiten(flat).reshape(C, S, self.w_size, D)
        y = y.transpose(0, 1).reshape(S, bs, D)                   # rows in perm's order
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(bs, device=perm.device)
        return y[:, inverse]

    def forward(self, input: Tensor) -> Tensor:
        bs = self._check(input)
        S = self.num_samples
        x = _acc(input).reshape(S, bs, -1)
        loss = 0.0
        for _ in range(self.w_iter):
            z = self._whitened(x, self._permutation(bs, input.device))
            for i in range(S - 1):
                for j in range(i + 1, S):
                    loss = loss + self.loss_f(z[i], z[j])
        loss = loss / (self.w_iter * self.num_pairs)
        return loss.to(input.dtype) if isinstance(loss, Tensor) else loss


# ----------------------------------------------------------------------------- FroSSL

class FroSSLLoss(nn.Module):
    """FroSSL (Skean et al., 2024); lightly's signature.

    ``forward(z_views)`` with a list of V >= 2 tensors (N, D). Each view is normalised
    per feature over the batch (columns to unit L2 norm, no centring): Z_v; Z_bar is their
    mean. With K_v = Z_v^T Z_v (D x D; Z_v Z_v^T when N <= D, which has the same non-zero
    spectrum and Frobenius norm):

        L = sum_v log ||K_v / tr(K_v)||_F^2  +  invariance_weight * sum_v V D mse(Z_v, Z_bar)

    with mse the mean of squared entries. The trace is detached, like lightly's ``.item()``
    (it equals D for non-zero columns, so its true gradient is zero), but stays a tensor:
    no host synchronisation. 16-bit inputs compute in float32.
    """

    def __init__(self, invariance_weight: float = 1.0) -> None:
        super().__init__()
        self.invariance_weight = _checks.number(invariance_weight, "invariance_weight")

    def forward(self, z_views: List[Tensor]) -> Tensor:
        _check_views("FroSSLLoss", z_views, 2)
        z = tF.normalize(_acc(torch.stack(list(z_views))), p=2, dim=1)  # (V, N, D)
        V, N, D = z.shape
        gram = z.mT @ z if N > D else z @ z.mT
        trace = torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1).detach()
        fro = torch.linalg.matrix_norm(gram, ord="fro")
        regularization = (2 * (torch.log(fro) - torch.log(trace))).sum()
        invariance = V * D * (z - z.mean(0, keepdim=True)).square().mean((1, 2)).sum()
        loss = regularization + self.invariance_weight * invariance
        return loss.to(z_views[0].dtype)


# ----------------------------------------------------------------------------- TiCo

class TiCoLoss(nn.Module):
    """TiCo: transformation invariance and covariance contrast (Zhu et al., 2022);
    lightly's signature, ``forward(z_a, z_b, update_covariance_matrix=True)``.

    Rows are L2-normalised (a_i, b_i, N rows); B_t = a^T a / N (detached) and

        C_t = beta * C_{t-1} + (1 - beta) * B_t,      C_0 = 0,
        L   = 1 - (1/N) sum_i a_i . b_i  +  rho * (1/N) sum_i a_i^T C_t a_i.

    ``C`` is the running covariance: None until the first call (which sets it to zeros
    even with ``update_covariance_matrix=False``, as lightly), then C_t after each call
    that updates it. Unlike lightly's plain attribute it is a buffer: ``.to()`` moves it
    and ``state_dict`` saves it (a fresh module loads it). It is kept in the arithmetic
    dtype (float32 for 16-bit inputs). With ``gather_distributed`` in a process group the
    rows are gathered from every rank (with gradient, ``fastssl.distributed``): every rank
    gets the loss and C of the global batch, and a rank may hold fewer than 2 rows as long
    as the global batch has 2. Batches of one row, or z_a and z_b of different shapes,
    raise an AssertionError (``ShapeError``), as lightly.
    """

    def __init__(self, beta: float = 0.9, rho: float = 8.0, gather_distributed: bool = False):
        super().__init__()
        self.beta = _checks.probability(beta, "beta")
        self.rho = _checks.number(rho, "rho")
        self.gather_distributed = _gather_flag(gather_distributed, "TiCoLoss")
        self.register_buffer("C", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "C"
        if self.C is None and isinstance(state_dict.get(key), Tensor):
            self.C = torch.empty_like(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _inputs(self, z_a: Tensor, z_b: Tensor, update: bool):
        active = self.gather_distributed and distributed.world_size() > 1
        with distributed.agree("TiCoLoss", active, min_total=2, z_a=z_a, z_b=z_b) as world:
            _check_rows("TiCoLoss", "z_a", z_a, 2, 0 if active else 2)
            _checks.floating(z_b, "z_b")
            _check_like("z_b", z_b, "z_a", z_a)
            _checks.flag(update, "update_covariance_matrix")
        if active:
            z_a = distributed.gather(z_a, sizes=world.sizes["z_a"])[0]
            z_b = distributed.gather(z_b, sizes=world.sizes["z_b"])[0]
        return _acc(z_a), _acc(z_b)

    def forward(self, z_a: Tensor, z_b: Tensor,
                update_covariance_matrix: bool = True) -> Tensor:
        dtype = z_a.dtype if isinstance(z_a, Tensor) else None
        a, b = self._inputs(z_a, z_b, update_covariance_matrix)
        a, b = tF.normalize(a, dim=1), tF.normalize(b, dim=1)
        batch_cov = (a.T @ a).detach() / a.shape[0]
        if self.C is None:
            self.C = torch.zeros_like(batch_cov)
        C = self.beta * self.C.to(batch_cov) + (1 - self.beta) * batch_cov
        invariance = 1.0 - (a * b).sum(dim=1).mean()
        contrast = self.rho * ((a @ C) * a).sum(dim=1).mean()
        if update_covariance_matrix:
            self.C = C.detach()
        return (invariance + contrast).to(dtype)
