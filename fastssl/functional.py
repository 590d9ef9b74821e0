"""Stateless losses. Each is one call into the tiled InfoNCE op (``fastssl::infonce``).

Notation: rows r_i, columns c_j, scale s (1/temperature or CLIP's logit_scale),
logits l_ij = s * r_i . c_j, and per row i with positive column p_i:

    loss_i = log sum_{j valid} exp(l_ij) - l_{i, p_i}

No n x m matrix is stored: the kernels keep per-row statistics and recompute tiles in the
backward pass (see ``fastssl.kernels.infonce``).
"""
import numbers

import torch
from torch import Tensor

from fastssl import _ops

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


def nt_xent(z0: Tensor, z1: Tensor, temperature=0.5) -> Tensor:
    """SimCLR's NT-Xent loss (lightly's ``NTXentLoss`` without a memory bank).

    z = [normalize(z0); normalize(z1)] (2n rows); row i is scored against all 2n rows but
    itself, its positive is its other view ((i + n) mod 2n), and the loss is the mean over
    the 2n rows of log sum_{j != i} exp(z_i.z_j / T) - z_i.z_{p_i} / T.
    """
    check_embeddings(z0=z0, z1=z1)
    s = scale_tensor(temperature, z0.device, "temperature", invert=True)
    n = z0.shape[0]
    z = torch.cat([z0, z1])
    idx = torch.arange(2 * n, device=z.device)
    loss = _rows_loss(z, z, s, (idx + n) % (2 * n), mask=idx)
    return loss.mean().to(z0.dtype)


def info_nce(query: Tensor, key: Tensor, temperature=0.1, negatives: Tensor = None,
             symmetric: bool = False) -> Tensor:
    """InfoNCE with in-batch negatives and optional extra negatives (a queue or bank).

    Row i of normalize(query) is scored against all rows of normalize(key) (its positive is
    key i) and, when given, against every row of normalize(negatives) (K x D, no gradient,
    read in place). Returns the mean over rows. ``symmetric=True`` averages this with the
    same loss with query and key exchanged (the negatives serve both directions).
    """
    check_embeddings(query=query, key=key)
    check_negatives(negatives, query)
    s = scale_tensor(temperature, query.device, "temperature", invert=True)
    pos = torch.arange(query.shape[0], device=query.device)
    loss = _rows_loss(query, key, s, pos, negatives=negatives).mean()
    if symmetric:
        back = _rows_loss(key, query, s, pos, negatives=negatives).mean()
        loss = (loss + back) / 2
    return loss.to(query.dtype)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale,
              logit_bias=None) -> Tensor:
    """CLIP's symmetric loss (open_clip's ``ClipLoss`` value for one process).

    logits = logit_scale * image @ text^T (+ logit_bias); the loss is the mean of the
    image->text and text->image cross-entropies with the matching pair as the label.
    Features are used as given (open_clip's models normalise them); logit_scale is already
    exponentiated. A constant bias cancels inside each softmax, so it does not change the
    value; it is accepted for signature compatibility and receives a zero gradient.
    """
    check_embeddings(image_features=image_features, text_features=text_features)
    s = scale_tensor(logit_scale, image_features.device, "logit_scale", invert=False)
    pos = torch.arange(image_features.shape[0], device=image_features.device)
    loss = (_rows_loss(image_features, text_features, s, pos, normalize=False).mean()
            + _rows_loss(text_features, image_features, s, pos, normalize=False).mean()) / 2
    if logit_bias is not None:
        bias = logit_bias if isinstance(logit_bias, Tensor) else torch.tensor(float(logit_bias))
        loss = loss + 0.0 * bias.float().sum()
    return loss.to(image_features.dtype)


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
