"""torch.library custom ops over the kernels: schema, fake (meta) and autograd registrations.

``fastssl::infonce`` returns the per-row loss (differentiable) and per-row statistics
(lse2, ex, px; not differentiable). With ``normalize=True`` rows, columns and negatives
are L2-normalised first (x / max(||x||, 1e-12), norm in float32). Its autograd formula
calls ``fastssl::infonce_backward`` for the embeddings (gradients accumulate in float32
and pass through the normalisation's Jacobian in float32 before the final cast) and takes
the scale gradient from the saved statistics: d loss_i / d s = ex_i - px_i.
"""
from typing import Optional

import torch
from torch import Tensor

from fastssl import _dispatch

NORM_EPS = 1e-12  # applied to a float32 norm, so it survives fp16/bf16 inputs


def unit_rows(x: Tensor) -> Tensor:
    """x / max(||x||, 1e-12) per row, with the norm in float32; zero rows stay zero."""
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)
    return (x.float() / norm.clamp_min(NORM_EPS)).to(x.dtype)


def unit_rows_backward(x: Tensor, d_unit: Tensor) -> Tensor:
    """Gradient through ``unit_rows`` in float32: (I - u u^T) d / ||x||.

    A row whose norm is at most 1e-12 (a zero embedding) gets a zero gradient instead of
    d / 1e-12, which would overflow 16-bit gradients and wreck the step.
    """
    xf = x.float()
    norm = torch.linalg.vector_norm(xf, dim=1, keepdim=True)
    alive = norm > NORM_EPS
    safe = torch.where(alive, norm, 1.0)
    u = xf / safe
    grad = (d_unit - u * (u * d_unit).sum(1, keepdim=True)) / safe
    return torch.where(alive, grad, 0.0)


def _inputs(rows, cols, negatives, normalize):
    if not normalize:
        return rows, cols, None
    w = None
    if negatives is not None:
        norm = torch.linalg.vector_norm(negatives, dim=1, dtype=torch.float32)
        w = 1.0 / norm.clamp_min(NORM_EPS)
    return unit_rows(rows), unit_rows(cols), w


@torch.library.custom_op("fastssl::infonce", mutates_args=())
def infonce(rows: Tensor, cols: Tensor, negatives: Optional[Tensor], pos_idx: Tensor,
            mask_idx: Optional[Tensor], scale: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    _, impl = _dispatch.implementation("infonce", rows, cols, negatives)
    r, c, w = _inputs(rows, cols, negatives, normalize)
    return impl.forward(r, c, negatives, w, pos_idx, mask_idx, scale)


@infonce.register_fake
def _(rows, cols, negatives, pos_idx, mask_idx, scale, normalize):
    n = rows.shape[0]
    return rows.new_empty(n, dtype=torch.float32), rows.new_empty(3, n, dtype=torch.float32)


@torch.library.custom_op("fastssl::infonce_backward", mutates_args=())
def infonce_backward(rows: Tensor, cols: Tensor, negatives: Optional[Tensor], pos_idx: Tensor,
                     mask_idx: Optional[Tensor], scale: Tensor, lse2: Tensor, grad: Tensor,
                     normalize: bool, need_rows: bool, need_cols: bool) -> tuple[Tensor, Tensor]:
    _, impl = _dispatch.implementation("infonce", rows, cols, negatives)
    r, c, w = _inputs(rows, cols, negatives, normalize)
    d_r, d_c = impl.backward(r, c, negatives, w, pos_idx, mask_idx, scale, lse2, grad,
                             need_rows, need_cols)
    # custom ops return tensors, not None: an empty tensor stands for "not requested".
    out = []
    for x, d in ((rows, d_r), (cols, d_c)):
        if d is None:
            out.append(x.new_empty(0))
        else:
            out.append((unit_rows_backward(x, d) if normalize else d).to(x.dtype))
    return out[0], out[1]


def _grad_like(x, need):
    """The fake of a gradient output: like x (contiguous), or empty when not requested."""
    return torch.empty_like(x, memory_format=torch.contiguous_format) if need else x.new_empty(0)


@infonce_backward.register_fake
def _(rows, cols, negatives, pos_idx, mask_idx, scale, lse2, grad, normalize, need_rows,
      need_cols):
    return _grad_like(rows, need_rows), _grad_like(cols, need_cols)


def _setup(ctx, inputs, output):
    rows, cols, negatives, pos_idx, mask_idx, scale, normalize = inputs
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.normalize = normalize
    ctx.has_neg = negatives is not None
    ctx.has_mask = mask_idx is not None
    saved = [rows, cols, pos_idx, scale, stats]
    saved += [negatives] if ctx.has_neg else []
    saved += [mask_idx] if ctx.has_mask else []
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_loss, grad_stats):
    rows, cols, pos_idx, scale, stats, *rest = ctx.saved_tensors
    negatives = rest.pop(0) if ctx.has_neg else None
    mask_idx = rest.pop(0) if ctx.has_mask else None
    need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g = grad_loss.float().contiguous()
    d_rows = d_cols = d_scale = None
    if need_rows or need_cols:
        d_rows, d_cols = infonce_backward(rows, cols, negatives, pos_idx, mask_idx, scale,
                                          stats[0].contiguous(), g, ctx.normalize,
                                          need_rows, need_cols)
    if ctx.needs_input_grad[5]:
        px = torch.where(pos_idx >= 0, stats[2], 0.0)
        d_scale = (g * (stats[1] - px)).sum().reshape(scale.shape).to(scale.dtype)
    return (d_rows if need_rows else None, d_cols if need_cols else None, None, None, None,
            d_scale, None)


infonce.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- SigLIP

@torch.library.custom_op("fastssl::siglip", mutates_args=())
def siglip(rows: Tensor, cols: Tensor, pos_idx: Tensor, scale: Tensor,
           bias: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row sigmoid loss (differentiable) and statistics [a, c] (see kernels/siglip.py)."""
    _, impl = _dispatch.implementation("siglip", rows, cols)
    return impl.forward(rows, cols, pos_idx, scale, bias)


@siglip.register_fake
def _(rows, cols, pos_idx, scale, bias):
    n = rows.shape[0]
    return rows.new_empty(n, dtype=torch.float32), rows.new_empty(2, n, dtype=torch.float32)


@torch.library.custom_op("fastssl::siglip_backward", mutates_args=())
def siglip_backward(rows: Tensor, cols: Tensor, pos_idx: Tensor, scale: Tensor, bias: Tensor,
                    grad: Tensor, need_rows: bool, need_cols: bool) -> tuple[Tensor, Tensor]:
    _, impl = _dispatch.implementation("siglip", rows, cols)
    d_r, d_c = impl.backward(rows, cols, pos_idx, scale, bias, grad, need_rows, need_cols)
    return (rows.new_empty(0) if d_r is None else d_r.to(rows.dtype),
            cols.new_empty(0) if d_c is None else d_c.to(cols.dtype))


@siglip_backward.register_fake
def _(rows, cols, pos_idx, scale, bias, grad, need_rows, need_cols):
    return _grad_like(rows, need_rows), _grad_like(cols, need_cols)


def _siglip_setup(ctx, inputs, output):
    rows, cols, pos_idx, scale, bias = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(rows, cols, pos_idx, scale, bias, output[1])


def _siglip_backward(ctx, grad_loss, grad_stats):
    rows, cols, pos_idx, scale, bias, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = grad_loss.float().contiguous()
    d_rows = d_cols = None
    if need[0] or need[1]:
        d_rows, d_cols = siglip_backward(rows, cols, pos_idx, scale, bias, g, need[0], need[1])
    d_scale = (g * stats[1]).sum().reshape(scale.shape).to(scale.dtype) if need[3] else None
    d_bias = (g * stats[0]).sum().reshape(bias.shape).to(bias.dtype) if need[4] else None
    return (d_rows if need[0] else None, d_cols if need[1] else None, None, d_scale, d_bias)


siglip.register_autograd(_siglip_backward, setup_context=_siglip_setup)


# ----------------------------------------------------------------------------- Gram products

@torch.library.custom_op("fastssl::gram_inner", mutates_args=())
def gram_inner(a: Tensor, b: Tensor) -> Tensor:
    """<a a^T, b b^T> = ||a^T b||_F^2 as a 0-d float32 tensor (kernels/barlow.py)."""
    _, impl = _dispatch.implementation("barlow", a, b)
    return impl.gram_inner(a, b)


@gram_inner.register_fake
def _(a, b):
    return a.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastssl::gram_apply", mutates_args=())
def gram_apply(w: Tensor, x: Tensor) -> Tensor:
    """(w w^T) x in float32."""
    _, impl = _dispatch.implementation("barlow", w, x)
    return impl.gram_apply(w, x)


@gram_apply.register_fake
def _(w, x):
    return torch.empty(x.shape, device=x.device, dtype=torch.float32)


def _gram_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gram_backward(ctx, grad):
    a, b = ctx.saved_tensors
    g = 2.0 * grad.float()
    d_a = (g * gram_apply(b, a)).to(a.dtype) if ctx.needs_input_grad[0] else None
    d_b = (g * gram_apply(a, b)).to(b.dtype) if ctx.needs_input_grad[1] else None
    return d_a, d_b


gram_inner.register_autograd(_gram_backward, setup_context=_gram_setup)


# ----------------------------------------------------------------------------- standardisation

@torch.library.custom_op("fastssl::standardize", mutates_args=())
def standardize(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-feature (z - mean) * rstd in float32 and stats [mean, rstd] (kernels/barlow.py)."""
    _, impl = _dispatch.implementation("barlow", z)
    return impl.standardize(z, eps)


@standardize.register_fake
def _(z, eps):
    return (torch.empty(z.shape, device=z.device, dtype=torch.float32),
            z.new_empty((2, z.shape[1]), dtype=torch.float32))


@torch.library.custom_op("fastssl::standardize_backward", mutates_args=())
def standardize_backward(z: Tensor, grad_a: Tensor, stats: Tensor) -> Tensor:
    _, impl = _dispatch.implementation("barlow", z)
    return impl.standardize_backward(z, grad_a, stats).to(z.dtype)


@standardize_backward.register_fake
def _(z, grad_a, stats):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _standardize_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(inputs[0], output[1])


def _standardize_bwd(ctx, grad_a, grad_stats):
    z, stats = ctx.saved_tensors
    return standardize_backward(z, grad_a.float().contiguous(), stats), None


standardize.register_autograd(_standardize_bwd, setup_context=_standardize_setup)
