"""Stateless losses. Each is one call into the tiled InfoNCE op (``fastssl::infonce``).

Notation: rows r_i, columns c_j, scale s (1/temperature or CLIP's logit_scale),
logits l_ij = s * r_i . c_j, and per row i with positive column p_i:

    InfoNCE family:  loss_i = log sum_{j valid} exp(l_ij) - l_{i, p_i}
    SigLIP:          loss_i = sum_j softplus(-t_ij (l_ij + b)),  t_ij = +1 if j = p_i else -1

No n x m matrix is stored: the kernels keep per-row statistics and recompute tiles in the
backward pass (see ``fastssl.kernels.infonce`` and ``fastssl.kernels.siglip``).

Distributed (``gather_distributed=True`` inside an initialised process group): each rank
scores its local rows against the columns gathered from every rank (with gradient, see
``fastssl.distributed``), with positives at the rank's global offset. The loss is the mean
over the local rows; batch sizes may differ between ranks.
"""
import numbers

import torch
import torch.nn.functional as tF
from torch import Tensor

from fastssl import _ops, distributed

normalize = _ops.unit_rows  # x / max(||x||, 1e-12) per row, norm in float32


def check_embeddings(**named):
    """Validate 2-D floating embeddings on one device with one dtype and one width D."""
    items = list(named.items())
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    (n0, t0), rest = items[0], items[1:]
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{n0} is on {t0.device} but {name} is on {t.device}")
        if t.dtype != t0.dtype:
            raise ValueError(f"{n0} has dtype {t0.dtype} but {name} has {t.dtype}")
        if t.shape != t0.shape:
            raise ValueError(f"{n0} has shape {tuple(t0.shape)} but {name} has {tuple(t.shape)}")


def check_negatives(negatives, like):
    if negatives is None:
        return
    if not isinstance(negatives, Tensor) or not negatives.is_floating_point():
        raise ValueError("negatives must be a floating-point tensor of shape (K, D)")
    if negatives.dim() != 2 or negatives.shape[1] != like.shape[1]:
        raise ValueError(f"negatives must have shape (K, {like.shape[1]}), "
                         f"got {tuple(negatives.shape)}")
    if negatives.device != like.device:
        raise ValueError(f"negatives are on {negatives.device} but the embeddings on {like.device}")
    if negatives.requires_grad:
        raise ValueError("negatives receive no gradient; pass negatives.detach()")


def scale_tensor(value, device, name, invert):
    """A 0-d float32 tensor from a Python number or a tensor (keeping its autograd graph)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}")
        if value.device != device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the embeddings on {device}")
        s = value.reshape(()).float().to(device)
        return 1.0 / s if invert else s
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a scalar tensor, got {type(value).__name__}")
    if invert and value == 0:
        raise ValueError(f"{name} must be non-zero")
    return torch.tensor(1.0 / value if invert else float(value), dtype=torch.float32,
                        device=device)


def _rows_loss(rows, cols, scale, pos, mask=None, negatives=None, normalize=True):
    loss, _ = _ops.infonce(rows, cols, negatives, pos, mask, scale, normalize)
    return loss


def _world(gather):
    """(gathering?, this rank) — gathering only in an initialised group of > 1 processes."""
    if gather and distributed.world_size() > 1:
        return True, distributed.rank()
    return False, 0


def nt_xent(z0: Tensor, z1: Tensor, temperature=0.5, gather_distributed: bool = False) -> Tensor:
    """SimCLR's NT-Xent loss (lightly's ``NTXentLoss`` without a memory bank).

    z = [normalize(z0); normalize(z1)] (2n rows); row i is scored against all 2n rows but
    itself, its positive is its other view ((i + n) mod 2n), and the loss is the mean over
    the 2n rows of log sum_{j != i} exp(z_i.z_j / T) - z_i.z_{p_i} / T. With
    ``gather_distributed`` the columns are both views of the global batch.
    """
    check_embeddings(z0=z0, z1=z1)
    s = scale_tensor(temperature, z0.device, "temperature", invert=True)
    n = z0.shape[0]
    rows = torch.cat([z0, z1])
    i = torch.arange(n, device=z0.device)
    gather, r = _world(gather_distributed)
    if gather:
        g0, offsets = distributed.gather(z0)
        g1, _ = distributed.gather(z1)
        o, N = offsets[r], g0.shape[0]
        cols = torch.cat([g0, g1])
        pos = torch.cat([N + o + i, o + i])
        mask = torch.cat([o + i, N + o + i])
    else:
        cols = rows
        pos = torch.cat([n + i, i])
        mask = torch.cat([i, n + i])
    loss = _rows_loss(rows, cols, s, pos, mask=mask)
    return loss.mean().to(z0.dtype)


def info_nce(query: Tensor, key: Tensor, temperature=0.1, negatives: Tensor = None,
             symmetric: bool = False, gather_distributed: bool = False) -> Tensor:
    """InfoNCE with in-batch negatives and optional extra negatives (a queue or bank).

    Row i of normalize(query) is scored against all rows of normalize(key) (its positive is
    key i) and, when given, against every row of normalize(negatives) (K x D, no gradient,
    read in place). Returns the mean over rows. ``symmetric=True`` averages this with the
    same loss with query and key exchanged (the negatives serve both directions).
    """
    check_embeddings(query=query, key=key)
    check_negatives(negatives, query)
    s = scale_tensor(temperature, query.device, "temperature", invert=True)
    gather, r = _world(gather_distributed)

    def one(rows, other):
        cols, offsets = distributed.gather(other) if gather else (other, [0])
        pos = offsets[r] + torch.arange(rows.shape[0], device=rows.device)
        return _rows_loss(rows, cols, s, pos, negatives=negatives).mean()

    loss = one(query, key)
    if symmetric:
        loss = (loss + one(key, query)) / 2
    return loss.to(query.dtype)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
              local_loss: bool = False, gather_with_grad: bool = False,
              gather_distributed: bool = False) -> Tensor:
    """CLIP's symmetric loss (open_clip's ``ClipLoss``).

    logits = logit_scale * image @ text^T (+ logit_bias); the loss is the mean of the
    image->text and text->image cross-entropies with the matching pair as the label.
    Features are used as given (open_clip's models normalise them); logit_scale is already
    exponentiated. A constant bias cancels inside each softmax, so it does not change the
    value; it is accepted for signature compatibility and receives a zero gradient.

    With ``gather_distributed`` (open_clip with world_size > 1): features are gathered from
    every rank, with gradient if ``gather_with_grad`` (else other ranks' features are
    constants); ``local_loss=True`` scores the local rows against the global columns
    (labels offset by the rank's position), ``local_loss=False`` computes the global loss on
    every rank.
    """
    check_embeddings(image_features=image_features, text_features=text_features)
    s = scale_tensor(logit_scale, image_features.device, "logit_scale", invert=False)
    gather, r = _world(gather_distributed)
    img, txt, o = image_features, text_features, 0
    if gather:
        all_img, offsets = distributed.gather(img, with_grad=gather_with_grad)
        all_txt, _ = distributed.gather(txt, with_grad=gather_with_grad)
        if local_loss:
            o = offsets[r]
        else:
            img, txt = all_img, all_txt
        cols_img, cols_txt = all_img, all_txt
    else:
        cols_img, cols_txt = img, txt
    pos_i = o + torch.arange(img.shape[0], device=img.device)
    pos_t = o + torch.arange(txt.shape[0], device=txt.device)
    loss = (_rows_loss(img, cols_txt, s, pos_i, normalize=False).mean()
            + _rows_loss(txt, cols_img, s, pos_t, normalize=False).mean()) / 2
    if logit_bias is not None:
        bias = logit_bias if isinstance(logit_bias, Tensor) else torch.tensor(float(logit_bias))
        loss = loss + 0.0 * bias.float().sum()
    return loss.to(image_features.dtype)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                gather_distributed: bool = False) -> Tensor:
    """SigLIP's sigmoid loss (open_clip's ``SigLipLoss``).

    logits z = logit_scale * image @ text^T + logit_bias, labels +1 on the matching pair and
    -1 elsewhere; loss = -sum_ij log sigmoid(label_ij * z_ij) / n (n local images). Features
    are used as given; logit_scale is already exponentiated; both scale and bias may be
    tensors that require grad. With ``gather_distributed`` the local images are scored
    against the text features of every rank (gathered with gradient), which is the value
    and gradient of open_clip's neighbour exchange.
    """
    check_embeddings(image_features=image_features, text_features=text_features)
    dev = image_features.device
    s = scale_tensor(logit_scale, dev, "logit_scale", invert=False)
    b = scale_tensor(0.0 if logit_bias is None else logit_bias, dev, "logit_bias", invert=False)
    gather, r = _world(gather_distributed)
    cols, offsets = distributed.gather(text_features) if gather else (text_features, [0])
    n = image_features.shape[0]
    pos = offsets[r] + torch.arange(n, device=dev)
    loss, _ = _ops.siglip(image_features, cols, pos, s, b)
    return (loss.sum() / n).to(image_features.dtype)


def _info_nce_positive_only(query: Tensor, key: Tensor, negatives: Tensor, temperature) -> Tensor:
    """MoCo-style InfoNCE on normalised inputs: row i's logits are
    [q_i.k_i, q_i.n_1, ..., q_i.n_K] / T; only the own key is a positive (the other keys of
    the batch are not negatives). Mean over rows.
    """
    s = scale_tensor(temperature, query.device, "temperature", invert=True)
    q = normalize(query)
    l_pos = (q.float() * normalize(key).float()).sum(1) * s
    none = torch.full((query.shape[0],), -1, device=query.device, dtype=torch.long)
    lse_neg = _rows_loss(query, key[:0], s, none, negatives=negatives)
    return (torch.logaddexp(l_pos, lse_neg) - l_pos).mean()


# ----------------------------------------------------------------------------- non-contrastive

FORMULATIONS = ("auto", "gram", "dxd")


def _check_pair_nd(z_a, z_b, what):
    for name, t in (("z_a", z_a), ("z_b", z_b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    if z_a.shape != z_b.shape:
        raise ValueError(f"z_a has shape {tuple(z_a.shape)} but z_b has {tuple(z_b.shape)}")
    if z_a.dtype != z_b.dtype or z_a.device != z_b.device:
        raise ValueError(f"z_a and z_b differ in dtype or device ({z_a.dtype} on {z_a.device}, "
                         f"{z_b.dtype} on {z_b.device})")
    if z_a.dim() < 2 or z_a.shape[-1] == 0:
        raise ValueError(f"{what} takes (N, D) inputs, got shape {tuple(z_a.shape)}")
    if z_a.shape[0] < 2:
        raise ValueError(f"{what} needs a batch of at least 2 samples, got {z_a.shape[0]}")


def check_formulation(formulation):
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")


def _use_gram(N, D, formulation):
    """Gram work ~8 N^2 D against the D x D formulation's ~6 N D^2 (forward + backward)."""
    check_formulation(formulation)
    return formulation == "gram" or (formulation == "auto" and 4 * N < 3 * D)


def _fro2(a, b, gram):
    """||a^T b||_F^2 in float32, by the N x N Gram formulation or the D x D product."""
    if gram:
        return _ops.gram_inner(a, b)
    return torch.linalg.vector_norm(a.float().T @ b.float()).square()


def _standardize(z, eps, stats=None):
    """Per-feature (z - mean) / sqrt(biased var + eps) in float32: the fused op on the local
    batch, or given (mean, var) of the global batch."""
    if stats is None:
        return _ops.standardize(z, eps)[0]
    mean, var = stats
    return (z.float() - mean) * torch.rsqrt(var + eps)


def _global_stats(z):
    """Mean and biased variance over the global batch, differentiable (sum convention)."""
    from torch.distributed.nn.functional import all_reduce
    zf = z.float()
    count = torch.tensor(float(z.shape[0]), device=z.device)
    torch.distributed.all_reduce(count)
    s1 = all_reduce(zf.sum(0))
    s2 = all_reduce((zf * zf).sum(0))
    mean = s1 / count
    return mean, s2 / count - mean * mean, count


def barlow_twins(z_a: Tensor, z_b: Tensor, lambda_param: float = 5e-3,
                 gather_distributed: bool = False, normalize: str = "local",
                 formulation: str = "auto") -> Tensor:
    """Barlow Twins: sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.

    A, B are the views standardised per feature (mean, biased variance, eps 1e-5, as
    ``batch_norm`` in training mode) and C = A^T B / N. Computed as
    sum_i (1 - C_ii)^2 + lambda (||C||_F^2 - sum_i C_ii^2) with ||C||_F^2 = <AA^T, BB^T> / N^2
    (``formulation="gram"``, O(N^2 D), no D x D matrix) or from C itself (``"dxd"``);
    ``"auto"`` picks the cheaper one from the shapes.

    Distributed (``gather_distributed`` in a process group): ``normalize="local"`` is
    lightly's semantics (per-rank standardisation, C averaged over ranks by an autograd-aware
    all_reduce); ``normalize="global"`` is the reference implementation's (statistics of the
    global batch, as SyncBatchNorm gives, and C over the global batch). Both use the D x D
    formulation. Inputs are (N, D); the loss is float32 math returned in the input dtype.
    """
    _check_pair_nd(z_a, z_b, "barlow_twins")
    if z_a.dim() != 2:
        raise ValueError(f"barlow_twins takes (N, D) inputs, got shape {tuple(z_a.shape)}")
    if normalize not in ("local", "global"):
        raise ValueError(f"normalize must be 'local' or 'global', got {normalize!r}")
    N, D = z_a.shape
    eps = 1e-5
    gather, _ = _world(gather_distributed)
    if gather:
        from torch.distributed.nn.functional import all_reduce
        if normalize == "global":
            mean_a, var_a, count = _global_stats(z_a)
            mean_b, var_b, _ = _global_stats(z_b)
            a, b = _standardize(z_a, eps, (mean_a, var_a)), _standardize(z_b, eps, (mean_b, var_b))
            c = all_reduce(a.T @ b) / count
        else:
            a, b = _standardize(z_a, eps), _standardize(z_b, eps)
            c = all_reduce(a.T @ b / N) / distributed.world_size()
        diag = torch.diagonal(c)
        fro2 = torch.linalg.vector_norm(c).square()
    else:
        gram = _use_gram(N, D, formulation)
        a32, b32 = _standardize(z_a, eps), _standardize(z_b, eps)
        a, b = a32.to(z_a.dtype), b32.to(z_b.dtype)  # matmul operands (16-bit stay 16-bit)
        # The off-diagonal part ||C||^2 - sum C_ii^2 subtracts terms computed from the same
        # rounded operands; the diagonal term uses the float32 views.
        fro2 = _fro2(a, b, gram) / (N * N)
        diag_sq = ((a.float() * b.float()).sum(0) / N).square().sum()
        diag = (a32 * b32).sum(0) / N
        loss = (1 - diag).square().sum() + lambda_param * (fro2 - diag_sq)
        return loss.to(z_a.dtype)
    diag_sq = diag.square().sum()
    loss = (1 - diag).square().sum() + lambda_param * (fro2 - diag_sq)
    return loss.to(z_a.dtype)


def _cov_loss(x, gram):
    """sum_{i != j} cov_ij^2 / D with cov = X^T X / (N - 1), X centred; x is (N, D)."""
    N, D = x.shape
    xc = (x.float() - x.float().mean(0)).to(x.dtype)  # one rounding, shared by both terms
    diag = xc.float().square().sum(0) / (N - 1)
    fro2 = _fro2(xc, xc, gram) / ((N - 1) ** 2)
    return (fro2 - diag.square().sum()) / D


def vicreg(z_a: Tensor, z_b: Tensor, lambda_param: float = 25.0, mu_param: float = 25.0,
           nu_param: float = 1.0, eps: float = 1e-4, gather_distributed: bool = False,
           formulation: str = "auto") -> Tensor:
    """VICReg: lambda * MSE(z_a, z_b) + mu * (var(z_a) + var(z_b)) / 2 + nu * (cov(z_a) + cov(z_b)).

    var(z) = mean_d relu(1 - sqrt(Var_unbiased(z_d) + eps)); cov(z) = sum_{i != j} cov_ij^2 / D
    with cov normalised by N - 1, computed as (||cov||_F^2 - sum_i cov_ii^2) / D where
    ||X^T X||_F^2 = <X X^T, X X^T> (Gram formulation when N < D). Inputs (N, D) or
    (N, L, D) (terms averaged over L, as lightly). With ``gather_distributed`` the variance
    and covariance terms use the global batch (gathered with gradient); the invariance term
    stays local.
    """
    _check_pair_nd(z_a, z_b, "vicreg")
    inv = tF.mse_loss(z_a.float(), z_b.float())
    gather, _ = _world(gather_distributed)
    if gather:
        shape = z_a.shape
        z_a = distributed.gather(z_a.reshape(shape[0], -1))[0].reshape(-1, *shape[1:])
        z_b = distributed.gather(z_b.reshape(shape[0], -1))[0].reshape(-1, *shape[1:])

    def var_loss(z):
        std = torch.sqrt(z.float().var(0) + eps)
        return torch.relu(1.0 - std).mean()

    def cov_loss(z):
        flat = z.reshape(z.shape[0], -1, z.shape[-1]).transpose(0, 1)  # (L, N, D)
        gram = _use_gram(z.shape[0], z.shape[-1], formulation) and not gather
        return torch.stack([_cov_loss(x, gram) for x in flat.unbind(0)]).mean()

    loss = (lambda_param * inv + mu_param * 0.5 * (var_loss(z_a) + var_loss(z_b))
            + nu_param * (cov_loss(z_a) + cov_loss(z_b)))
    return loss.to(z_a.dtype)


def negative_cosine_similarity(x0: Tensor, x1: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """-mean cosine_similarity(x0, x1) along ``dim`` (BYOL / SimSiam; stop-gradient is the
    caller's, e.g. ``x1.detach()``)."""
    if x0.shape != x1.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but x1 has {tuple(x1.shape)}")
    return -tF.cosine_similarity(x0, x1, dim=dim, eps=eps).mean()
