"""Colorization (Zhang et al.): sRGB <-> CIE L*a*b*, the ab bins, soft encoding, class
rebalancing, annealed-mean decoding and the rebalanced cross-entropy; see
``fastssl.pretext``."""
import functools

import torch

from fastssl import _checks


# ----------------------------------------------------------------------------- colorization
#
# Zhang et al.'s "Colorful Image Colorization": predict an image's a*b* from its L* as a
# distribution over quantised ab bins. The colour constants are kornia's and scikit-image's
# (``fastssl.pretext``); the bins are fastssl's own, derived from the sRGB gamut.

# sRGB primaries (ITU-R BT.709) to CIE XYZ, and the D65 white of the 2-degree observer
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_D65 = (0.95047, 1.0, 1.08883)
_SRGB_KNEE, _SRGB_SLOPE = 0.04045, 12.92   # the sRGB curve: linear below the knee
_LAB_EPS, _LAB_SLOPE = 0.008856, 7.787     # CIE f(t): t^(1/3) above eps, else slope t + 4/29
# With these rounded constants the two branches of each forward curve do not quite meet at
# the knee: they leave a gap of ~2e-9 (sRGB) and ~3e-7 (Lab) that no input reaches. The
# inverses switch branch in the middle of the gap, so that a round trip is exact to float
# rounding (kornia and scikit-image switch at the rounded 0.0031308 and 0.2068966, inside
# the range of one branch: they invert a sliver of colours with the other one).
_LINEAR_KNEE = (_SRGB_KNEE / _SRGB_SLOPE + ((_SRGB_KNEE + 0.055) / 1.055) ** 2.4) / 2
_F_KNEE = (_LAB_SLOPE * _LAB_EPS + 4 / 29 + _LAB_EPS ** (1 / 3)) / 2

# fastssl's ab bins: the points of the grid of 10 (in a*b* units) to which the a*b* of at
# least one of the 2^24 8-bit sRGB colours rounds (tests/test_colorization.py recomputes
# them): a -> (lowest b, highest b), every multiple of 10 between the two. 261 bins.
AB_GRID = 10
_AB_ROWS = {-90: (80, 80), -80: (40, 80), -70: (20, 90), -60: (0, 90), -50: (-20, 90),
            -40: (-30, 90), -30: (-40, 90), -20: (-40, 90), -10: (-50, 90), 0: (-60, 90),
            10: (-70, 80), 20: (-70, 80), 30: (-80, 80), 40: (-90, 80), 50: (-90, 70),
            60: (-100, 70), 70: (-110, 70), 80: (-110, 70), 90: (-90, 0), 100: (-70, -50)}


def _colour_input(x, name):
    """A (N, 3, H, W) float32 or float64 batch: uint8 scaled to [0, 1], float16 and bfloat16
    computed in float32; other dtypes refused."""
    _checks.tensor(x, name)
    if x.dim() != 4 or x.shape[1] != 3:
        raise _checks.ShapeError(f"{name} must be a (N, 3, H, W) batch, got shape "
                                 f"{tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255
    if not x.is_floating_point():
        raise ValueError(f"{name} must be uint8 or floating, got {x.dtype}")
    return _real(x)


def _real(x):
    """float64 stays float64, every other dtype is computed in float32."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _reads_values(*tensors):
    """Whether value checks that read the host run (not on meta tensors, not in tracing)."""
    return _checks.has_values(*tensors) and not torch.compiler.is_compiling()


def _finite(x, name):
    if _reads_values(x) and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite (it holds NaN or infinity)")
    return x


def _mix(m, x):
    """The 3 x 3 matrix m applied to every pixel's channels of x (N, 3, H, W)."""
    return torch.einsum("ij,njhw->nihw", torch.tensor(m, dtype=x.dtype, device=x.device), x)


def rgb_to_lab(images):
    """sRGB (N, 3, H, W) in [0, 1] (uint8: 0..255) -> CIE L*a*b* (N, 3, H, W), float32
    (float64 stays float64), on the images' device.

    Per pixel, with kornia's and scikit-image's constants (``fastssl.pretext``):
    linear c = ((c + 0.055) / 1.055)^2.4 above 0.04045, c / 12.92 below; (X, Y, Z) = M (r, g,
    b) divided by the D65 white (0.95047, 1, 1.08883); f(t) = t^(1/3) above 0.008856,
    7.787 t + 4/29 below; L = 116 f(Y) - 16, a = 500 (f(X) - f(Y)), b = 200 (f(Y) - f(Z)).
    L lies in [0, 100]; a, b of sRGB colours in about [-86, 98] and [-108, 95]."""
    x = _colour_input(images, "images")
    if _reads_values(x) and not bool(((x >= 0) & (x <= 1)).all()):
        raise ValueError("images must hold sRGB values in [0, 1] (uint8: 0..255); clamp them "
                         "first (NaN is refused too)")
    lin = torch.where(x > _SRGB_KNEE, ((x.clamp_min(_SRGB_KNEE) + 0.055) / 1.055) ** 2.4,
                      x / _SRGB_SLOPE)
    m = [[v / w for v in row] for row, w in zip(_XYZ_FROM_RGB, _D65)]
    t = _mix(m, lin)
    f = torch.where(t > _LAB_EPS, t.clamp_min(_LAB_EPS) ** (1 / 3), _LAB_SLOPE * t + 4 / 29)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 1)


@functools.lru_cache(maxsize=1)
def _rgb_from_xyz():
    """The inverse of the sRGB matrix (float64), times the white: normalised XYZ -> linear
    RGB."""
    inv = torch.linalg.inv(torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64))
    return tuple(tuple(float(v) * w for v, w in zip(row, _D65)) for row in inv)


def lab_to_rgb(lab, clip=True):
    """CIE L*a*b* (N, 3, H, W) -> sRGB (N, 3, H, W), float32 (float64 stays float64): the
    inverse of ``rgb_to_lab``, exact to float rounding on its outputs.

    f(Y) = (L + 16) / 116, f(X) = f(Y) + a / 500, f(Z) = max(f(Y) - b / 200, 0) (as kornia and
    scikit-image clamp it); t = f^3 above 0.2068929 (the middle of the gap between
    7.787 x 0.008856 + 4/29 and 0.008856^(1/3)), (f - 4/29) / 7.787 below; linear RGB =
    M^-1 (t x white); sRGB c = 1.055 c^(1/2.4) - 0.055 above 0.0031308061 (likewise), 12.92 c
    below. An a*b* outside the gamut gives values outside [0, 1]: ``clip`` (the default,
    kornia's) clamps them."""
    lab = _colour_input(lab, "lab")
    _finite(lab, "lab")
    clip = _checks.flag(clip, "clip")
    L, a, b = lab.unbind(1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, (fy - b / 200).clamp_min(0)], 1)
    t = torch.where(f > _F_KNEE, f ** 3, (f - 4 / 29) / _LAB_SLOPE)
    lin = _mix(_rgb_from_xyz(), t)
    rgb = torch.where(lin > _LINEAR_KNEE, 1.055 * lin.clamp_min(_LINEAR_KNEE) ** (1 / 2.4)
                      - 0.055, _SRGB_SLOPE * lin)
    return rgb.clamp(0, 1) if clip else rgb


def ab_bins(dtype=torch.float32, device=None):
    """(Q, 2) the centres (a, b) of fastssl's Q = 261 ab bins (``_AB_ROWS``), a-major, b
    ascending. Zhang et al. keep 313 bins of the same grid (their data file, not derived
    in the paper); 261 are all that the 8-bit sRGB colours reach by rounding."""
    rows = [(a, b) for a, (lo, hi) in _AB_ROWS.items() for b in range(lo, hi + 1, AB_GRID)]
    return torch.tensor(rows, dtype=dtype, device=device)


def _points(ab, name="ab"):
    """(N, 2, H, W) -> (N H W, 2) pixels, as float32 or float64, checked finite."""
    _checks.floating(ab, name)
    if ab.dim() != 4 or ab.shape[1] != 2:
        raise _checks.ShapeError(f"{name} must be (N, 2, H, W), got shape {tuple(ab.shape)}")
    _finite(ab, name)
    return _real(ab).permute(0, 2, 3, 1).reshape(-1, 2)


def _bin_set(bins, points, k=1):
    _checks.floating(bins, "bins")
    if bins.dim() != 2 or bins.shape[1] != 2 or bins.shape[0] < k:
        raise _checks.ShapeError(f"bins must be (Q >= {k}, 2) centres, got shape "
                                 f"{tuple(bins.shape)}")
    if bins.device != points.device:
        raise ValueError(f"bins are on {bins.device} but ab on {points.device}")
    return _finite(bins, "bins").to(points.dtype)


def _nearest(points, bins, k, chunk=1 << 21):
    """The k nearest bins of every point: (squared distances, indices), (P, k) each, nearest
    first; distances to all Q bins, ``chunk`` // Q points at a time."""
    step = max(1, chunk // bins.shape[0])
    out = [((p[:, None, :] - bins).pow(2).sum(-1)).topk(k, 1, largest=False)
           for p in points.split(step)] if len(points) else []
    if not out:
        empty = points.new_zeros(0, k)
        return empty, empty.long()
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


def _grid(x, ab, k):
    """(P, k) -> (N, k, H, W) on ab's grid."""
    n, _, h, w = ab.shape
    return x.reshape(n, h, w, k).permute(0, 3, 1, 2)


def nearest_bin(ab, bins):
    """(N, H, W) int64: the index of the bin centre nearest to each pixel's (a, b)."""
    p = _points(ab)
    with torch.no_grad():
        _, idx = _nearest(p, _bin_set(bins, p), 1)
    return _grid(idx, ab, 1)[:, 0]


def soft_encode(ab, bins, k=5, sigma=5.0):
    """Zhang et al.'s soft encoding of ab (N, 2, H, W) on ``bins`` (Q, 2): each pixel's
    ``k`` nearest bin centres c_j (nearest first) with weights
    exp(-||ab - c_j||^2 / 2 sigma^2) normalised to sum 1. Returns (indices (N, k, H, W)
    int64, weights (N, k, H, W) in ab's dtype, float32 at least); O(N H W k) memory."""
    k = _checks.integer(k, "k", lo=1)
    sigma = _checks.number(sigma, "sigma", lo=0.0, lo_open=True)
    p = _points(ab)
    with torch.no_grad():
        d2, idx = _nearest(p, _bin_set(bins, p, k), k)
        weight = torch.softmax(-d2 / (2 * sigma ** 2), 1)
    return _grid(idx, ab, k), _grid(weight, ab, k)


def _vector(v, name, q):
    _checks.floating(v, name)
    if v.shape != (q,):
        raise _checks.ShapeError(f"{name} must be ({q},), one value per bin, got shape "
                                 f"{tuple(v.shape)}")
    if _reads_values(v) and not bool((torch.isfinite(v) & (v >= 0)).all()):
        raise ValueError(f"{name} must be finite and >= 0")
    return v


def rebalance_weights(prior, bins, lam=0.5, sigma=5.0):
    """Zhang et al.'s class rebalancing: (Q,) weights w from the empirical bin prior p (Q,)
    (shares or counts of the bins over a set of images, floating; normalised here).

    p~ = the prior smoothed by a Gaussian of ``sigma`` (ab units) over the bin centres,
    p~_q proportional to sum_r p_r exp(-||c_q - c_r||^2 / 2 sigma^2), renormalised to sum 1;
    w_q proportional to ((1 - lam) p~_q + lam / Q)^-1, scaled so that sum_q p~_q w_q = 1
    (E_p~[w] = 1). ``lam`` (the paper's lambda, the brief's gamma) = 0.5. Float64 inside,
    returned in the prior's dtype."""
    _checks.floating(bins, "bins")
    q = bins.shape[0] if bins.dim() == 2 and bins.shape[1] == 2 else -1
    if q < 1:
        raise _checks.ShapeError(f"bins must be (Q, 2) centres, got shape {tuple(bins.shape)}")
    _vector(prior, "prior", q)
    lam = _checks.number(lam, "lam", lo=0.0, hi=1.0, lo_open=True)
    sigma = _checks.number(sigma, "sigma", lo=0.0, lo_open=True)
    p = prior.double()
    total = p.sum()
    if _reads_values(total) and float(total) == 0:
        raise ValueError("prior must have some mass (all its entries are 0)")
    c = bins.to(device=p.device, dtype=torch.float64)
    kernel = torch.exp(-(c[:, None] - c[None]).pow(2).sum(-1) / (2 * sigma ** 2))
    smooth = kernel @ (p / total)
    smooth = smooth / smooth.sum()
    w = 1 / ((1 - lam) * smooth + lam / q)
    return (w / (smooth * w).sum()).to(prior.dtype)


def annealed_mean(scores, bins, temperature=0.38, probabilities=False):
    """Zhang et al.'s decoding: ab (N, 2, H, W) = sum_q f_q c_q with
    f = softmax(log p / T) over the Q bins, the annealed mean of the predicted distribution
    p (T = 1: the mean, T -> 0: the mode). ``scores`` (N, Q, H, W): logits (p = softmax(z),
    so f = softmax(z / T)), or with ``probabilities`` the distributions themselves (>= 0)."""
    _checks.floating(scores, "scores")
    _checks.floating(bins, "bins")
    if scores.dim() != 4 or bins.dim() != 2 or bins.shape != (scores.shape[1], 2):
        raise _checks.ShapeError(f"scores must be (N, Q, H, W) and bins (Q, 2), got "
                                 f"{tuple(scores.shape)} and {tuple(bins.shape)}")
    temperature = _checks.number(temperature, "temperature", lo=0.0, lo_open=True)
    probabilities = _checks.flag(probabilities, "probabilities")
    z = _real(scores)
    if probabilities:
        if _reads_values(z) and not bool((torch.isfinite(z) & (z >= 0)).all()):
            raise ValueError("probabilities must be finite and >= 0")
        z = z.log()
    f = torch.softmax(z / temperature, 1)
    return torch.einsum("nqhw,qc->nchw", f, bins.to(f))


def colorization_loss(logits, ab, bins, weights=None, k=5, sigma=5.0):
    """Zhang et al.'s multinomial cross-entropy with class rebalancing, mean over pixels.

    ``logits`` (N, Q, H, W) over the bins ``bins`` (Q, 2); ``ab`` (N, 2, H, W) the targets;
    ``weights`` (Q,) from ``rebalance_weights`` (None: 1). With q_pj and t_pj the ``k``
    nearest bins of pixel p's ab and their soft-encoding weights (``soft_encode``) and
    v_p = weights[q_p1] (its nearest bin's):

        loss = 1/P sum_p v_p (logsumexp_q z_pq - sum_j t_pj z_p,q_pj)
             = -1/P sum_p v_p sum_q Z_pq log softmax(z_p)_q,

    Z the (N, Q, H, W) soft target, which is never built: only the k indices and weights
    per pixel are (O(N H W k)). Computed in float32 (float64 logits: float64), returned in
    the logits' dtype."""
    _checks.floating(logits, "logits")
    if logits.dim() != 4:
        raise _checks.ShapeError(f"logits must be (N, Q, H, W), got shape "
                                 f"{tuple(logits.shape)}")
    n, q, h, w = logits.shape
    _checks.tensor(ab, "ab")
    if ab.device != logits.device:
        raise ValueError(f"ab is on {ab.device} but the logits on {logits.device}")
    if ab.shape != (n, 2, h, w):
        raise _checks.ShapeError(f"ab must be (N, 2, H, W) = ({n}, 2, {h}, {w}) like the "
                                 f"logits, got {tuple(ab.shape)}")
    if _checks.tensor(bins, "bins").shape != (q, 2):
        raise _checks.ShapeError(f"bins must be (Q, 2) = ({q}, 2), one per logit, got "
                                 f"{tuple(bins.shape)}")
    idx, t = soft_encode(ab, bins, k, sigma)
    z = _real(logits)
    loss = torch.logsumexp(z, 1) - (z.gather(1, idx) * t.to(z.dtype)).sum(1)
    if weights is not None:
        _vector(weights, "weights", q)
        loss = loss * weights.to(device=z.device, dtype=z.dtype)[idx[:, 0]]
    return (loss.sum() / max(loss.numel(), 1)).to(logits.dtype)
