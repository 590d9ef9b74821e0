"""Fused colour kernel for per-sample augmentation: ColorJitter (random op order per
sample), RandomGrayscale and RandomSolarize in one pass over each image.

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
    jitter = tl.load(FLAGS + n * 3)
    mean = tl.load(MEAN + n)
    seen_contrast = 0  # PHASE 0 applies only the ops before contrast
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
    if PHASE == 0:
        part = tl.sum(tl.where(ok, _gray(r, g, b), 0.0), 0)
        tl.store(PART + n * tl.num_programs(1) + blk, part)
    else:
        if tl.load(FLAGS + n * 3 + 1) != 0:
            y = _gray(r, g, b)
            r = y
            g = y
            b = y
        if tl.load(FLAGS + n * 3 + 2) != 0:
            r = tl.where(r >= threshold, 1.0 - r, r)
            g = tl.where(g >= threshold, 1.0 - g, g)
            b = tl.where(b >= threshold, 1.0 - b, b)
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
    """Every (kernel, signature, constexprs, options) the launcher can use on a GPU."""
    sig = {"X": "*fp32", "OUT": "*fp32", "ORDER": "*i32", "FACTORS": "*fp32", "FLAGS": "*i32",
           "MEAN": "*fp32", "PART": "*fp32", "HW": "i32", "threshold": "fp32"}
    out = []
    for phase in (0, 1):
        for en_h in (False, True):
            ce = dict(EN_B=True, EN_C=True, EN_S=True, EN_H=en_h, PHASE=phase,
                      BLOCK=_CFG["BLOCK"])
            out.append((_colour_kernel, sig, ce, _CFG))
    return out
