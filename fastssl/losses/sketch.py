"""Distribution-matching regularisers on random one-dimensional slices, with lightly's names
and signatures: SIGReg and the LeJEPA loss (characteristic-function sketch), the VISReg
loss (sorted slices against Gaussian quantiles).

SIGReg. For embeddings z (..., N, D), M random unit directions A (D x M) and knots
t_k = k t_max / (K - 1), k = 0 .. K - 1, the projections x = z A give, per set of samples
and direction m,

    c_mk = (1/N) sum_n cos(t_k x_nm),   s_mk = (1/N) sum_n sin(t_k x_nm),
    SIGReg = mean_m  N sum_k w_k [(c_mk - exp(-t_k^2 / 2))^2 + s_mk^2]

with w_k the trapezoid weights over [-t_max, t_max] (the integrand is even: twice the
weights on [0, t_max], dt at the ends, 2 dt inside) times the Gaussian window
exp(-t_k^2 / 2); the mean runs over the directions and every leading index of z. The sums
come from ``fastssl._ops.ecf_sums`` (kernels/sketch.py on CUDA, chunked torch elsewhere):
nothing of size N x M x K is held, only the projections x (N x M, float32), where the
eager formula holds x_t, cos and sin of size N x M x K and their gradients.

VISReg. With z' = (z - mean) / (std.detach() + eps) over the N samples and S random unit
slices, the shape term is mean_{n,s} (sort_n(z' a_s)_n - q_n)^2 with q_n the standard
normal quantile at n / (N + 1). It runs over the slices in chunks and keeps its gradient
(N x D) from the same pass: no (N x S) projection, sort or index tensor outlives a chunk.

Arithmetic: float64 inputs compute in float64; float32, bfloat16 and float16 inputs in
float32 (the directions are drawn in the input dtype, as lightly draws them, so a seeded
call uses lightly's directions, and normalised in float32).
"""
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastssl import _checks, _ops, distributed
from fastssl._checks import ShapeError
from fastssl._ops import acc_dtype

from ._common import _gather_flag

__all__ = ["SIGReg", "LeJEPALoss", "lejepa_invariance_loss", "LeWMLoss", "latent_distance",
           "latent_prediction_loss", "VISRegLoss",
           "VISRegLossComponents", "visreg_center_loss", "visreg_scale_loss",
           "visreg_shape_loss"]

CHUNK = 2 ** 20  # elements of one slice chunk's (V, N, chunk) temporaries


def _unit_columns(a: Tensor) -> Tensor:
    return a / a.norm(p=2, dim=0)


def _flat(z: Tensor, name: str) -> Tensor:
    """(V, N, D) view of a (..., N, D) floating tensor."""
    _checks.floating(z, name)
    if z.dim() < 2:
        raise ShapeError(f"{name} must have shape (..., N, D), got {tuple(z.shape)}")
    lead = 1
    for size in z.shape[:-2]:
        lead *= size
    return z.reshape(lead, z.shape[-2], z.shape[-1])


def _check_views(local_proj, global_proj, min_batch=1):
    for name, t in (("local_proj", local_proj), ("global_proj", global_proj)):
        _checks.floating(t, name)
        if t.dim() != 3:
            raise ShapeError(f"{name} must have shape (V_{name.split('_')[0]}, N, D), "
                             f"got {tuple(t.shape)}")
    if local_proj.shape[1:] != global_proj.shape[1:]:
        raise ShapeError("local_proj and global_proj must have matching batch and feature "
                         f"dimensions, got {tuple(local_proj.shape)} and "
                         f"{tuple(global_proj.shape)}")
    for name, t in (("local_proj", local_proj), ("global_proj", global_proj)):
        if t.shape[0] < 1:
            raise ShapeError(f"{name} must hold at least one view, got {tuple(t.shape)}")
    if local_proj.shape[1] < min_batch:
        raise ShapeError(f"the batch size must be at least {min_batch}, got "
                         f"{local_proj.shape[1]}")
    if local_proj.dtype != global_proj.dtype or local_proj.device != global_proj.device:
        raise ValueError("local_proj and global_proj must share dtype and device, got "
                         f"{local_proj.dtype} on {local_proj.device} and "
                         f"{global_proj.dtype} on {global_proj.device}")


# ----------------------------------------------------------------------------- SIGReg

class SIGReg(nn.Module):
    """Sketched isotropic Gaussian regulariser (LeJEPA): the Epps-Pulley distance between the
    empirical characteristic function of random slices and the standard normal's, on every
    set of samples of ``proj`` (..., N, D); see the module docstring for the formula.

    ``knots`` >= 2 frequencies on [0, ``t_max``], ``num_vectors`` fresh random directions per
    call. With ``gather_distributed`` the directions come from rank 0 and the sums and N are
    totalled over the ranks, so every rank gets the loss of the global batch (ranks may hold
    different N, zero included). The buffers ``t``, ``phi`` and ``weights`` are lightly's.
    """

    def __init__(self, *, knots: int = 17, t_max: float = 3.0, num_vectors: int = 1024,
                 gather_distributed: bool = False):
        super().__init__()
        knots = _checks.integer(knots, "knots", lo=2)
        t_max = _checks.number(t_max, "t_max", lo=0.0, lo_open=True)
        self.num_vectors = _checks.integer(num_vectors, "num_vectors", lo=1)
        self.gather_distributed = _gather_flag(gather_distributed, "SIGReg")
        t = torch.linspace(0, t_max, knots, dtype=torch.float32)
        dt = t_max / (knots - 1)
        weights = torch.full((knots,), 2 * dt, dtype=torch.float32)
        weights[[0, -1]] = dt
        window = torch.exp(-t.square() / 2.0)
        self.register_buffer("t", t)
        self.register_buffer("phi", window)
        self.register_buffer("weights", weights * window)

    def _generate_unit_vectors(self, device, dtype, num_features) -> Tensor:
        """(num_features, num_vectors) random unit columns: drawn in ``dtype`` from the
        default generator (rank 0's under gather_distributed), normalised in float32 or
        float64."""
        a = torch.randn(num_features, self.num_vectors, device=device, dtype=dtype)
        if self._gathering():
            torch.distributed.broadcast(a, src=0)
        return _unit_columns(a.to(acc_dtype(a)))

    def _gathering(self):
        return self.gather_distributed and distributed.world_size() > 1

    def forward(self, proj: Tensor) -> Tensor:
        active = self._gathering()
        with distributed.agree("SIGReg", active, proj=_samples_first(proj)) as world:
            z = _flat(proj, "proj")
            if not active and z.shape[0] * z.shape[1] * z.shape[2] == 0:
                raise ShapeError(f"proj holds no samples: shape {tuple(proj.shape)}")
        n = world.total if active else z.shape[1]
        acc = acc_dtype(z)
        a = self._generate_unit_vectors(z.device, z.dtype, z.shape[-1]).to(acc)
        x = (z.to(acc) @ a).contiguous()
        t, phi, w = (b.to(device=x.device, dtype=acc) for b in (self.t, self.phi, self.weights))
        c, s = _ops.ecf_sums(x, t)
        if active:
            c, s = distributed._all_reduce_sum(c), distributed._all_reduce_sum(s)
        err = (c / n - phi).square() + (s / n).square()
        loss = ((err @ w) * n).mean()
        return loss.to(torch.promote_types(proj.dtype, self.t.dtype))


def _samples_first(proj):
    """``proj`` with its sample axis first, for the cross-rank agreement (every other
    dimension must match between ranks, N may differ)."""
    if isinstance(proj, Tensor) and proj.dim() >= 2:
        return proj.movedim(-2, 0)
    return proj


def lejepa_invariance_loss(*, all_proj: Tensor, global_proj: Tensor) -> Tensor:
    """mean over views, samples and features of (mean_g global_proj_g - all_proj_v)^2."""
    acc = acc_dtype(all_proj)
    centre = global_proj.to(acc).mean(0)
    return (centre - all_proj.to(acc)).square().mean().to(all_proj.dtype)


class LeJEPALoss(nn.Module):
    """lambda * SIGReg(all views) + (1 - lambda) * lejepa_invariance_loss, with all views =
    cat(global_proj, local_proj) (V, N, D) and the invariance pulling every view to the mean
    global view."""

    def __init__(self, lambda_param: float = 0.05, gather_distributed: bool = False,
                 sigreg_knots: int = 17, sigreg_t_max: float = 3.0,
                 sigreg_num_vectors: int = 1024):
        super().__init__()
        self.lambda_param = _checks.probability(lambda_param, "lambda_param")
        self.sigreg = SIGReg(knots=sigreg_knots, t_max=sigreg_t_max,
                             num_vectors=sigreg_num_vectors,
                             gather_distributed=gather_distributed)

    def forward(self, *, local_proj: Tensor, global_proj: Tensor) -> Tensor:
        _check_views(local_proj, global_proj)
        all_proj = torch.cat([global_proj, local_proj], dim=0)
        reg = self.sigreg(all_proj)
        inv = lejepa_invariance_loss(all_proj=all_proj, global_proj=global_proj)
        return self.lambda_param * reg + (1.0 - self.lambda_param) * inv


# ----------------------------------------------------------------------------- LeWM

DISTANCES = ("l1", "l2")


def latent_distance(*, predicted: Tensor, target: Tensor, distance: str = "l2",
                    normalize: bool = False) -> Tensor:
    """mean |p - sg t| ("l1") or mean (p - sg t)^2 ("l2") over every entry, both layer-
    normalised over the last dimension first with ``normalize`` (no affine, eps 1e-5)."""
    distance = _checks.choice(distance, "distance", DISTANCES)
    _checks.floating(predicted, "predicted")
    _checks.floating(target, "target")
    if predicted.shape != target.shape:
        raise ShapeError("predicted and target must have the same shape, got "
                         f"{tuple(predicted.shape)} and {tuple(target.shape)}")
    acc = acc_dtype(predicted)
    p, t = predicted.to(acc), target.detach().to(acc)
    if normalize:
        p = nn.functional.layer_norm(p, (p.shape[-1],))
        t = nn.functional.layer_norm(t, (t.shape[-1],))
    d = p - t
    out = d.abs().mean() if distance == "l1" else d.square().mean()
    return out.to(predicted.dtype)


def latent_prediction_loss(*, predicted: Tensor, target: Tensor,
                           normalize: bool = False) -> Tensor:
    """``latent_distance`` with the squared error (LeWM's prediction loss)."""
    return latent_distance(predicted=predicted, target=target, distance="l2",
                           normalize=normalize)


class LeWMLoss(nn.Module):
    """LeWorldModel's loss: latent_prediction_loss(predicted, target) + lambda *
    SIGReg over the batch, one set of samples per frame: ``embeddings`` (B, T, D) enters
    SIGReg as (T, B, D), so each time step's B embeddings are the samples."""

    def __init__(self, lambda_param: float = 0.1, normalize: bool = False,
                 gather_distributed: bool = False, sigreg_knots: int = 17,
                 sigreg_t_max: float = 3.0, sigreg_num_vectors: int = 1024) -> None:
        super().__init__()
        self.lambda_param = _checks.number(lambda_param, "lambda_param", lo=0.0)
        self.normalize = _checks.flag(normalize, "normalize")
        self.sigreg = SIGReg(knots=sigreg_knots, t_max=sigreg_t_max,
                             num_vectors=sigreg_num_vectors,
                             gather_distributed=gather_distributed)

    def forward(self, *, predicted: Tensor, target: Tensor, embeddings: Tensor) -> Tensor:
        _checks.floating(embeddings, "embeddings")
        if embeddings.dim() != 3:
            raise ShapeError(f"embeddings must have shape (B, T, D), got "
                             f"{tuple(embeddings.shape)}")
        _checks.floating(predicted, "predicted")
        if predicted.dim() < 2 or embeddings.shape[0] != predicted.shape[0] \
                or embeddings.shape[-1] != predicted.shape[-1]:
            raise ShapeError("embeddings must share the batch size and embedding dimension "
                             f"of predicted, got {tuple(embeddings.shape)} and "
                             f"{tuple(predicted.shape)}")
        prediction = latent_prediction_loss(predicted=predicted, target=target,
                                            normalize=self.normalize)
        regularization = self.sigreg(embeddings.transpose(0, 1))
        return prediction + self.lambda_param * regularization


# ----------------------------------------------------------------------------- VISReg

def visreg_center_loss(z: Tensor) -> Tensor:
    """mean over sets and features of (mean_n z)^2, for z (..., N, D)."""
    return z.to(acc_dtype(z)).mean(dim=-2).square().mean().to(z.dtype)


def visreg_scale_loss(z: Tensor) -> Tensor:
    """mean over sets and features of (1 - std_n z)^2 (biased std), for z (..., N, D)."""
    acc = acc_dtype(z)
    return (1.0 - z.to(acc).std(dim=-2, unbiased=False)).square().mean().to(z.dtype)


class _SortedSlices(torch.autograd.Function):
    """mean_{v,n,s} (sort_n(z_v a_s)_n - q_n)^2 over chunks of slices, the gradient in z
    (the sorted difference scattered back to each sample's position, times the slices)
    accumulated in the same pass."""

    @staticmethod
    def forward(ctx, z, slices, q):
        V, N, _ = z.shape
        S = slices.shape[1]
        step = max(1, CHUNK // max(V * N, 1))
        total = z.new_zeros(())
        grad = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        for s0 in range(0, S, step):
            a = slices[:, s0:s0 + step]
            values, order = (z @ a).sort(dim=1)
            diff = values.sub_(q[:, None])
            total += diff.square().sum()
            if grad is not None:
                grad.baddbmm_(torch.empty_like(diff).scatter_(1, order, diff),
                              a.T.expand(V, -1, -1))
        ctx.save_for_backward(grad)
        ctx.scale = 2.0 / (V * N * S)
        return total / (V * N * S)

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return (g * ctx.scale) * grad, None, None


def _normal_quantiles(n, device, dtype):
    positions = torch.arange(1, n + 1, device=device, dtype=torch.float64) / (n + 1)
    return torch.special.ndtri(positions).to(dtype)


def visreg_shape_loss(z: Tensor, num_slices: int, eps: float = 1e-4) -> Tensor:
    """Sliced 2-Wasserstein distance of the standardised samples (std detached) to the
    standard normal, on ``num_slices`` fresh random unit slices (module docstring)."""
    num_slices = _checks.integer(num_slices, "num_slices", lo=1)
    eps = _checks.number(eps, "eps", lo=0.0, lo_open=True)
    acc = acc_dtype(z)
    zf = _flat(z, "z").to(acc)
    mean = zf.mean(dim=1, keepdim=True)
    std = zf.std(dim=1, unbiased=False, keepdim=True)
    z_norm = (zf - mean) / (std.detach() + eps)
    slices = torch.randn(z.shape[-1], num_slices, device=z.device, dtype=z.dtype)
    slices = _unit_columns(slices.to(acc))
    q = _normal_quantiles(zf.shape[1], z.device, acc)
    return _SortedSlices.apply(z_norm, slices, q).to(z.dtype)


class VISRegLossComponents(NamedTuple):
    """The VISReg loss and its unweighted terms."""
    total: Tensor
    pred: Tensor
    scale: Tensor
    shape: Tensor
    center: Tensor


class VISRegLoss(nn.Module):
    """(1 - lambda) * pred + lambda * (l_scale * scale + l_shape * shape + l_center * center)
    on all views = cat(global_proj, local_proj) (V, N, D), pred being
    ``lejepa_invariance_loss``. With ``gather_distributed`` the three regularisers see the
    samples of every rank (pred stays local); by default each rank draws its own slices and
    no collective runs."""

    def __init__(self, lambda_param: float = 0.9, num_slices: int = 4096,
                 lambda_scale: float = 1.0, lambda_shape: float = 1.0,
                 lambda_center: float = 1.0, gather_distributed: bool = False,
                 eps: float = 1e-4):
        super().__init__()
        self.lambda_param = _checks.probability(lambda_param, "lambda_param")
        self.num_slices = _checks.integer(num_slices, "num_slices", lo=1)
        for name, v in (("lambda_scale", lambda_scale), ("lambda_shape", lambda_shape),
                        ("lambda_center", lambda_center)):
            setattr(self, name, _checks.number(v, name, lo=0.0))
        self.gather_distributed = _gather_flag(gather_distributed, "VISRegLoss")
        self.eps = _checks.number(eps, "eps", lo=0.0, lo_open=True)

    def forward(self, *, local_proj: Tensor, global_proj: Tensor) -> Tensor:
        return self.forward_components(local_proj=local_proj, global_proj=global_proj).total

    def forward_components(self, *, local_proj: Tensor,
                           global_proj: Tensor) -> VISRegLossComponents:
        active = self.gather_distributed and distributed.world_size() > 1
        with distributed.agree("VISRegLoss", active, min_total=2, min_each=1,
                               local_proj=_samples_first(local_proj),
                               global_proj=_samples_first(global_proj)):
            _check_views(local_proj, global_proj, min_batch=1 if active else 2)
        proj = torch.cat([global_proj, local_proj], dim=0)
        pred = lejepa_invariance_loss(all_proj=proj, global_proj=global_proj)
        if active:
            proj = _gather_samples(proj)
        scale = visreg_scale_loss(proj)
        shape = visreg_shape_loss(proj, num_slices=self.num_slices, eps=self.eps)
        center = visreg_center_loss(proj)
        reg = self.lambda_scale * scale + self.lambda_shape * shape + self.lambda_center * center
        total = (1.0 - self.lambda_param) * pred + self.lambda_param * reg
        return VISRegLossComponents(total, pred, scale, shape, center)


def _gather_samples(proj):
    """(V, N_global, D): every rank's samples in rank order, differentiable (the sum
    convention of ``fastssl.distributed``)."""
    V, N, D = proj.shape
    flat = proj.movedim(1, 0).reshape(N, V * D)
    full, _ = distributed.gather(flat)
    return full.reshape(-1, V, D).movedim(0, 1)

