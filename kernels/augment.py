"""Triton kernels for per-sample augmentation (semantics in fastssl/augment.py):

- ``_resize_kernel``: crop, antialiased bilinear resize (torchvision's triangle filter and
  bounds, separable weights normalised per axis) and horizontal flip, per output row, and
  optionally the colour chain below on the resampled pixels (one kernel per view);
- ``_colour_kernel``: ColorJitter (random op order per sample), RandomGrayscale and
  RandomSolarize in one pass over each image (plus a pass for contrast's mean, below);
- ``_blur_rows_kernel`` / ``_blur_cols_kernel``: the separable reflect-padded Gaussian
  blur, the second pass also applying solarize, normalisation and the output cast.

Colour pass:

Per sample n (see fastssl/augment.py for the semantics): the four jitter ops in the order
``order[n]`` with factors ``factors[n]`` when ``jitter[n]``; then grayscale when
``gray[n]``; then solarize (x >= threshold -> 1 - x) when ``solar[n]``.

Contrast blends with the mean of the grayscale image *at that point of the chain*, so a
first launch (PHASE 0) applies the ops that precede contrast and writes per-block partial
sums of the grayscale image (summed in a fixed order on the host side: deterministic);
the second launch (PHASE 1) applies the whole chain and writes the result.
"""
import torch
import triton
import triton.language as tl

from .infonce import _interpret, _launch_opts


@triton.jit
def _gray(r, g, b):
    return 0.2989 * r + 0.587 * g + 0.114 * b


@triton.jit
def _blend(x, y, f):
    return tl.minimum(tl.maximum(f * x + (1.0 - f) * y, 0.0), 1.0)


@triton.jit
def _hue(r, g, b, f):
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / tl.where(eqc, 1.0, maxc)
    crd = tl.where(eqc, 1.0, cr)
    rc = (maxc - r) / crd
    gc = (maxc - g) / crd
    bc = (maxc - b) / crd
    hr = tl.where(maxc == r, bc - gc, 0.0)
    hg = tl.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
    hb = tl.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
    h = (hr + hg + hb) / 6.0 + 1.0
    h = h - tl.floor(h)  # fmod(h, 1) for h > 0
    h = h + f
    h = h - tl.floor(h)  # (h + f) mod 1
    v = maxc
    i6 = tl.floor(h * 6.0)
    fr = h * 6.0 - i6
    i = i6.to(tl.int32) % 6
    p = tl.minimum(tl.maximum(v * (1.0 - s), 0.0), 1.0)
    q = tl.minimum(tl.maximum(v * (1.0 - s * fr), 0.0), 1.0)
    t = tl.minimum(tl.maximum(v * (1.0 - s * (1.0 - fr)), 0.0), 1.0)
    r2 = tl.where((i == 0) | (i == 5), v, tl.where(i == 1, q, tl.where(i == 4, t, p)))
    g2 = tl.where((i == 1) | (i == 2), v, tl.where(i == 0, t, tl.where(i == 3, q, p)))
    b2 = tl.where((i == 3) | (i == 4), v, tl.where(i == 2, t, tl.where(i == 5, q, p)))
    return r2, g2, b2


@triton.jit
def _chain(r, g, b, n, ORDER, FACTORS, FLAGS, mean, threshold,
           EN_B: tl.constexpr, EN_C: tl.constexpr, EN_S: tl.constexpr, EN_H: tl.constexpr,
           PHASE: tl.constexpr):
    """The colour chain of sample n on pixel vectors r, g, b. PHASE 0 stops before contrast
    (for its mean); PHASE 1 applies everything, grayscale and solarize included."""
    jitter = tl.load(FLAGS + n * 3)
    seen_contrast = 0
    for slot in tl.static_range(4):
        op = tl.load(ORDER + n * 4 + slot)
        f = tl.load(FACTORS + n * 4 + op)
        active = jitter != 0
        if PHASE == 0:
            seen_contrast = seen_contrast | (op == 1).to(tl.int32)
            active = active & (seen_contrast == 0)
        if active:
            if op == 0:
                if EN_B:
                    r = tl.minimum(tl.maximum(r * f, 0.0), 1.0)
                    g = tl.minimum(tl.maximum(g * f, 0.0), 1.0)
                    b = tl.minimum(tl.maximum(b * f, 0.0), 1.0)
            elif op == 1:
                if EN_C:
                    r = _blend(r, mean, f)
                    g = _blend(g, mean, f)
                    b = _blend(b, mean, f)
            elif op == 2:
                if EN_S:
                    y = _gray(r, g, b)
                    r = _blend(r, y, f)
                    g = _blend(g, y, f)
                    b = _blend(b, y, f)
            else:
                if EN_H:
                    r, g, b = _hue(r, g, b, f)
    if PHASE == 1:
        if tl.load(FLAGS + n * 3 + 1) != 0:
            y = _gray(r, g, b)
            r = y
            g = y
            b = y
        if tl.load(FLAGS + n * 3 + 2) != 0:
            r = tl.where(r >= threshold, 1.0 - r, r)
            g = tl.where(g >= threshold, 1.0 - g, g)
            b = tl.where(b >= threshold, 1.0 - b, b)
    return r, g, b


@triton.jit
def _colour_kernel(X, OUT, ORDER, FACTORS, FLAGS, MEAN, PART, HW, threshold,
                   EN_B: tl.constexpr, EN_C: tl.constexpr, EN_S: tl.constexpr,
                   EN_H: tl.constexpr, PHASE: tl.constexpr, BLOCK: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = offs < HW
    base = X + n * 3 * HW
    r = tl.load(base + offs, mask=ok, other=0.0)
    g = tl.load(base + HW + offs, mask=ok, other=0.0)
    b = tl.load(base + 2 * HW + offs, mask=ok, other=0.0)
    r, g, b = _chain(r, g, b, n, ORDER, FACTORS, FLAGS, tl.load(MEAN + n), threshold,
                     EN_B, EN_C, EN_S, EN_H, PHASE)
    if PHASE == 0:
        part = tl.sum(tl.where(ok, _gray(r, g, b), 0.0), 0)
        tl.store(PART + n * tl.num_programs(1) + blk, part)
    else:
        out = OUT + n * 3 * HW
        tl.store(out + offs, r, mask=ok)
        tl.store(out + HW + offs, g, mask=ok)
        tl.store(out + 2 * HW + offs, b, mask=ok)


_CFG = dict(BLOCK=1024, num_warps=8, num_stages=1)  # 4 warps spilled 4 bytes on sm_80


def colour(x, order, factors, flags, enabled, threshold):
    """x: float32 (N, 3, H, W) contiguous in [0, 1]; order int32 (N, 4); factors float32
    (N, 4) indexed by op; flags int32 (N, 3) = (jitter, gray, solarize) per sample;
    enabled: four bools (brightness, contrast, saturation, hue)."""
    n, _, h, w = x.shape
    hw = h * w
    nblk = triton.cdiv(hw, _CFG["BLOCK"])
    x = x.contiguous()
    out = torch.empty_like(x)
    mean = torch.zeros(n, device=x.device, dtype=torch.float32)
    en = dict(EN_B=bool(enabled[0]), EN_C=bool(enabled[1]), EN_S=bool(enabled[2]),
              EN_H=bool(enabled[3]))
    if enabled[1]:
        part = torch.empty(n, nblk, device=x.device, dtype=torch.float32)
        _colour_kernel[(n, nblk)](x, out, order, factors, flags, mean, part, hw, float(threshold),
                                  PHASE=0, BLOCK=_CFG["BLOCK"], **en, **_launch_opts(_CFG))
        mean = part.sum(1) / hw
    _colour_kernel[(n, nblk)](x, out, order, factors, flags, mean, mean, hw, float(threshold),
                              PHASE=1, BLOCK=_CFG["BLOCK"], **en, **_launch_opts(_CFG))
    return out


def shipped_configs():
    """Every (kernel, signature, constexprs, options) the launchers can use on a GPU: the
    colour pass, and the blur passes for the recipes' 23- and 9-tap kernels (224 and 96
    pixel views) into each output dtype."""
    out = []
    for k, side in ((23, 224), (9, 96)):
        kp, bx = triton.next_power_of_2(k), min(128, triton.next_power_of_2(side))
        sig = {"X": "*fp32", "TMP": "*fp32", "SIGMA": "*fp32", "FLAGS": "*i32", "H": "i32",
               "W": "i32"}
        out.append((_blur_rows_kernel, sig, dict(K=k, KP=kp, BX=bx), _BLUR))
        for ty in ("*fp32", "*bf16", "*fp16"):
            sig = {"TMP": "*fp32", "OUT": ty, "SIGMA": "*fp32", "FLAGS": "*i32", "MEAN": "*fp32",
                   "STD": "*fp32", "H": "i32", "W": "i32", "s_on": "i32", "s_oc": "i32",
                   "s_oh": "i32", "s_ow": "i32", "threshold": "fp32"}
            out.append((_blur_cols_kernel, sig, dict(K=k, KP=kp, BX=bx, NORMALIZE=True), _BLUR))
    out += _colour_configs()
    sig = {"X": "*fp32", "OUT": "*fp32", "TOP": "*i64", "LEFT": "*i64", "HEIGHT": "*i64",
           "WIDTH": "*i64", "FLIP": "*i32", "ORDER": "*i32", "FACTORS": "*fp32",
           "FLAGS": "*i32", "MEAN": "*fp32", "PART": "*fp32", "H": "i32", "W": "i32",
           "SH": "i32", "SW": "i32", "threshold": "fp32"}
    for colour, phase in ((False, 1), (True, 0), (True, 1)):
        ce = dict(EN_B=colour, EN_C=colour, EN_S=colour, EN_H=colour, COLOUR=colour,
                  PHASE=phase, BX=_RESIZE["BX"])
        out.append((_resize_kernel, sig, ce, _RESIZE))
    return out


def _colour_configs():
    sig = {"X": "*fp32", "OUT": "*fp32", "ORDER": "*i32", "FACTORS": "*fp32", "FLAGS": "*i32",
           "MEAN": "*fp32", "PART": "*fp32", "HW": "i32", "threshold": "fp32"}
    out = []
    for phase in (0, 1):
        for en_h in (False, True):
            ce = dict(EN_B=True, EN_C=True, EN_S=True, EN_H=en_h, PHASE=phase,
                      BLOCK=_CFG["BLOCK"])
            out.append((_colour_kernel, sig, ce, _CFG))
    return out


# ----------------------------------------------------------------------------- blur

@triton.jit
def _taps(sigma, K: tl.constexpr, KP: tl.constexpr):
    """Normalised Gaussian taps exp(-t^2 / 2 sigma^2), t = -(K-1)/2 ... (K-1)/2, in a
    vector of KP >= K lanes (a power of two; the extra lanes are 0)."""
    i = tl.arange(0, KP)
    t = i.to(tl.float32) - (K - 1) / 2
    w = tl.where(i < K, tl.exp(-0.5 * (t / sigma) * (t / sigma)), 0.0)
    return w / tl.sum(w, 0)


@triton.jit
def _reflect(i, n):
    i = tl.where(i < 0, -i, i)
    return tl.where(i >= n, 2 * (n - 1) - i, i)


@triton.jit
def _blur_rows_kernel(X, TMP, SIGMA, FLAGS, H, W,
                      K: tl.constexpr, KP: tl.constexpr, BX: tl.constexpr):
    """Horizontal pass: TMP[n, c, y, x] = sum_t w_t X[n, c, y, reflect(x + t - K//2)]."""
    nc = tl.program_id(0).to(tl.int64)
    y = tl.program_id(1).to(tl.int64)
    n = nc // 3
    xs = tl.program_id(2).to(tl.int64) * BX + tl.arange(0, BX).to(tl.int64)
    x_ok = xs < W
    row = X + (nc * H + y) * W
    if tl.load(FLAGS + n * 2) != 0:
        t = tl.arange(0, KP)
        w = _taps(tl.load(SIGMA + n), K, KP)
        src = _reflect(xs[None, :] + (t[:, None] - K // 2), W)
        vals = tl.load(row + src, mask=(t[:, None] < K) & x_ok[None, :], other=0.0)
        out = tl.sum(vals * w[:, None], 0)
    else:
        out = tl.load(row + xs, mask=x_ok, other=0.0)
    tl.store(TMP + (nc * H + y) * W + xs, out, mask=x_ok)


@triton.jit
def _blur_cols_kernel(TMP, OUT, SIGMA, FLAGS, MEAN, STD, H, W, s_on, s_oc, s_oh, s_ow, threshold,
                      K: tl.constexpr, KP: tl.constexpr, BX: tl.constexpr,
                      NORMALIZE: tl.constexpr):
    """Vertical pass, then solarize (per sample), normalise and the output cast/layout."""
    nc = tl.program_id(0).to(tl.int64)
    y = tl.program_id(1).to(tl.int64)
    n = nc // 3
    c = nc % 3
    xs = tl.program_id(2).to(tl.int64) * BX + tl.arange(0, BX).to(tl.int64)
    x_ok = xs < W
    plane = TMP + nc * H * W
    if tl.load(FLAGS + n * 2) != 0:
        t = tl.arange(0, KP)
        w = _taps(tl.load(SIGMA + n), K, KP)
        ys = _reflect(y + (t - K // 2), H)
        vals = tl.load(plane + ys[:, None] * W + xs[None, :],
                       mask=(t[:, None] < K) & x_ok[None, :], other=0.0)
        v = tl.sum(vals * w[:, None], 0)
    else:
        v = tl.load(plane + y * W + xs, mask=x_ok, other=0.0)
    if tl.load(FLAGS + n * 2 + 1) != 0:
        v = tl.where(v >= threshold, 1.0 - v, v)
    if NORMALIZE:
        v = (v - tl.load(MEAN + c)) / tl.load(STD + c)
    dst = OUT + n * s_on + c * s_oc + y * s_oh + xs * s_ow
    tl.store(dst, v.to(OUT.dtype.element_ty), mask=x_ok)


_BLUR = dict(num_warps=4, num_stages=1)


def blur_finish(x, sigma, flags, k_h, k_w, mean, std, threshold, out):
    """Separable reflect-padded blur (per-sample sigma; flags[:, 0]), then solarize
    (flags[:, 1]), then (x - mean) / std when ``mean`` is given, written into ``out`` (any
    float dtype and strides, e.g. channels-last). x: float32 (N, 3, H, W) contiguous."""
    n, _, H, W = x.shape
    x = x.contiguous()
    tmp = torch.empty_like(x)
    bx = min(128, triton.next_power_of_2(W))
    grid = (n * 3, H, triton.cdiv(W, bx))
    _blur_rows_kernel[grid](x, tmp, sigma, flags, H, W, K=k_w, KP=triton.next_power_of_2(k_w),
                            BX=bx, **_launch_opts(_BLUR))
    normalize = mean is not None
    if not normalize:
        mean = std = sigma  # unused
    _blur_cols_kernel[grid](tmp, out, sigma, flags, mean, std, H, W, *out.stride(),
                            float(threshold), K=k_h, KP=triton.next_power_of_2(k_h), BX=bx,
                            NORMALIZE=normalize, **_launch_opts(_BLUR))
    return out


# ----------------------------------------------------------------------------- crop + resize

@triton.jit
def _window(i, start, length, S):
    """Antialiased bilinear window of output index i (torchvision's bounds):
    (centre, support, first tap, end tap) in input coordinates of the crop."""
    scale = length / S
    support = tl.maximum(scale, 1.0)
    center = scale * (i + 0.5)
    lo = tl.maximum((center - support + 0.5).to(tl.int32), 0)
    hi = tl.minimum((center + support + 0.5).to(tl.int32), length.to(tl.int32))
    return center, support, lo, hi


@triton.jit
def _resample(X, n, y, xs, x_ok, TOP, LEFT, HEIGHT, WIDTH, FLIP, H, W, SH, SW):
    """Output row y, columns xs of sample n: crop, antialiased bilinear resize, flip;
    clamped to [0, 1]. Returns (r, g, b)."""
    top = tl.load(TOP + n).to(tl.int32)
    left = tl.load(LEFT + n).to(tl.int32)
    hgt = tl.load(HEIGHT + n).to(tl.float32)
    wid = tl.load(WIDTH + n).to(tl.float32)
    flip = tl.load(FLIP + n) != 0
    src_x = tl.where(flip, SW - 1 - xs, xs).to(tl.float32)
    cy, sy, y0, y1 = _window(y.to(tl.float32), top * 0, hgt, SH)
    cx, sx, x0, x1 = _window(src_x, top * 0, wid, SW)
    ntx = (2.0 * sx + 2.0).to(tl.int32)  # an upper bound on the taps of any column
    acc_r = tl.zeros(xs.shape, dtype=tl.float32)
    acc_g = tl.zeros(xs.shape, dtype=tl.float32)
    acc_b = tl.zeros(xs.shape, dtype=tl.float32)
    wx_sum = tl.zeros(xs.shape, dtype=tl.float32)
    for tx in range(0, ntx):
        j = x0 + tx
        ok = x_ok & (j < x1)
        wx = tl.where(ok, tl.maximum(1.0 - tl.abs((j.to(tl.float32) - cx + 0.5) / sx), 0.0), 0.0)
        wx_sum += wx
        col = (left + j).to(tl.int64)
        row_r = tl.zeros(xs.shape, dtype=tl.float32)
        row_g = tl.zeros(xs.shape, dtype=tl.float32)
        row_b = tl.zeros(xs.shape, dtype=tl.float32)
        wy_sum = 0.0
        for ty in range(0, y1 - y0):
            jy = y0 + ty
            wy = tl.maximum(1.0 - tl.abs((jy.to(tl.float32) - cy + 0.5) / sy), 0.0)
            wy_sum += wy
            base = X + (n * 3 * H + (top + jy).to(tl.int64)) * W + col
            row_r += wy * tl.load(base, mask=ok, other=0.0)
            row_g += wy * tl.load(base + H * W, mask=ok, other=0.0)
            row_b += wy * tl.load(base + 2 * H * W, mask=ok, other=0.0)
        acc_r += wx * row_r / wy_sum
        acc_g += wx * row_g / wy_sum
        acc_b += wx * row_b / wy_sum
    norm = tl.where(wx_sum > 0, wx_sum, 1.0)  # lanes past the row end have no taps
    return (tl.minimum(tl.maximum(acc_r / norm, 0.0), 1.0),
            tl.minimum(tl.maximum(acc_g / norm, 0.0), 1.0),
            tl.minimum(tl.maximum(acc_b / norm, 0.0), 1.0))


@triton.jit
def _resize_kernel(X, OUT, TOP, LEFT, HEIGHT, WIDTH, FLIP, ORDER, FACTORS, FLAGS, MEAN, PART,
                   H, W, SH, SW, threshold,
                   EN_B: tl.constexpr, EN_C: tl.constexpr, EN_S: tl.constexpr,
                   EN_H: tl.constexpr, COLOUR: tl.constexpr, PHASE: tl.constexpr,
                   BX: tl.constexpr):
    """One output row block of sample n: resample, then (COLOUR) the colour chain. With
    COLOUR and PHASE 0 it only writes the row block's partial grayscale sum (contrast's
    mean); otherwise it writes the pixels."""
    n = tl.program_id(0).to(tl.int64)
    y = tl.program_id(1)
    xb = tl.program_id(2)
    xs = xb * BX + tl.arange(0, BX)
    x_ok = xs < SW
    r, g, b = _resample(X, n, y, xs, x_ok, TOP, LEFT, HEIGHT, WIDTH, FLIP, H, W, SH, SW)
    if COLOUR:
        r, g, b = _chain(r, g, b, n, ORDER, FACTORS, FLAGS, tl.load(MEAN + n), threshold,
                         EN_B, EN_C, EN_S, EN_H, PHASE)
    if COLOUR and PHASE == 0:
        part = tl.sum(tl.where(x_ok, _gray(r, g, b), 0.0), 0)
        tl.store(PART + (n * SH + y) * tl.num_programs(2) + xb, part)
    else:
        out = OUT + (n * 3 * SH + y) * SW + xs
        tl.store(out, r, mask=x_ok)
        tl.store(out + SH * SW, g, mask=x_ok)
        tl.store(out + 2 * SH * SW, b, mask=x_ok)


_RESIZE = dict(BX=64, num_warps=2, num_stages=1)


def resize(x, top, left, height, width, flip, size, colour=None):
    """Crop (top, left, height, width), antialiased bilinear resize to ``size`` and flip,
    per sample, clamped to [0, 1]; with ``colour`` = (order, factors, flags, enabled,
    threshold) (see ``colour``) the colour chain runs in the same kernel.
    x: float32 (N, 3, H, W)."""
    n, _, H, W = x.shape
    SH, SW = size
    out = torch.empty(n, 3, SH, SW, device=x.device, dtype=torch.float32)
    grid = (n, SH, triton.cdiv(SW, _RESIZE["BX"]))
    x = x.contiguous()
    geometry = (top, left, height, width, flip.int())
    if colour is None:
        dummy_i = torch.zeros(1, dtype=torch.int32, device=x.device)
        dummy_f = torch.zeros(1, dtype=torch.float32, device=x.device)
        _resize_kernel[grid](x, out, *geometry, dummy_i, dummy_f, dummy_i, dummy_f, dummy_f,
                             H, W, SH, SW, 0.5, EN_B=False, EN_C=False, EN_S=False, EN_H=False,
                             COLOUR=False, PHASE=1, BX=_RESIZE["BX"], **_launch_opts(_RESIZE))
        return out
    order, factors, flags, enabled, threshold = colour
    en = dict(EN_B=bool(enabled[0]), EN_C=bool(enabled[1]), EN_S=bool(enabled[2]),
              EN_H=bool(enabled[3]))
    mean = torch.zeros(n, device=x.device, dtype=torch.float32)
    if enabled[1]:
        part = torch.empty(n, SH, grid[2], device=x.device, dtype=torch.float32)
        _resize_kernel[grid](x, out, *geometry, order, factors, flags, mean, part, H, W, SH, SW,
                             float(threshold), COLOUR=True, PHASE=0, BX=_RESIZE["BX"], **en,
                             **_launch_opts(_RESIZE))
        mean = part.sum((1, 2)) / (SH * SW)
    _resize_kernel[grid](x, out, *geometry, order, factors, flags, mean, mean, H, W, SH, SW,
                         float(threshold), COLOUR=True, PHASE=1, BX=_RESIZE["BX"], **en,
                         **_launch_opts(_RESIZE))
    return out
