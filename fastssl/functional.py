"""Stateless losses. Each is one call into the tiled InfoNCE op (``fastssl::infonce``).

Notation: rows r_i, columns c_j, scale s (1/temperature or CLIP's logit_scale),
logits l_ij = s * r_i . c_j, and per row i with positive column p_i:

    InfoNCE family:  loss_i = log sum_{j valid} exp(l_ij) - l_{i, p_i}
    SigLIP:          loss_i = sum_j softplus(-t_ij (l_ij + b)),  t_ij = +1 if j = p_i else -1

No n x m matrix is stored: the kernels keep per-row statistics and recompute tiles in the
backward pass (see ``fastssl.kernels.infonce`` and ``fastssl.kernels.siglip``).

Scale. Inputs of any finite magnitude are handled exactly: normalised losses divide each
row by a power of two above its max |x| before the norm; CLIP and SigLIP features large
enough for a tile product to overflow are divided by a power of two (an exact operation)
that is folded into the scale. A loss whose true value exceeds the dtype's range is
returned as inf, never NaN.

Distributed (``gather_distributed=True`` inside an initialised process group): each rank
scores its local rows against the columns gathered from every rank (with gradient, see
``fastssl.distributed``), with positives at the rank's global offset. The loss is the mean
over the local rows; batch sizes may differ between ranks, and a rank with zero rows
returns a zero loss that still takes part in the collectives of the backward pass. The
arguments are checked on every rank before the first collective (``distributed.agree``).
"""
import torch
from torch import Tensor

from fastssl import _checks, _ops, distributed
from fastssl._checks import ShapeError
from fastssl._reference import scaled_std

normalize = _ops.unit_rows  # x / max(||x||, 1e-12) per row, norm in float32, scale-safe


def check_embeddings(allow_empty=False, **named):
    """Validate 2-D floating embeddings on one device with one dtype and one shape (n, D),
    D >= 1 and n >= 1 (n = 0 too with ``allow_empty``: a rank contributing no rows)."""
    items = list(named.items())
    for name, t in items:
        _checks.floating(t, name)
        if t.dim() != 2:
            raise ShapeError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.shape[1] == 0 or (t.shape[0] == 0 and not allow_empty):
            raise ShapeError(f"{name} must be non-empty, got shape {tuple(t.shape)}")
    (n0, t0), rest = items[0], items[1:]
    for name, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{n0} is on {t0.device} but {name} is on {t.device}")
        if t.dtype != t0.dtype:
            raise ValueError(f"{n0} has dtype {t0.dtype} but {name} has {t.dtype}")
        if t.shape != t0.shape:
            raise ShapeError(f"{n0} has shape {tuple(t0.shape)} but {name} has {tuple(t.shape)}")


def check_negatives(negatives, like):
    if negatives is None:
        return
    _checks.floating(negatives, "negatives")
    if negatives.dim() != 2 or negatives.shape[1] != like.shape[1]:
        raise ShapeError(f"negatives must have shape (K, {like.shape[1]}), "
                         f"got {tuple(negatives.shape)}")
    if negatives.device != like.device:
        raise ValueError(f"negatives are on {negatives.device} but the embeddings on {like.device}")
    if negatives.requires_grad:
        raise ValueError("negatives receive no gradient; pass negatives.detach()")


def scale_tensor(value, like, name, invert):
    """A 0-d tensor in the arithmetic dtype of ``like`` (float32, or float64) from a number or
    a one-element tensor (keeping its autograd graph), checked like a number: finite, and
    non-zero when ``invert`` (a temperature). A CUDA tensor's value is not read on the host."""
    _checks.scalar(value, name, nonzero=invert)
    dtype = _ops.acc_dtype(like)
    if isinstance(value, Tensor):
        if value.device != like.device and value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the embeddings on {like.device}")
        s = value.reshape(()).to(device=like.device, dtype=dtype)
        return 1.0 / s if invert else s
    value = float(value)
    return torch.tensor(1.0 / value if invert else value, dtype=dtype, device=like.device)


def _flag(value, name):
    return int(_checks.flag(value, name))


def _rows_loss(rows, cols, scale, pos, mask=None, negatives=None, normalize=True):
    loss, _ = _ops.infonce(rows, cols, negatives, pos, mask, scale, normalize)
    return loss


def _mean(loss):
    """Mean over the local rows, summed in float64 (n per-row values: a mean that float32
    holds is returned even where a float32 sum would overflow); 0, attached to the graph,
    for a rank with no rows."""
    wide = loss.to(torch.float64)
    return wide.mean() if loss.numel() else wide.sum()


def _gathering(gather):
    """True inside an initialised group of > 1 processes when gathering was asked for."""
    return _checks.is_flag(gather) and bool(gather) and distributed.world_size() > 1


def _exponent(x):
    """e with max |x| < 2^e (a Python-free 0-d int tensor; 0 for an all-zero x)."""
    m = x.detach().abs().amax() if x.numel() else x.new_zeros(())
    _, e = torch.frexp(m.to(_ops.acc_dtype(x)))
    return torch.where((m > 0) & torch.isfinite(m), e, torch.zeros_like(e))


def _product_safe(rows, cols, scale):
    """(rows / 2^kr, cols / 2^kc, scale * 2^(kr + kc)) with the smallest k = kr + kc that
    keeps every product rows_i . cols_j finite: |r . c| <= D max|r| max|c| < 2^(er + ec + ed),
    so k = max(0, er + ec + ed - emax + 2), split evenly. Dividing by a power of two is exact
    and ``scale * 2^k`` is exactly the same logits; nothing changes unless the inputs are
    large enough for a product to overflow. float16 needs none: its largest value squared,
    times any width, fits the float32 accumulators."""
    if rows.dtype == torch.float16 or rows.shape[0] == 0 or cols.shape[0] == 0:
        return rows, cols, scale
    emax = 1024 if rows.dtype == torch.float64 else 128  # float32 accumulators: 2^128
    ed = max(int(rows.shape[1] - 1).bit_length(), 0)
    k = torch.clamp(_exponent(rows) + _exponent(cols) + (ed + 2 - emax), min=0)
    kr = k // 2
    one = torch.ones((), dtype=torch.float64, device=rows.device)
    fr, fc = torch.ldexp(one, kr), torch.ldexp(one, k - kr)
    r = rows / fr.to(rows.dtype) if rows.dtype != torch.float64 else rows / fr
    c = cols / fc.to(cols.dtype) if cols.dtype != torch.float64 else cols / fc
    return r, c, (scale.to(torch.float64) * torch.ldexp(one, k)).to(scale.dtype)


def nt_xent(z0: Tensor, z1: Tensor, temperature=0.5, gather_distributed: bool = False, *,
            _what="nt_xent", _names=("z0", "z1")) -> Tensor:
    """SimCLR's NT-Xent loss (lightly's ``NTXentLoss`` without a memory bank).

    z = [normalize(z0); normalize(z1)] (2n rows); row i is scored against all 2n rows but
    itself, its positive is its other view ((i + n) mod 2n), and the loss is the mean over
    the 2n rows of log sum_{j != i} exp(z_i.z_j / T) - z_i.z_{p_i} / T. With
    ``gather_distributed`` the columns are both views of the global batch.
    """
    active = _gathering(gather_distributed)
    named = dict(zip(_names, (z0, z1)))
    with distributed.agree(_what, active, **named) as world:
        check_embeddings(allow_empty=active, **named)
        s = scale_tensor(temperature, z0, "temperature", invert=True)
        _flag(gather_distributed, "gather_distributed")
    n = z0.shape[0]
    rows = torch.cat([z0, z1])
    i = torch.arange(n, device=z0.device)
    if active:
        g0, offsets = distributed.gather(z0, sizes=world.sizes[_names[0]])
        g1, _ = distributed.gather(z1, sizes=world.sizes[_names[1]])
        o, N = offsets[world.rank], world.total
        cols = torch.cat([g0, g1])
        pos = torch.cat([N + o + i, o + i])
        mask = torch.cat([o + i, N + o + i])
    else:
        cols = rows
        pos = torch.cat([n + i, i])
        mask = torch.cat([i, n + i])
    loss = _rows_loss(rows, cols, s, pos, mask=mask)
    return _mean(loss).to(z0.dtype)


def info_nce(query: Tensor, key: Tensor, temperature=0.1, negatives: Tensor = None,
             symmetric: bool = False, gather_distributed: bool = False) -> Tensor:
    """InfoNCE with in-batch negatives and optional extra negatives (a queue or bank).

    Row i of normalize(query) is scored against all rows of normalize(key) (its positive is
    key i) and, when given, against every row of normalize(negatives) (K x D, no gradient,
    read in place). Returns the mean over rows. ``symmetric=True`` averages this with the
    same loss with query and key exchanged (the negatives serve both directions).
    """
    active = _gathering(gather_distributed)
    with distributed.agree("info_nce", active, settings={"symmetric": symmetric},
                           query=query, key=key) as world:
        check_embeddings(allow_empty=active, query=query, key=key)
        check_negatives(negatives, query)
        s = scale_tensor(temperature, query, "temperature", invert=True)
        _flag(symmetric, "symmetric")
        _flag(gather_distributed, "gather_distributed")

    def one(rows, other, name):
        if active:
            cols, offsets = distributed.gather(other, sizes=world.sizes[name])
        else:
            cols, offsets = other, [0]
        pos = offsets[world.rank] + torch.arange(rows.shape[0], device=rows.device)
        return _mean(_rows_loss(rows, cols, s, pos, negatives=negatives))

    loss = one(query, key, "key")
    if symmetric:
        loss = (loss + one(key, query, "query")) / 2
    return loss.to(query.dtype)


def _scalar_bias(logit_bias, like):
    if logit_bias is None:
        return None
    _checks.scalar(logit_bias, "logit_bias")
    if isinstance(logit_bias, Tensor) and logit_bias.device != like.device \
            and logit_bias.device.type != "cpu":
        raise ValueError(f"logit_bias is on {logit_bias.device} but the embeddings on {like.device}")
    return logit_bias


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
              local_loss: bool = False, gather_with_grad: bool = False,
              gather_distributed: bool = False, *, _what="clip_loss", _check=None) -> Tensor:
    """CLIP's symmetric loss (open_clip's ``ClipLoss``).

    logits = logit_scale * image @ text^T (+ logit_bias); the loss is the mean of the
    image->text and text->image cross-entropies with the matching pair as the label.
    Features are used as given (open_clip's models normalise them); logit_scale is already
    exponentiated. A constant bias cancels inside each softmax, so it does not change the
    value; it is accepted for signature compatibility (checked like a scale: a finite
    number or one-element tensor) and receives a zero gradient.

    With ``gather_distributed`` (open_clip with world_size > 1): features are gathered from
    every rank, with gradient if ``gather_with_grad`` (else other ranks' features are
    constants); ``local_loss=True`` scores the local rows against the global columns
    (labels offset by the rank's position), ``local_loss=False`` computes the global loss on
    every rank.
    """
    active = _gathering(gather_distributed)
    settings = {"gather_with_grad": gather_with_grad, "local_loss": local_loss}
    with distributed.agree(_what, active, settings=settings,
                           image_features=image_features, text_features=text_features) as world:
        if _check is not None:
            _check()
        check_embeddings(allow_empty=active, image_features=image_features,
                         text_features=text_features)
        s = scale_tensor(logit_scale, image_features, "logit_scale", invert=False)
        bias = _scalar_bias(logit_bias, image_features)
        for name, v in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad),
                        ("gather_distributed", gather_distributed)):
            _flag(v, name)
    img, txt, o = image_features, text_features, 0
    if active:
        all_img, offsets = distributed.gather(img, with_grad=gather_with_grad,
                                              sizes=world.sizes["image_features"])
        all_txt, _ = distributed.gather(txt, with_grad=gather_with_grad,
                                        sizes=world.sizes["text_features"])
        if local_loss:
            o = offsets[world.rank]
        else:
            img, txt = all_img, all_txt
        cols_img, cols_txt = all_img, all_txt
    else:
        cols_img, cols_txt = img, txt

    def one(rows, cols):
        r, c, s_rc = _product_safe(rows, cols, s)
        pos = o + torch.arange(rows.shape[0], device=rows.device)
        return _mean(_rows_loss(r, c, s_rc, pos, normalize=False))

    loss = (one(img, cols_txt) + one(txt, cols_img)) / 2
    if isinstance(bias, Tensor):
        loss = loss + 0.0 * bias.to(loss.dtype).sum().to(loss.device)
    return loss.to(image_features.dtype)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                gather_distributed: bool = False, *, _what="siglip_loss", _check=None) -> Tensor:
    """SigLIP's sigmoid loss (open_clip's ``SigLipLoss``).

    logits z = logit_scale * image @ text^T + logit_bias, labels +1 on the matching pair and
    -1 elsewhere; loss = -sum_ij log sigmoid(label_ij * z_ij) / n (n local images). Features
    are used as given; logit_scale is already exponentiated; both scale and bias may be
    tensors that require grad. With ``gather_distributed`` the local images are scored
    against the text features of every rank (gathered with gradient), which is the value
    and gradient of open_clip's neighbour exchange.
    """
    active = _gathering(gather_distributed)
    with distributed.agree(_what, active, image_features=image_features,
                           text_features=text_features) as world:
        if _check is not None:
            _check()
        check_embeddings(allow_empty=active, image_features=image_features,
                         text_features=text_features)
        s = scale_tensor(logit_scale, image_features, "logit_scale", invert=False)
        b = scale_tensor(0.0 if logit_bias is None else logit_bias, image_features,
                         "logit_bias", invert=False)
        _flag(gather_distributed, "gather_distributed")
    if active:
        cols, offsets = distributed.gather(text_features, sizes=world.sizes["text_features"])
    else:
        cols, offsets = text_features, [0]
    n = image_features.shape[0]
    pos = offsets[world.rank] + torch.arange(n, device=image_features.device)
    r, c, s_rc = _product_safe(image_features, cols, s)
    loss, _ = _ops.siglip(r, c, pos, s_rc, b)
    return (loss.to(torch.float64).sum() / max(n, 1)).to(image_features.dtype)


def _info_nce_positive_only(query: Tensor, key: Tensor, negatives: Tensor, temperature) -> Tensor:
    """MoCo-style InfoNCE on normalised inputs: row i's logits are
    [q_i.k_i, q_i.n_1, ..., q_i.n_K] / T; only the own key is a positive (the other keys of
    the batch are not negatives). Mean over rows (0 for no rows).
    """
    s = scale_tensor(temperature, query, "temperature", invert=True)
    acc = s.dtype
    l_pos = (normalize(query).to(acc) * normalize(key).to(acc)).sum(1) * s
    none = torch.full((query.shape[0],), -1, device=query.device, dtype=torch.long)
    lse_neg = _rows_loss(query, key[:0], s, none, negatives=negatives)
    return _mean(torch.logaddexp(l_pos, lse_neg) - l_pos)


# ----------------------------------------------------------------------------- non-contrastive

FORMULATIONS = ("auto", "gram", "dxd")


def _check_pair_nd(z_a, z_b, what, allow_empty=False, min_rows=2):
    for name, t in (("z_a", z_a), ("z_b", z_b)):
        _checks.floating(t, name)
    if z_a.shape != z_b.shape:
        raise ShapeError(f"z_a has shape {tuple(z_a.shape)} but z_b has {tuple(z_b.shape)}")
    if z_a.dtype != z_b.dtype or z_a.device != z_b.device:
        raise ValueError(f"z_a and z_b differ in dtype or device ({z_a.dtype} on {z_a.device}, "
                         f"{z_b.dtype} on {z_b.device})")
    if z_a.dim() < 2 or z_a.shape[-1] == 0 or any(d == 0 for d in z_a.shape[1:]):
        raise ShapeError(f"{what} takes (N, D) inputs with D >= 1, got shape z_a "
                         f"{tuple(z_a.shape)}")
    if z_a.shape[0] < min_rows and not (allow_empty and z_a.shape[0] == 0):
        raise ShapeError(f"{what} needs a batch of at least {min_rows} samples in z_a, got "
                         f"{z_a.shape[0]}")


def check_formulation(formulation):
    _checks.choice(formulation, "formulation", FORMULATIONS)


def _use_gram(N, D, formulation):
    """Gram work ~8 N^2 D against the D x D formulation's ~6 N D^2 (forward + backward)."""
    check_formulation(formulation)
    return formulation == "gram" or (formulation == "auto" and 4 * N < 3 * D)


def _off_diagonal2(a, b, gram, diag_sq):
    """sum_{i != j} (a^T b)_ij^2 in the arithmetic dtype. From a^T b itself with its diagonal
    left out (the D x D product: exact however small the off-diagonal part is next to the
    diagonal, as late in Barlow Twins training), or as <a a^T, b b^T> - ``diag_sq`` by the
    N x N Gram formulation (no D x D matrix). The Gram form subtracts, but it is chosen only
    for N < 3D/4, where a^T b has rank <= N < D: then ||a^T b||_F^2 >= (tr)^2 / N, and the
    off-diagonal part is at least ~1/3 of the whole, so little is cancelled."""
    if gram:
        return _ops.gram_inner(a, b) - diag_sq
    acc = _ops.acc_dtype(a)
    c = a.to(acc).T @ b.to(acc)
    return torch.linalg.vector_norm(c.fill_diagonal_(0)).square()


def _standardize(z, eps):
    """Per-feature (z - mean) / sqrt(biased var + eps): the fused op on the local batch."""
    return _ops.standardize(z, eps)[0]


def _global_standardize(z, eps, total):
    """(z - mean) / sqrt(biased var + eps) with the global batch's statistics, scale-safe
    (the sums run on z / m, m the global max |z| per feature) and differentiable (sum
    convention); a rank with no rows contributes nothing."""
    acc = _ops.acc_dtype(z)
    zf = z.to(acc)
    local_max = zf.detach().abs().amax(0) if z.shape[0] else zf.new_zeros(z.shape[1])
    m = distributed._all_reduce_max(local_max)
    m = torch.where(m > 0, m, torch.ones_like(m))
    y = zf / m
    mean_y = distributed._all_reduce_sum(y.sum(0)) / total
    var_y = distributed._all_reduce_sum((y - mean_y).square().sum(0)) / total
    return (y - mean_y) * (m / scaled_std(var_y, m, eps))


def barlow_twins(z_a: Tensor, z_b: Tensor, lambda_param: float = 5e-3,
                 gather_distributed: bool = False, normalize: str = "local",
                 formulation: str = "auto") -> Tensor:
    """Barlow Twins: sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2.

    A, B are the views standardised per feature (mean, biased variance, eps 1e-5, as
    ``batch_norm`` in training mode) and C = A^T B / N. Computed as
    sum_i (1 - C_ii)^2 + lambda (||C||_F^2 - sum_i C_ii^2) with ||C||_F^2 = <AA^T, BB^T> / N^2
    (``formulation="gram"``, O(N^2 D), no D x D matrix) or from C itself with its diagonal
    left out (``"dxd"``);
    ``"auto"`` picks the cheaper one from the shapes.

    Distributed (``gather_distributed`` in a process group): ``normalize="local"`` is
    lightly's semantics (per-rank standardisation, C averaged over ranks by an autograd-aware
    all_reduce; every rank needs at least 2 samples); ``normalize="global"`` is the reference
    implementation's (statistics of the global batch, as SyncBatchNorm gives, and C over the
    global batch; a rank may hold no samples). Both use the D x D formulation. Inputs are
    (N, D); the loss is float32 math (float64 for float64) returned in the input dtype.
    """
    active = _gathering(gather_distributed)
    with distributed.agree("barlow_twins", active, min_total=2,
                           min_each=2 if normalize == "local" else 0,
                           settings={"normalize": (normalize, ("local", "global"))},
                           z_a=z_a, z_b=z_b) as world:
        _check_pair_nd(z_a, z_b, "barlow_twins", allow_empty=active and normalize == "global")
        if z_a.dim() != 2:
            raise ShapeError(f"barlow_twins takes (N, D) inputs, got shape z_a {tuple(z_a.shape)}")
        _checks.choice(normalize, "normalize", ("local", "global"))
        check_formulation(formulation)
        lambda_param = _checks.number(lambda_param, "lambda_param")
        _flag(gather_distributed, "gather_distributed")
    N, D = z_a.shape
    eps = 1e-5
    if active:
        if normalize == "global":
            a = _global_standardize(z_a, eps, world.total)
            b = _global_standardize(z_b, eps, world.total)
            c = distributed._all_reduce_sum(a.T @ b) / world.total
        else:
            a, b = _standardize(z_a, eps), _standardize(z_b, eps)
            c = distributed._all_reduce_sum(a.T @ b / N) / world.world
        diag = torch.diagonal(c)
        off2 = torch.linalg.vector_norm(c - torch.diag_embed(diag)).square()
    else:
        gram = _use_gram(N, D, formulation)
        a32, b32 = _standardize(z_a, eps), _standardize(z_b, eps)
        a, b = a32.to(z_a.dtype), b32.to(z_b.dtype)  # matmul operands (16-bit stay 16-bit)
        # The Gram form's diagonal comes from the same rounded operands as its <AA^T, BB^T>;
        # the diagonal term uses the float32 views.
        acc = a32.dtype
        diag = torch.linalg.vecdot(a32, b32, dim=0) / N
        diag_sq = (diag if a is a32 else
                   torch.linalg.vecdot(a.to(acc), b.to(acc), dim=0) / N).square().sum()
        off2 = _off_diagonal2(a, b, gram, diag_sq * (N * N)) / (N * N)
    loss = (1 - diag).square().sum() + lambda_param * off2
    return loss.to(z_a.dtype)


def _cov_loss(x, gram):
    """sum_{i != j} cov_ij^2 / D with cov = X^T X / (N - 1), X centred; x is (N, D).

    Computed on x / f (f a power of two above max |x|, exact) and scaled back by f^4, so an
    overflow can only come from a value that is itself beyond the dtype's range (inf)."""
    N, D = x.shape
    acc = _ops.acc_dtype(x)
    f = _ops.pow2_bound(x)
    y = x.to(acc) / f
    yc = (y - y.mean(0)).to(x.dtype)  # one rounding, shared by both terms
    diag = yc.to(acc).square().sum(0)
    term = _off_diagonal2(yc, yc, gram, diag.square().sum()) / ((N - 1) ** 2) / D
    f2 = f * f
    return torch.where(term == 0, term, term * f2 * f2)


def _mse(a, b):
    """mean((a - b)^2), scale-safe (on (a - b) / f, f a power of two above its max)."""
    acc = _ops.acc_dtype(a)
    d = a.to(acc) - b.to(acc)
    if d.numel() == 0:
        return d.sum()
    f = _ops.pow2_bound(d)
    return (d / f).square().mean() * f * f


def _var_loss(z, eps):
    """mean_d relu(1 - sqrt(Var_unbiased(z_d) + eps)), scale-safe per feature."""
    acc = _ops.acc_dtype(z)
    f = _ops.pow2_bound(z, 0)
    y = z.to(acc) / f
    var_y = y.var(0, keepdim=True)
    return torch.relu(1.0 - scaled_std(var_y, f, eps)).mean()


def vicreg(z_a: Tensor, z_b: Tensor, lambda_param: float = 25.0, mu_param: float = 25.0,
           nu_param: float = 1.0, eps: float = 1e-4, gather_distributed: bool = False,
           formulation: str = "auto") -> Tensor:
    """VICReg: lambda * MSE(z_a, z_b) + mu * (var(z_a) + var(z_b)) / 2 + nu * (cov(z_a) + cov(z_b)).

    var(z) = mean_d relu(1 - sqrt(Var_unbiased(z_d) + eps)); cov(z) = sum_{i != j} cov_ij^2 / D
    with cov normalised by N - 1, computed as (||cov||_F^2 - sum_i cov_ii^2) / D where
    ||X^T X||_F^2 = <X X^T, X X^T> (Gram formulation when N < D). Inputs (N, D) or
    (N, L, D) (terms averaged over L, as lightly). With ``gather_distributed`` the variance
    and covariance terms use the global batch (gathered with gradient); the invariance term
    stays local (0 on a rank with no rows). A term whose weight is 0 is left out.
    """
    active = _gathering(gather_distributed)
    with distributed.agree("vicreg", active, min_total=2, z_a=z_a, z_b=z_b) as world:
        _check_pair_nd(z_a, z_b, "vicreg", allow_empty=active)
        weights = [_checks.number(v, name) for name, v in (
            ("lambda_param", lambda_param), ("mu_param", mu_param), ("nu_param", nu_param))]
        eps = _checks.number(eps, "eps", lo=0.0)
        check_formulation(formulation)
        _flag(gather_distributed, "gather_distributed")
    inv = _mse(z_a, z_b)
    if active:
        shape = z_a.shape
        sizes = world.sizes["z_a"]
        z_a = distributed.gather(z_a.flatten(1), sizes=sizes)[0].reshape(-1, *shape[1:])
        z_b = distributed.gather(z_b.flatten(1), sizes=sizes)[0].reshape(-1, *shape[1:])

    def cov_loss(z):
        flat = z.reshape(z.shape[0], -1, z.shape[-1]).transpose(0, 1)  # (L, N, D)
        gram = _use_gram(z.shape[0], z.shape[-1], formulation) and not active
        return torch.stack([_cov_loss(x, gram) for x in flat.unbind(0)]).mean()

    terms = [(weights[0], lambda: inv),
             (weights[1], lambda: 0.5 * (_var_loss(z_a, eps) + _var_loss(z_b, eps))),
             (weights[2], lambda: cov_loss(z_a) + cov_loss(z_b))]
    loss = sum(w * term() for w, term in terms if w != 0)
    if not isinstance(loss, Tensor):  # every weight 0: a zero attached to the graph
        loss = (z_a.to(inv.dtype) * 0).sum()
    return loss.to(z_a.dtype)


def negative_cosine_similarity(x0: Tensor, x1: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """-mean cosine_similarity(x0, x1) along ``dim`` (BYOL / SimSiam; stop-gradient is the
    caller's, e.g. ``x1.detach()``): x0 . x1 / (max(||x0||, eps) max(||x1||, eps)), scale-safe
    (each vector divided by a power of two above its max |x| first), returned in the input
    dtype. The products, norms and the mean are formed in float64 whatever the input dtype:
    the mean of cosines of unrelated vectors nearly cancels, and float32 sums would carry
    their rounding into it (an (n, D) elementwise pass; the cost is the inputs' size)."""
    _checks.floating(x0, "x0")
    _checks.floating(x1, "x1")
    if x0.shape != x1.shape:
        raise ShapeError(f"x0 has shape {tuple(x0.shape)} but x1 has {tuple(x1.shape)}")
    if x0.dtype != x1.dtype or x0.device != x1.device:
        raise ValueError(f"x0 and x1 differ in dtype or device ({x0.dtype} on {x0.device}, "
                         f"{x1.dtype} on {x1.device})")
    dim = _checks.integer(dim, "dim")
    if not -x0.dim() <= dim < max(x0.dim(), 1):
        raise ValueError(f"dim must be in [{-x0.dim()}, {x0.dim() - 1}] for inputs of shape "
                         f"{tuple(x0.shape)}, got {dim}")
    eps = _checks.number(eps, "eps", lo=0.0)
    if x0.numel() == 0:
        raise ShapeError(f"x0 must be non-empty, got shape {tuple(x0.shape)}")
    acc = torch.float64
    f0, f1 = _ops.pow2_bound(x0, dim).to(acc), _ops.pow2_bound(x1, dim).to(acc)
    y0, y1 = x0.to(acc) / f0, x1.to(acc) / f1
    n0 = torch.linalg.vector_norm(y0, dim=dim, keepdim=True)
    n1 = torch.linalg.vector_norm(y1, dim=dim, keepdim=True)
    cos = (y0 * y1).sum(dim, keepdim=True) / (torch.maximum(n0, eps / f0)
                                              * torch.maximum(n1, eps / f1))
    return -cos.mean().to(x0.dtype)
