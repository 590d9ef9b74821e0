"""torch.library custom ops over the kernels: schema, fake (meta) and autograd registrations.

``fastssl::infonce`` returns the per-row loss (differentiable) and per-row statistics
(mx, ll, ex, px; not differentiable; see ``fastssl.kernels.infonce``). With
``normalize=True`` rows, columns and negatives are L2-normalised first
(x / max(||x||, 1e-12), the norm scale-safe in float32). Its autograd formula calls
``fastssl::infonce_backward`` for the embeddings (gradients accumulate in float32 and pass
through the normalisation's Jacobian in float32 before the final cast) and takes the scale
gradient from the saved statistics: d loss_i / d s = ex_i - px_i. float64 inputs compute
in float64 throughout (the portable path).
"""
from typing import Optional

import torch
from torch import Tensor

from fastssl import _dispatch

NORM_EPS = 1e-12  # applied to a float32 norm, so it survives fp16/bf16 inputs


class _Op:
    """One fastssl op: ``impl`` registered as the custom op ``name`` (schema from its
    annotations, ``fake``, and autograd from ``setup``/``backward``) for tracers and shape
    inference, and called directly in eager mode under an autograd.Function with the same
    ``setup``/``backward``. The two give the same values and gradients (tests/test_ops.py);
    the eager call skips the custom-op dispatch, whose first use imports torch._dynamo (and
    Triton), about a second.

    The choice is made here, once for every op: a call that can only infer shapes
    (``_dispatch.shape_only``: meta tensors, a tracer's fake or functional tensors, a
    dispatch mode, torch.compile) takes the custom op, so the graph holds it and a meta call
    runs ``fake`` (outputs of the right shape and dtype, no kernel, no value read), and its
    backward the registered autograd formula, whose ops are ``_Op`` calls again."""

    def __init__(self, name, impl, fake, setup=None, backward=None, eager_forward=None):
        self.custom = torch.library.custom_op(name, mutates_args=())(impl)
        self.custom.register_fake(fake)
        self.eager = impl
        if backward is not None:
            self.custom.register_autograd(backward, setup_context=setup)
            # ``eager_forward(ctx, *args)`` (optional) may keep intermediates on ctx that
            # ``backward`` uses when present (a traced graph has none and recomputes).
            methods = ({"forward": staticmethod(eager_forward)} if eager_forward else
                       {"forward": staticmethod(impl), "setup_context": staticmethod(setup)})
            self.eager = type(name.split("::")[1], (torch.autograd.Function,), {
                **methods, "backward": staticmethod(backward)}).apply
        self.__doc__ = impl.__doc__

    def __call__(self, *args):
        return self.custom(*args) if _dispatch.shape_only(args) else self.eager(*args)


def acc_dtype(x: Tensor) -> torch.dtype:
    """The arithmetic dtype for an input: float64 stays float64, the rest computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def pow2_bound(x: Tensor, dim=None) -> Tensor:
    """The smallest power of two above max |x| (over ``dim``, kept), 1 where x is all zero;
    detached, in the arithmetic dtype. Dividing by it is exact (no rounding) and brings
    every value into (-1, 1), so later squares and products cannot overflow."""
    xa = x.detach().to(acc_dtype(x)).abs()
    if xa.numel() == 0:
        shape = () if dim is None else tuple(1 if d == dim % x.dim() else s
                                             for d, s in enumerate(x.shape))
        return xa.new_ones(shape)
    m = xa.amax() if dim is None else xa.amax(dim, keepdim=True)
    _, e = torch.frexp(m)  # m = f * 2^e, 0.5 <= f < 1
    one = torch.ones_like(m)
    return torch.where((m > 0) & torch.isfinite(m), torch.ldexp(one, e), one)


def _row_scaled(x: Tensor):
    """(x / m, m, ||x / m||) per row in the arithmetic dtype, m = ``pow2_bound`` of the row.
    ||x|| = m * ||x / m|| never overflows in the squares, whatever x's scale."""
    m = pow2_bound(x, 1)
    y = x.to(m.dtype) / m
    return y, m, torch.linalg.vector_norm(y, dim=1, keepdim=True)


def row_norms(x: Tensor) -> Tensor:
    """||x_i|| per row (n, 1), scale-safe; inf only where the norm exceeds the dtype's range."""
    _, m, ny = _row_scaled(x)
    return m * ny


def _unit_rows(x: Tensor) -> Tensor:
    y, m, ny = _row_scaled(x)
    alive = m * ny >= NORM_EPS  # ||x|| >= eps: the exact direction y / ||y||
    u = torch.where(alive, y / torch.where(ny > 0, ny, torch.ones_like(ny)), y * (m / NORM_EPS))
    return u.to(x.dtype)


def unit_rows_backward(x: Tensor, d_unit: Tensor) -> Tensor:
    """Gradient through ``unit_rows`` in the arithmetic dtype: (I - u u^T) d / ||x||.

    A row whose norm is at most 1e-12 (a zero embedding) gets a zero gradient instead of
    d / 1e-12, which would overflow 16-bit gradients and wreck the step.
    """
    y, m, ny = _row_scaled(x)
    norm = m * ny
    alive = norm > NORM_EPS
    u = y / torch.where(ny > 0, ny, torch.ones_like(ny))
    d = d_unit.to(y.dtype)
    grad = (d - u * (u * d).sum(1, keepdim=True)) / torch.where(alive, norm, torch.ones_like(norm))
    return torch.where(alive, grad, torch.zeros_like(grad))


class _UnitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _unit_rows(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return unit_rows_backward(x, grad).to(x.dtype)


def unit_rows(x: Tensor) -> Tensor:
    """x / max(||x||, 1e-12) per row: the norm in float32 (float64 for float64 input) and
    scale-safe (rows are divided by their max |x| first, so |x| near the dtype's largest
    value still gives the exact direction); zero rows stay zero and get a zero gradient."""
    return _UnitRows.apply(x)


def _inputs(rows, cols, negatives, normalize):
    if not normalize:
        return rows, cols, None
    w = None
    if negatives is not None:
        w = 1.0 / row_norms(negatives)[:, 0].clamp_min(NORM_EPS)
    return _unit_rows(rows), _unit_rows(cols), w


def _stats_like(rows, k):
    return rows.new_empty((k, rows.shape[0]) if k else rows.shape[0], dtype=acc_dtype(rows))


def _infonce(rows: Tensor, cols: Tensor, negatives: Optional[Tensor], pos_idx: Tensor,
             mask_idx: Optional[Tensor], scale: Tensor, normalize: bool,
             keys: Optional[Tensor] = None, key_mode: int = 0) -> tuple[Tensor, Tensor]:
    _, impl = _dispatch.implementation("infonce", rows, cols, negatives)
    r, c, w = _inputs(rows, cols, negatives, normalize)
    return impl.forward(r, c, negatives, w, pos_idx, mask_idx, scale, keys=keys,
                        key_mode=key_mode)


def _infonce_fake(rows, cols, negatives, pos_idx, mask_idx, scale, normalize, keys=None,
                  key_mode=0):
    return _stats_like(rows, 0), _stats_like(rows, 4)


def _infonce_backward(rows: Tensor, cols: Tensor, negatives: Optional[Tensor], pos_idx: Tensor,
                      mask_idx: Optional[Tensor], scale: Tensor, stats: Tensor, grad: Tensor,
                      normalize: bool, need_rows: bool, need_cols: bool,
                      keys: Optional[Tensor] = None, key_mode: int = 0
                      ) -> tuple[Tensor, Tensor]:
    _, impl = _dispatch.implementation("infonce", rows, cols, negatives)
    r, c, w = _inputs(rows, cols, negatives, normalize)
    d_r, d_c = impl.backward(r, c, negatives, w, pos_idx, mask_idx, scale, stats, grad,
                             need_rows, need_cols, keys=keys, key_mode=key_mode)
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


def _infonce_backward_fake(rows, cols, negatives, pos_idx, mask_idx, scale, stats, grad,
                           normalize, need_rows, need_cols, keys=None, key_mode=0):
    return _grad_like(rows, need_rows), _grad_like(cols, need_cols)


def _setup(ctx, inputs, output):
    rows, cols, negatives, pos_idx, mask_idx, scale, normalize, *keyed = inputs
    keys, key_mode = (keyed + [None, 0])[:2]
    _, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.normalize, ctx.key_mode, ctx.n_inputs = normalize, key_mode, len(inputs)
    ctx.has_neg = negatives is not None
    ctx.has_mask = mask_idx is not None
    ctx.has_keys = keys is not None
    saved = [rows, cols, pos_idx, scale, stats]
    saved += [negatives] if ctx.has_neg else []
    saved += [mask_idx] if ctx.has_mask else []
    saved += [keys] if ctx.has_keys else []
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_loss, grad_stats):
    rows, cols, pos_idx, scale, stats, *rest = ctx.saved_tensors
    negatives = rest.pop(0) if ctx.has_neg else None
    mask_idx = rest.pop(0) if ctx.has_mask else None
    keys = rest.pop(0) if ctx.has_keys else None
    need_rows, need_cols = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g = grad_loss.to(stats.dtype).contiguous()
    d_rows = d_cols = d_scale = None
    if need_rows or need_cols:
        d_rows, d_cols = infonce_backward(rows, cols, negatives, pos_idx, mask_idx, scale,
                                          stats, g, ctx.normalize, need_rows, need_cols,
                                          keys, ctx.key_mode)
    if ctx.needs_input_grad[5]:
        px = torch.where(pos_idx >= 0, stats[3], 0.0)
        d_scale = (g * (stats[2] - px)).sum().reshape(scale.shape).to(scale.dtype)
    grads = (d_rows if need_rows else None, d_cols if need_cols else None, None, None, None,
             d_scale, None, None, None)
    return grads[:ctx.n_inputs]


infonce = _Op("fastssl::infonce", _infonce, _infonce_fake, _setup, _backward)
infonce_backward = _Op("fastssl::infonce_backward", _infonce_backward, _infonce_backward_fake)


# ----------------------------------------------------------------------------- SigLIP

def _siglip(rows: Tensor, cols: Tensor, pos_idx: Tensor, scale: Tensor,
           bias: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row sigmoid loss (differentiable) and statistics [a, c] (see kernels/siglip.py)."""
    _, impl = _dispatch.implementation("siglip", rows, cols)
    return impl.forward(rows, cols, pos_idx, scale, bias)


def _siglip_fake(rows, cols, pos_idx, scale, bias):
    return _stats_like(rows, 0), _stats_like(rows, 2)


def _siglip_backward_impl(rows: Tensor, cols: Tensor, pos_idx: Tensor, scale: Tensor,
                          bias: Tensor, grad: Tensor, need_rows: bool,
                          need_cols: bool) -> tuple[Tensor, Tensor]:
    _, impl = _dispatch.implementation("siglip", rows, cols)
    d_r, d_c = impl.backward(rows, cols, pos_idx, scale, bias, grad, need_rows, need_cols)
    return (rows.new_empty(0) if d_r is None else d_r.to(rows.dtype),
            cols.new_empty(0) if d_c is None else d_c.to(cols.dtype))


def _siglip_backward_fake(rows, cols, pos_idx, scale, bias, grad, need_rows, need_cols):
    return _grad_like(rows, need_rows), _grad_like(cols, need_cols)


def _siglip_setup(ctx, inputs, output):
    rows, cols, pos_idx, scale, bias = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(rows, cols, pos_idx, scale, bias, output[1])


def _siglip_eager_forward(ctx, rows, cols, pos_idx, scale, bias):
    """Eager forward: the portable path keeps dl/dz (n x m) for the backward when that is
    small (``_reference.KEEP_PAIRS``), saving the backward's recomputation of the logits."""
    name, impl = _dispatch.implementation("siglip", rows, cols)
    ctx.pairs = None
    if name == "torch" and rows.shape[0] * cols.shape[0] <= impl.KEEP_PAIRS:
        loss, stats, ctx.pairs = impl.forward(rows, cols, pos_idx, scale, bias, keep=True)
    else:
        loss, stats = impl.forward(rows, cols, pos_idx, scale, bias)
    _siglip_setup(ctx, (rows, cols, pos_idx, scale, bias), (loss, stats))
    return loss, stats


def _siglip_backward(ctx, grad_loss, grad_stats):
    rows, cols, pos_idx, scale, bias, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    g = grad_loss.to(stats.dtype).contiguous()
    d_rows = d_cols = None
    if getattr(ctx, "pairs", None) is not None:
        d_rows, d_cols = _dispatch.implementation("siglip", rows, cols)[1].backward_kept(
            rows, cols, ctx.pairs, scale, g, need[0], need[1])
    elif need[0] or need[1]:
        d_rows, d_cols = siglip_backward(rows, cols, pos_idx, scale, bias, g, need[0], need[1])
    d_scale = (g * stats[1]).sum().reshape(scale.shape).to(scale.dtype) if need[3] else None
    d_bias = (g * stats[0]).sum().reshape(bias.shape).to(bias.dtype) if need[4] else None
    return (d_rows if need[0] else None, d_cols if need[1] else None, None, d_scale, d_bias)


siglip = _Op("fastssl::siglip", _siglip, _siglip_fake, _siglip_setup, _siglip_backward,
             _siglip_eager_forward)
siglip_backward = _Op("fastssl::siglip_backward", _siglip_backward_impl, _siglip_backward_fake)


# ----------------------------------------------------------------------------- Gram products

def _gram_inner(a: Tensor, b: Tensor) -> Tensor:
    """<a a^T, b b^T> = ||a^T b||_F^2 as a 0-d float32 (float64 for float64) tensor
    (kernels/barlow.py)."""
    _, impl = _dispatch.implementation("barlow", a, b)
    return impl.gram_inner(a, b)


def _gram_inner_fake(a, b):
    return a.new_empty((), dtype=acc_dtype(a))


def _gram_apply(w: Tensor, x: Tensor) -> Tensor:
    """(w w^T) x in float32 (float64 for float64 inputs)."""
    _, impl = _dispatch.implementation("barlow", w, x)
    return impl.gram_apply(w, x)


def _gram_apply_fake(w, x):
    return torch.empty(x.shape, device=x.device, dtype=acc_dtype(x))


def _gram_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gram_backward(ctx, grad):
    a, b = ctx.saved_tensors
    g = 2.0 * grad.to(acc_dtype(a))
    d_a = (g * gram_apply(b, a)).to(a.dtype) if ctx.needs_input_grad[0] else None
    d_b = (g * gram_apply(a, b)).to(b.dtype) if ctx.needs_input_grad[1] else None
    return d_a, d_b


gram_inner = _Op("fastssl::gram_inner", _gram_inner, _gram_inner_fake, _gram_setup, _gram_backward)
gram_apply = _Op("fastssl::gram_apply", _gram_apply, _gram_apply_fake)


# ----------------------------------------------------------------------------- standardisation

def _standardize(z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-feature (z - mean) * rstd and stats [mean, rstd] in float32 (float64 for float64
    input), scale-safe (kernels/barlow.py)."""
    _, impl = _dispatch.implementation("barlow", z)
    return impl.standardize(z, eps)


def _standardize_fake(z, eps):
    return (torch.empty(z.shape, device=z.device, dtype=acc_dtype(z)),
            z.new_empty((2, z.shape[1]), dtype=acc_dtype(z)))


def _standardize_backward(z: Tensor, grad_a: Tensor, stats: Tensor, eps: float) -> Tensor:
    _, impl = _dispatch.implementation("barlow", z)
    return impl.standardize_backward(z, grad_a, stats, eps).to(z.dtype)


def _standardize_backward_fake(z, grad_a, stats, eps):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _standardize_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(inputs[0], output[1])
    ctx.eps = inputs[1]


def _standardize_bwd(ctx, grad_a, grad_stats):
    z, stats = ctx.saved_tensors
    return standardize_backward(z, grad_a.to(stats.dtype).contiguous(), stats, ctx.eps), None


standardize = _Op("fastssl::standardize", _standardize, _standardize_fake, _standardize_setup,
                  _standardize_bwd)
standardize_backward = _Op("fastssl::standardize_backward", _standardize_backward,
                           _standardize_backward_fake)


# ----------------------------------------------------------------------------- prototype heads

def _prototype_impl(*tensors):
    return _dispatch.implementation("prototype", *tensors)[1]


def _prototype_ce(student: Tensor, prototypes: Tensor, teacher: Tensor,
                  teacher_prototypes: Tensor, center: Optional[Tensor], pair_idx: Tensor,
                  pair_weights: Tensor, student_temp: float,
                  teacher_temp: float) -> tuple[Tensor, Tensor, Tensor]:
    """sum_i sum_p pair_weights_ip CE(i, pair_idx_ip) (fastssl.prototype's docstring) and the
    row statistics st_s, st_t ((rows, 2): maximum product and log-sum, kernels/prototype.py)
    the backward reuses. Two ``rows`` passes (the log-partitions), then one ``pair_value`` pass
    forming -sum_k R_ik log P^s_ik entry by entry, log P^s = -(l + (m - x) / tau_s): the
    eager formulation's rounding, no difference of the two large terms LSE and s . q."""
    impl = _prototype_impl(student, prototypes, teacher, teacher_prototypes)
    st_t = impl.rows(teacher, teacher_prototypes, None, center, 1.0 / teacher_temp)[0]
    st_s = impl.rows(student, prototypes, None, None, 1.0 / student_temp)[0]
    per_row = impl.pair_value(student, prototypes, teacher, teacher_prototypes, center,
                              1.0 / student_temp, 1.0 / teacher_temp, st_s, st_t, pair_idx,
                              pair_weights)
    return per_row.sum(), st_s, st_t


def _prototype_ce_fake(student, prototypes, teacher, teacher_prototypes, center, pair_idx,
                       pair_weights, student_temp, teacher_temp):
    acc = acc_dtype(student)
    return (student.new_empty((), dtype=acc),
            student.new_empty(student.shape[0], 2, dtype=acc),
            student.new_empty(teacher.shape[0], 2, dtype=acc))


def _prototype_ce_backward_impl(
        student: Tensor, prototypes: Tensor, teacher: Tensor, teacher_prototypes: Tensor,
        center: Optional[Tensor], pair_idx: Tensor, pair_weights: Tensor,
        student_temp: float, teacher_temp: float, st_s: Tensor, st_t: Tensor, grad: Tensor,
        need_student: bool, need_prototypes: bool) -> tuple[Tensor, Tensor]:
    """With g = pair_weights * grad, a_i = sum_p g_ip and d_ik = a_i P^s_ik - R_ik (the
    eager formulation's entry-by-entry difference, never stored): d/d student = d W / tau_s
    and d/d prototypes = d^T S / tau_s (``pair_grad``: one pass on the portable path, a row
    and a column pass in the kernels). g and a
    are scaled by one power of two into [-1, 1] (exact) so that 16-bit tile operands keep
    their relative precision; the factor comes back with 1 / tau_s."""
    acc = st_s.dtype
    g = pair_weights.to(acc) * grad.to(acc)
    bound = pow2_bound(g)
    g = g / bound
    a = g.sum(1)
    impl = _prototype_impl(student, prototypes, teacher, teacher_prototypes)
    d_s, d_w = impl.pair_grad(student, prototypes, teacher, teacher_prototypes, center,
                              1.0 / student_temp, 1.0 / teacher_temp, st_s, st_t, pair_idx, g,
                              a, need_student, need_prototypes)
    factor = bound / student_temp
    return (student.new_empty(0) if d_s is None else d_s.mul_(factor).to(student.dtype),
            prototypes.new_empty(0) if d_w is None else d_w.mul_(factor).to(prototypes.dtype))


def _prototype_ce_backward_fake(student, prototypes, teacher, teacher_prototypes, center,
                                pair_idx, pair_weights, student_temp, teacher_temp, st_s, st_t,
                                grad, need_student, need_prototypes):
    return _grad_like(student, need_student), _grad_like(prototypes, need_prototypes)


def _prototype_ce_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(*inputs[:7], *output[1:])
    ctx.temps = inputs[7:9]


def _prototype_ce_grad(ctx, grad_loss, *unused):
    saved = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_s, d_w = prototype_ce_backward(*saved[:7], *ctx.temps, *saved[7:], grad_loss,
                                     need[0], need[1])
    return (d_s if need[0] else None, d_w if need[1] else None) + (None,) * 7


prototype_ce = _Op("fastssl::prototype_ce", _prototype_ce, _prototype_ce_fake,
                   _prototype_ce_setup, _prototype_ce_grad)
prototype_ce_backward = _Op("fastssl::prototype_ce_backward", _prototype_ce_backward_impl,
                            _prototype_ce_backward_fake)


# ----------------------------------------------------------------------------- masked patches

def _masked_impl(*tensors):
    return _dispatch.implementation("masked", *tensors)[1]


def _masked_patch(pred: Tensor, images: Tensor, weight: Tensor, prow: Tensor, patch: int,
                  norm_pix: bool, loss: str, beta: float, eps: float) -> tuple[Tensor, Tensor]:
    """Per-patch losses ell (R,) and target statistics (R, 2) (kernels/masked.py)."""
    return _masked_impl(pred, weight).forward(pred, images, weight, prow, patch, norm_pix,
                                              loss, beta, eps)


def _masked_patch_fake(pred, images, weight, prow, patch, norm_pix, loss, beta, eps):
    acc = acc_dtype(pred)
    return (pred.new_empty(weight.shape[0], dtype=acc),
            pred.new_empty(weight.shape[0], 2, dtype=acc))


def _masked_patch_backward_impl(pred: Tensor, images: Tensor, weight: Tensor, prow: Tensor,
                                patch: int, norm_pix: bool, loss: str, beta: float,
                                stats: Tensor, coef: Tensor) -> Tensor:
    return _masked_impl(pred, weight).backward(pred, images, weight, prow, patch, norm_pix,
                                               loss, beta, stats, coef)


def _masked_patch_backward_fake(pred, images, weight, prow, patch, norm_pix, loss, beta,
                                stats, coef):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _masked_patch_setup(ctx, inputs, output):
    pred, images, weight, prow, patch, norm_pix, loss, beta, eps = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(pred, images, weight, prow, output[1])
    ctx.args = (patch, norm_pix, loss, beta)


def _masked_patch_eager_forward(ctx, pred, images, weight, prow, patch, norm_pix, loss, beta,
                                eps):
    """Eager forward: the portable path keeps d ell / d pred (pred-shaped, float32 or
    float64 pred) for the backward, which then only scales it; a second backward through
    the same graph recomputes."""
    name, impl = _dispatch.implementation("masked", pred, weight)
    args = (pred, images, weight, prow, patch, norm_pix, loss, beta, eps)
    ctx.kept = None
    if name == "torch" and pred.requires_grad and pred.dtype in (torch.float32, torch.float64):
        ell, stats, ctx.kept = impl.forward(*args, keep=True)
        ctx.kept_by = impl
    else:
        ell, stats = impl.forward(*args)
    _masked_patch_setup(ctx, args, (ell, stats))
    return ell, stats


def _masked_patch_grad(ctx, grad_ell, grad_stats):
    pred, images, weight, prow, stats = ctx.saved_tensors
    d = None
    kept, ctx.kept = getattr(ctx, "kept", None), None  # the buffer serves one backward
    if ctx.needs_input_grad[0] and kept is not None:
        d = ctx.kept_by.backward_kept(kept, weight, prow, grad_ell).to(pred.dtype)
    elif ctx.needs_input_grad[0]:
        d = masked_patch_backward(pred, images, weight, prow, *ctx.args, stats,
                                  grad_ell.contiguous())
    return (d,) + (None,) * 8


masked_patch = _Op("fastssl::masked_patch", _masked_patch, _masked_patch_fake,
                   _masked_patch_setup, _masked_patch_grad, _masked_patch_eager_forward)
masked_patch_backward = _Op("fastssl::masked_patch_backward", _masked_patch_backward_impl,
                            _masked_patch_backward_fake)


# ----------------------------------------------------------------------------- latent targets

def _masked_latent(pred: Tensor, targets: Tensor, weight: Tensor, prow: Tensor, trow: Tensor,
                   loss: str, beta: float, layer_norm: bool, instance_norm: bool, scale: float,
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses ell (Q,), layer-norm statistics (Q, 2) and the instance-norm
    statistics (2, K, N, D) ((0,) without instance_norm) (kernels/masked.py)."""
    return _masked_impl(pred, weight).latent_forward(pred, targets, weight, prow, trow, loss,
                                                     beta, layer_norm, instance_norm, scale, eps)


def _masked_latent_fake(pred, targets, weight, prow, trow, loss, beta, layer_norm,
                        instance_norm, scale, eps):
    acc = acc_dtype(pred)
    K, N, _, D = targets.shape
    return (pred.new_empty(weight.shape[0], dtype=acc),
            pred.new_empty(weight.shape[0], 2, dtype=acc),
            pred.new_empty((2, K, N, D) if instance_norm else (0,), dtype=acc))


def _masked_latent_backward_impl(pred: Tensor, targets: Tensor, weight: Tensor, prow: Tensor,
                                 trow: Tensor, loss: str, beta: float, layer_norm: bool,
                                 instance_norm: bool, scale: float, stats: Tensor,
                                 inorm: Tensor, coef: Tensor) -> Tensor:
    return _masked_impl(pred, weight).latent_backward(
        pred, targets, weight, prow, trow, loss, beta, layer_norm, instance_norm, scale, stats,
        inorm, coef)


def _masked_latent_backward_fake(pred, targets, weight, prow, trow, loss, beta, layer_norm,
                                 instance_norm, scale, stats, inorm, coef):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _masked_latent_setup(ctx, inputs, output):
    pred, targets, weight, prow, trow, loss, beta, layer_norm, instance_norm, scale, _ = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(pred, targets, weight, prow, trow, output[1], output[2])
    ctx.args = (loss, beta, layer_norm, instance_norm, scale)


def _masked_latent_eager_forward(ctx, pred, targets, weight, prow, trow, loss, beta,
                                 layer_norm, instance_norm, scale, eps):
    """Eager forward: the portable path keeps d ell / d pred (float32 or float64 pred) for
    the backward, which then only scales it; a second backward recomputes."""
    name, impl = _dispatch.implementation("masked", pred, weight)
    args = (pred, targets, weight, prow, trow, loss, beta, layer_norm, instance_norm, scale,
            eps)
    ctx.kept = None
    if name == "torch" and pred.requires_grad and pred.dtype in (torch.float32, torch.float64):
        *out, ctx.kept = impl.latent_forward(*args, keep=True)
        ctx.kept_by = impl
    else:
        out = impl.latent_forward(*args)
    _masked_latent_setup(ctx, args, out)
    return tuple(out)


def _masked_latent_grad(ctx, grad_ell, grad_stats, grad_inorm):
    pred, targets, weight, prow, trow, stats, inorm = ctx.saved_tensors
    d = None
    kept, ctx.kept = getattr(ctx, "kept", None), None  # the buffer serves one backward
    if ctx.needs_input_grad[0] and kept is not None:
        d = ctx.kept_by.backward_kept(kept, weight, prow, grad_ell).to(pred.dtype)
    elif ctx.needs_input_grad[0]:
        d = masked_latent_backward(pred, targets, weight, prow, trow, *ctx.args, stats, inorm,
                                   grad_ell.contiguous())
    return (d,) + (None,) * 10


masked_latent = _Op("fastssl::masked_latent", _masked_latent, _masked_latent_fake,
                    _masked_latent_setup, _masked_latent_grad, _masked_latent_eager_forward)
masked_latent_backward = _Op("fastssl::masked_latent_backward", _masked_latent_backward_impl,
                             _masked_latent_backward_fake)


# ----------------------------------------------------------------------------- ECF sketch

def _ecf_sums(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The empirical characteristic function's sums C, S (V, M, K) of projections x
    (V, N, M) at knots t (K,) (kernels/sketch.py); float32 or float64 x and t."""
    return _dispatch.implementation("sketch", x, t)[1].forward(x, t)


def _ecf_sums_fake(x, t):
    V, _, M = x.shape
    return (x.new_empty(V, M, t.shape[0]), x.new_empty(V, M, t.shape[0]))


def _ecf_sums_backward_impl(x: Tensor, t: Tensor, grad_c: Tensor, grad_s: Tensor) -> Tensor:
    return _dispatch.implementation("sketch", x, t)[1].backward(x, t, grad_c, grad_s)


def _ecf_sums_backward_fake(x, t, grad_c, grad_s):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _ecf_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _ecf_grad(ctx, grad_c, grad_s):
    x, t = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    shape = (x.shape[0], x.shape[2], t.shape[0])
    grad_c, grad_s = (x.new_zeros(shape) if g is None else g.to(x.dtype).contiguous()
                      for g in (grad_c, grad_s))
    return ecf_sums_backward(x, t, grad_c, grad_s), None


ecf_sums = _Op("fastssl::ecf_sums", _ecf_sums, _ecf_sums_fake, _ecf_setup, _ecf_grad)
ecf_sums_backward = _Op("fastssl::ecf_sums_backward", _ecf_sums_backward_impl,
                        _ecf_sums_backward_fake)
