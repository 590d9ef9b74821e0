"""Per-sample random augmentation of image batches, on the device that holds them.

Every op is an ``nn.Module`` with torchvision's name and arguments, callable on its own and
composable (``Augment``, ``nn.Sequential``, torchvision's ``Compose``). It draws its random
parameters for the whole batch at once on the images' device (``generator=`` for
reproducibility, the default generator otherwise; no per-sample Python loop, no host sync)
and follows torchvision's tensor semantics per sample:

- ``RandomResizedCrop``: up to 10 tries of area * U(scale) and ratio exp(U(log r0, log r1));
  w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio)); the first try with
  0 < w <= W and 0 < h <= H wins, top = randint(0, H - h + 1), left = randint(0, W - w + 1);
  otherwise a central crop clamped to the ratio range. The crop is resized to ``size`` (h, w)
  with bilinear interpolation, antialiased when downscaling (torchvision's triangle filter:
  support max(scale, 1), weights normalised per output pixel). Crop, resize and a following
  flip are one separable linear map per sample: out = Wy · img · Wxᵀ with per-sample
  (h x H) and (w x W) banded weight matrices, a few taps per output pixel (the portable
  path: two weighted row gathers for the batch, ``resample``; on CUDA one Triton kernel
  gathers the same taps).
- ``RandomHorizontalFlip``: x[..., ::-1] with probability p.
- ``ColorJitter``: factors brightness, contrast, saturation ~ U(range) (a number v gives
  [max(0, 1 - v), 1 + v], a pair is the range), hue ~ U(range) (h gives [-h, h]), applied
  in a random order per sample, all with probability p. brightness: x·f; contrast: blend
  with the mean of the grayscale image; saturation: blend with the grayscale image; hue:
  RGB -> HSV, h <- (h + f) mod 1, HSV -> RGB; blend(x, y, r) = clamp(r·x + (1 - r)·y, 0, 1).
- ``RandomGrayscale``: 0.2989 R + 0.587 G + 0.114 B, replicated to 3 channels.
- ``GaussianBlur``: 1-D kernel exp(-x²/2σ²), x = -(k-1)/2 … (k-1)/2, normalised; separable;
  reflect padding of k // 2 (the portable path: k-tap bands through ``resample``).
- ``RandomSolarize``: x >= threshold -> 1 - x.
- ``Normalize``: (x - mean) / std, then the output dtype and memory format.

``Augment(ops)`` chains ops in any order into one view and takes the fused kernels where
the chain allows (crop [+ flip] [+ ColorJitter] [+ RandomGrayscale] [+ RandomSolarize]; a
colour run; GaussianBlur [+ RandomSolarize] [+ Normalize] at the end); an ``nn.Sequential``
of the same ops gives the same views op by op. Presets return several views (their keyword
arguments ``flip_p``, ``normalize``, ``dtype`` and ``channels_last`` apply to every view).
Images: uint8 (N, C, H, W) or (N, H, W, C) (``channels_last_input=True``), one (C, H, W)
image (giving one (C, h, w) view), a list of (C, H, W) images (of different sizes when the
chain starts with a crop), or float images in [0, 1]. Ops return float32 (Augment and the
presets: ``dtype``).
"""
import math

import torch
import torch.nn.functional as tF
from torch import nn

from fastssl import _checks

GRAY = (0.2989, 0.587, 0.114)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _uniform(n, lo, hi, generator, device):
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def _bernoulli(n, p, generator, device):
    return torch.rand(n, generator=generator, device=device) < p


def _check_p(name, p):
    v = _checks.host_value(p, name)
    if v is None or math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return v


def _size(size, name="size"):
    """An int or an (h, w) pair of positive ints -> (h, w)."""
    return _checks.size2(size, name)


# ----------------------------------------------------------------------------- input

def as_batch(images, channels_last_input=False):
    """(float32 batch (N, 3, H, W) in [0, 1] padded to the largest image, sizes (N, 2) int64).

    uint8 values are divided by 255; float input must already be in [0, 1].
    """
    channels_last_input = _checks.flag(channels_last_input, "channels_last_input")
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("empty list of images")
        sizes = []
        for i, im in enumerate(images):
            if not isinstance(im, torch.Tensor) or im.dim() != 3:
                raise ValueError(f"image {i}: expected a (C, H, W) tensor")
            if im.shape[1] == 0 or im.shape[2] == 0:
                raise ValueError(f"image {i} is empty: shape {tuple(im.shape)}")
            if im.device != images[0].device:
                raise ValueError(f"image {i} is on {im.device} but image 0 on {images[0].device}")
            _check_float_range(im, f"image {i}")
            sizes.append(im.shape[-2:])
        H = max(s[0] for s in sizes)
        W = max(s[1] for s in sizes)
        first = images[0]
        batch = torch.zeros(len(images), 3, H, W, device=first.device)
        for i, im in enumerate(images):
            batch[i, :, :im.shape[1], :im.shape[2]] = _to_float(_rgb(im, i))
        sizes = torch.tensor([list(s) for s in sizes], device=first.device, dtype=torch.int64)
        return batch, sizes
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError("images must be a (N, C, H, W) tensor, (N, H, W, C) with "
                         "channels_last_input=True, or a list of (C, H, W) tensors")
    if channels_last_input:
        images = images.permute(0, 3, 1, 2)
    if 0 in images.shape:
        raise ValueError(f"images must be non-empty (N, C, H, W), got shape "
                         f"{tuple(images.shape)}")
    x = _to_float(_rgb(images, None, dim=1, channels_last_input=channels_last_input))
    _check_float_range(images, "images")
    n, _, H, W = x.shape
    sizes = torch.tensor([[H, W]], device=x.device, dtype=torch.int64).expand(n, 2)
    return x, sizes


def _rgb(im, i, dim=0, channels_last_input=False):
    c = im.shape[dim]
    where = f"image {i}" if i is not None else "images"
    if c == 1:
        return torch.cat([im] * 3, dim)
    if c != 3:
        hint = ""
        if not channels_last_input and im.shape[-1] in (1, 3):
            hint = (f"; the last dimension has {im.shape[-1]}: for (N, H, W, C) images pass "
                    "channels_last_input=True")
        raise ValueError(f"{where}: expected 1 or 3 channels in dimension {dim}, got {c}{hint}")
    return im


_SLACK = 1e-5


def _mark_in_range(out):
    """Tag an op's output as lying in [0, 1], valid until it is modified in place: the next
    op of an nn.Sequential chain then skips the range check and its host read."""
    out._fastssl_in_range = out._version


def _check_float_range(im, where):
    """Float images must lie in [0, 1]: one reduction and a host read (uint8 needs none)."""
    if not im.is_floating_point() or getattr(im, "_fastssl_in_range", None) == im._version:
        return
    lo, hi = (float(v) for v in torch.aminmax(im.detach()))
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{where}: float images contain NaN")
    if lo < -_SLACK or hi > 1 + _SLACK:  # rounding of a blur or resize may leave 1 + ulp
        raise ValueError(f"{where}: float images must lie in [0, 1], got values in "
                         f"[{lo:g}, {hi:g}]; pass uint8 images (0..255) or divide by 255")


def _to_float(im):
    if im.dtype == torch.uint8:
        return im / 255.0  # one pass into float32
    if im.is_floating_point():
        return im.float()
    raise ValueError(f"images must be uint8 or floating point in [0, 1], got {im.dtype}")


# ----------------------------------------------------------------------------- base

class _Op(nn.Module):
    """An augmentation op: ``params(sizes, generator)`` draws every sample's random
    parameters at once (``sizes``: (N, 2) int64 image sizes on the images' device) and
    ``apply(x, params)`` maps a float32 (N, 3, H, W) batch in [0, 1]. Called on images it
    is a one-op ``Augment``: ``op(images, generator=None, return_params=False,
    channels_last_input=False)`` returns float32 views (and the parameters)."""

    def params(self, sizes, generator=None):
        return {}

    def apply(self, x, p):
        raise NotImplementedError

    def forward(self, images, generator=None, return_params=False, channels_last_input=False):
        out = _pipeline([self], images, generator, return_params, channels_last_input)
        return (out[0], out[1][0]) if return_params else out

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self._shown().items())

    def _shown(self):
        return {}


# ----------------------------------------------------------------------------- crop + resize

def _interpolation(value):
    name = str(getattr(value, "value", value)).lower()
    if name != "bilinear":
        raise ValueError(f"interpolation must be 'bilinear' (antialiased, as torchvision's "
                         f"default), got {value!r}")


class RandomResizedCrop(_Op):
    """Crop a random area/ratio per sample and resize it to ``size`` (an int or (h, w));
    torchvision's arguments, antialiased bilinear only (see the module docstring)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bilinear",
                 antialias=True):
        super().__init__()
        self.size = _size(size)
        scale = _checks.pair(scale, "scale", lo=0.0)
        ratio = _checks.pair(ratio, "ratio", lo=0.0, lo_open=True)
        if scale[1] <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        _interpolation(interpolation)
        if not _checks.flag(antialias, "antialias"):
            raise ValueError("antialias=False is not implemented: the resize is antialiased "
                             "(torchvision's default for tensors)")
        self.scale, self.ratio = scale, ratio

    def _shown(self):
        return {"size": self.size, "scale": self.scale,
                "ratio": tuple(round(r, 4) for r in self.ratio)}

    def params(self, sizes, generator=None):
        """Per-sample (top, left, height, width) for image sizes (N, 2)."""
        n, device = sizes.shape[0], sizes.device
        H, W = sizes[:, 0].double(), sizes[:, 1].double()
        area = (H * W)[:, None]
        tries = 10
        target = area * _uniform(n * tries, *self.scale, generator, device).view(n, tries)
        logr = _uniform(n * tries, math.log(self.ratio[0]), math.log(self.ratio[1]), generator,
                        device).view(n, tries)
        ratio = torch.exp(logr)
        w = torch.round(torch.sqrt(target * ratio))
        h = torch.round(torch.sqrt(target / ratio))
        ok = (w > 0) & (h > 0) & (w <= W[:, None]) & (h <= H[:, None])
        first = torch.argmax(ok.int(), 1)
        any_ok = ok.any(1)
        w_t = w.gather(1, first[:, None])[:, 0]
        h_t = h.gather(1, first[:, None])[:, 0]
        # Fallback: the central crop, clamped to the ratio range.
        in_ratio = W / H
        fw = torch.where(in_ratio < self.ratio[0], W, torch.where(
            in_ratio > self.ratio[1], torch.round(H * self.ratio[1]), W))
        fh = torch.where(in_ratio < self.ratio[0], torch.round(W / self.ratio[0]), H)
        w_c = torch.where(any_ok, w_t, fw)
        h_c = torch.where(any_ok, h_t, fh)
        u = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
        top = torch.where(any_ok, torch.floor(u[:, 0] * (H - h_c + 1)), torch.floor((H - h_c) / 2))
        left = torch.where(any_ok, torch.floor(u[:, 1] * (W - w_c + 1)), torch.floor((W - w_c) / 2))
        return {"top": top.long(), "left": left.long(), "height": h_c.long(),
                "width": w_c.long()}

    def apply(self, batch, p, flip=None):
        """The crops resized; ``flip`` (N,) bool mirrors them horizontally in the same pass
        (a RandomHorizontalFlip right after the crop)."""
        from fastssl import _dispatch
        if flip is None:
            flip = torch.zeros(batch.shape[0], dtype=torch.bool, device=batch.device)
        if _fused(batch):
            return _dispatch.kernels("augment").resize(
                batch, p["top"], p["left"], p["height"], p["width"], flip, self.size)
        S_h, S_w = self.size
        rows = resize_bands(p["top"], p["height"], batch.shape[2], S_h)
        cols = resize_bands(p["left"], p["width"], batch.shape[3], S_w, flip)
        # Rows, then columns (the same rounding whatever the input's layout); the result
        # stays stored as (N, C, W, H), which the blur reads without a transpose.
        out = resample(transpose(resample(batch.contiguous(), *rows)), *cols)
        return out.clamp_(0.0, 1.0).transpose(2, 3)


class _Coin(_Op):
    """An op applied to each sample with probability p: ``transform`` where the coin says."""

    def __init__(self, p):
        super().__init__()
        self.p = _check_p("p", p)

    def _shown(self):
        return {"p": self.p}

    def params(self, sizes, generator=None):
        return {"apply": _bernoulli(sizes.shape[0], self.p, generator, sizes.device)}

    def transform(self, x):
        raise NotImplementedError

    def apply(self, x, p):
        return torch.where(p["apply"].view(-1, 1, 1, 1), self.transform(x), x)


class RandomHorizontalFlip(_Coin):
    """Mirror each sample left-right with probability p (torchvision's)."""

    def __init__(self, p=0.5):
        super().__init__(p)

    def transform(self, x):
        return x.flip(-1)


def resize_bands(start, length, in_size, out_size, flip=None):
    """The antialiased bilinear resize of the window [start, start + length) of each row as
    bands: (index (N, out_size, T) int64 into [0, in_size), weights (N, out_size, T)
    float32), output i = sum_t weights[i, t] · input[index[i, t]] (torchvision's triangle
    filter and bounds: centre c = s (i + 1/2), s = length / out_size, support
    r = max(s, 1), taps j in [trunc(c - r + 1/2), trunc(c + r + 1/2)) ∩ [0, length),
    weight max(0, 1 - |j - c + 1/2| / r), normalised). T = ceil(2 r) for the largest
    possible window (length <= in_size) bounds the taps of every row; unused taps weigh 0.
    ``flip`` (N,) bool mirrors the output (row i takes row out_size - 1 - i's taps)."""
    dtype = torch.float64
    length = length.to(dtype)[:, None, None]
    scale = length / out_size
    support = torch.clamp(scale, min=1.0)
    i = torch.arange(out_size, device=start.device, dtype=dtype)[None, :, None]
    if flip is not None:
        i = torch.where(flip.view(-1, 1, 1), out_size - 1 - i, i)
    center = scale * (i + 0.5)
    lo = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length)
    taps = math.ceil(2 * max(in_size / out_size, 1.0) + 1e-6)
    j = lo + torch.arange(taps, device=start.device, dtype=dtype)
    w = torch.clamp(1 - torch.abs((j - center + 0.5) / support), min=0)
    w = torch.where(j < hi, w, 0.0)
    index = torch.clamp(start.view(-1, 1, 1) + j.long(), max=in_size - 1)
    return index, (w / w.sum(-1, keepdim=True)).float()


def resample(x, index, weights):
    """out[n, c, i, :] = sum_t weights[n, i, t] · x[n, c, index[n, i, t], :]: a per-sample
    banded linear map of the rows of a contiguous (N, C, H, W) batch, one weighted gather
    of whole rows (``embedding_bag``) for the batch. index, weights: (N, S, T) or (S, T)
    and (N, S, T)."""
    n, c, h, w = x.shape
    taps = weights.shape[-1]
    if index.dim() == 2:
        index = index.expand(n, -1, -1)
    s = index.shape[1]
    base = torch.arange(n * c, device=x.device).view(n, c, 1, 1) * h
    rows = (index[:, None] + base).reshape(-1, taps)
    wts = weights[:, None].expand(n, c, s, taps).reshape(-1, taps).to(x.dtype)
    out = tF.embedding_bag(rows, x.reshape(n * c * h, w), per_sample_weights=wts, mode="sum")
    return out.view(n, c, s, w)


def transpose(x):
    """(N, C, H, W) -> contiguous (N, C, W, H) (a view where that is already contiguous)."""
    return x.transpose(2, 3).contiguous()


def _stored(x):
    """(tensor, flipped): x itself when contiguous, else its contiguous H/W transpose
    (flipped = True; a crop's output is stored so): the colour ops are per pixel and per
    image, so they run on either."""
    if x.is_contiguous():
        return x, False
    t = x.transpose(2, 3)
    return (t, True) if t.is_contiguous() else (x.contiguous(), False)


def _logical(stored, flipped):
    """The (N, C, H, W) view of a tensor stored as _stored describes."""
    return stored.transpose(2, 3) if flipped else stored


# ----------------------------------------------------------------------------- colour

def _gray(x):
    """0.2989 R + 0.587 G + 0.114 B as (N, 1, H, W), in x's layout: one (1 x 3) @ (3 x HW)
    product per sample on the stored tensor."""
    stored, flipped = _stored(x)
    n, _, a, b = stored.shape
    w = torch.tensor(GRAY, device=x.device, dtype=x.dtype).view(1, 1, 3)
    return _logical(torch.matmul(w, stored.reshape(n, 3, a * b)).view(n, 1, a, b), flipped)


def _blend(x, y, r):
    return torch.clamp(r * x + (1 - r) * y, 0.0, 1.0)


def _hue_shift(x, f):
    """Hue rotation by f (N,) turns, torchvision's RGB -> HSV -> RGB round trip without
    the HSV image: with v = max (R, then G, then B where several attain it), m = min, chroma
    c = v - m, the hue in sixths h6 = (g - b) / c (v = r), 2 + (b - r) / c (v = g),
    4 + (r - g) / c (v = b), 0 where c = 0; each channel comes back as
    v - c · clamp(min(k, 4 - k), 0, 1), k = (h6 + 6 f + o) mod 6, o = 5, 3, 1 for R, G, B
    (HSV -> RGB's closed form; h6 + 6 f is (h + f) mod 1 in sixths)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    v = x.amax(1, keepdim=True)
    c = v - x.amin(1, keepdim=True)
    inv = torch.reciprocal(c.clamp_min(1e-30))  # c = 0: the differences below are 0
    h6 = torch.where(r == v, (g - b) * inv,
                     torch.where(g == v, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    offsets = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(h6 + (6.0 * f.to(x.dtype).view(-1, 1, 1, 1) + offsets), 6.0)
    t = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(v, c, t, value=-1.0).clamp_(0.0, 1.0)


def adjust(x, op, f):
    """One colour op (0 brightness, 1 contrast, 2 saturation, 3 hue) with per-sample factor f."""
    if op == 3:
        return _hue_shift(x, f)
    f = f.view(-1, 1, 1, 1).to(x.dtype)
    if op == 0:
        return torch.clamp(x * f, 0.0, 1.0)
    if op == 1:
        return _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f)
    return _blend(x, _gray(x), f)


def _linear_slot(x, op, f, on):
    """Brightness, contrast or saturation per sample (``op`` 0, 1, 2 where ``on``; the
    identity elsewhere) as one blend clamp(f x + (1 - f) y) with the per-sample partner y:
    0, the mean of the grayscale image, or the grayscale image (f = 1, y = 0: identity)."""
    shape = (-1, 1, 1, 1)
    gray = _gray(x)
    one_minus = torch.where(on, 1.0 - f, 0.0)
    a = torch.where(op == 2, one_minus, 0.0).view(shape)
    # the mean accumulated in float64: the same value whichever way x is stored
    mean = (gray.sum((2, 3), keepdim=True, dtype=torch.float64) / gray[0, 0].numel()).to(x.dtype)
    b = torch.where(op == 1, one_minus, 0.0).view(shape) * mean
    scale = torch.where(on, f, 1.0).view(shape).to(x.dtype)
    return torch.addcmul(torch.addcmul(b, a, gray), scale, x).clamp_(0.0, 1.0)


def _jitter_range(value, name, center, bound, hue=False):
    """torchvision's forms: a number v gives [center - v, center + v] (the low end clipped at
    0 except for hue), a pair is (min, max) within ``bound``."""
    if _checks.is_number(value) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        v = _checks.number(value, name, lo=0.0, hi=0.5 if hue else None)
        return (center - v if hue else max(0.0, center - v), center + v)
    return _checks.pair(value, name, lo=bound[0], hi=bound[1])


class ColorJitter(_Op):
    """torchvision's ColorJitter per sample: brightness, contrast and saturation as a factor
    v (range [max(0, 1 - v), 1 + v]) or a (min, max) pair, hue as h in [0, 0.5] (range
    [-h, h]) or a pair within [-0.5, 0.5]; the four ops in a random order per sample, each
    left out when its range is the identity. ``p`` (fastssl's): apply to a sample with that
    probability (torchvision's RandomApply([ColorJitter(...)], p) per sample)."""

    def __init__(self, brightness=0, contrast=0, saturation=0, hue=0, p=1.0):
        super().__init__()
        self.ranges = [_jitter_range(v, name, 1.0, (0.0, math.inf)) for name, v in (
            ("brightness", brightness), ("contrast", contrast), ("saturation", saturation))]
        self.ranges.append(_jitter_range(hue, "hue", 0.0, (-0.5, 0.5), hue=True))
        centers = (1.0, 1.0, 1.0, 0.0)
        self.enabled = [r != (c, c) for r, c in zip(self.ranges, centers)]  # as torchvision
        self.p = _check_p("p", p)

    def _shown(self):
        names = ("brightness", "contrast", "saturation", "hue")
        shown = {k: tuple(round(v, 4) for v in r)
                 for k, r, on in zip(names, self.ranges, self.enabled) if on}
        return {**shown, "p": self.p}

    def params(self, sizes, generator=None):
        n, device = sizes.shape[0], sizes.device
        factors = torch.stack([_uniform(n, lo, hi, generator, device) for lo, hi in self.ranges], 1)
        order = torch.argsort(torch.rand(n, 4, generator=generator, device=device), 1)
        return {"apply": _bernoulli(n, self.p, generator, device), "factors": factors.float(),
                "order": order}

    def apply(self, x, p):
        """Each sample's chain is its linear ops before hue, hue, its linear ops after hue
        (in its drawn order): three batched blends for the ops before (right-aligned:
        pass j holds op j - (3 - k) of the sample whose hue is op k), hue once for the
        batch, three blends for the ops after (pass j: op k + j); a sample without an op
        in a pass, or whose coin says no, is left as it is. Without hue: three blends."""
        out, flipped = _stored(x)
        order, factors, coin = p["order"], p["factors"], p["apply"]
        enabled = torch.tensor(self.enabled, device=x.device)
        is_hue = (order == 3).int()
        linear = order.gather(1, torch.argsort(is_hue, dim=1, stable=True))[:, :3]
        k = is_hue.argmax(1) if self.enabled[3] else torch.full_like(order[:, 0], 3)

        def blend(out, pos):
            op = linear.gather(1, pos.clamp(0, 2)[:, None])[:, 0]
            on = coin & (pos >= 0) & (pos < 3) & enabled[op]
            return _linear_slot(out, op, factors.gather(1, op[:, None])[:, 0], on)

        for j in range(3):
            out = blend(out, j - 3 + k)
        if self.enabled[3]:
            out = torch.where(coin.view(-1, 1, 1, 1), _hue_shift(out, factors[:, 3]), out)
            for j in range(3):
                out = blend(out, k + j)
        return _logical(out, flipped)


class RandomGrayscale(_Coin):
    """0.2989 R + 0.587 G + 0.114 B on all three channels, with probability p."""

    def __init__(self, p=0.1):
        super().__init__(p)

    def transform(self, x):
        return _gray(x).expand_as(x)


def _kernel_size(value):
    """None, an odd positive int, or torchvision's (kx, ky) pair -> None or (k_h, k_w)."""
    if value is None:
        return None
    if _checks.is_number(value):
        k = _checks.integer(value, "kernel_size", lo=1)
        ks = (k, k)
    else:
        kx, ky = _checks.pair(value, "kernel_size", integer_values=True, lo=1)
        ks = (ky, kx)
    if any(k % 2 == 0 for k in ks):
        raise ValueError(f"kernel_size must be odd and positive, got {value!r}")
    return ks


class GaussianBlur(_Op):
    """Gaussian blur with σ ~ U(sigma) per sample (``sigma`` a number or a (min, max) pair),
    reflect padding, with probability p. ``kernel_size``: an odd int, torchvision's
    (kx, ky) pair, or None for about 10% of each side (odd); capped at 2·side − 1."""

    def __init__(self, kernel_size=None, sigma=(0.1, 2.0), p=1.0):
        super().__init__()
        self.kernel_size = _kernel_size(kernel_size)
        if _checks.is_number(sigma):
            s = _checks.number(sigma, "sigma", lo=0.0, lo_open=True)
            sigma = (s, s)
        self.sigma = _checks.pair(sigma, "sigma", lo=0.0, lo_open=True)
        self.p = _check_p("p", p)

    def _shown(self):
        ks = None if self.kernel_size is None else (self.kernel_size[1], self.kernel_size[0])
        return {"kernel_size": ks, "sigma": self.sigma, "p": self.p}

    def params(self, sizes, generator=None):
        n, device = sizes.shape[0], sizes.device
        return {"apply": _bernoulli(n, self.p, generator, device),
                "sigma": _uniform(n, *self.sigma, generator, device).float()}

    def kernel_sizes(self, H, W):
        """(k_h, k_w) for an H x W image: the given sizes or ~10% of each side, odd, at
        most 2·side − 1 (reflect padding needs a pad below the side)."""
        def default(side):
            k = int(0.1 * side)
            return k + 1 if k % 2 == 0 else k
        k_h, k_w = self.kernel_size or (default(H), default(W))
        return min(k_h, 2 * H - 1), min(k_w, 2 * W - 1)

    def apply(self, x, p):
        S_h, S_w = x.shape[-2:]
        k_h, k_w = self.kernel_sizes(S_h, S_w)
        rows = blur_bands(p["sigma"], p["apply"], k_h, S_h)
        cols = blur_bands(p["sigma"], p["apply"], k_w, S_w)
        # Columns, then rows, whatever the input's layout (a crop's output is stored as
        # (N, C, W, H): no transpose before the first pass).
        return resample(transpose(resample(transpose(x), *cols)), *rows)


def blur_bands(sigma, apply, k, size):
    """The 1-D Gaussian blur with reflect padding as bands (see ``resample``): index
    (size, k) reflect(i + t - k // 2), weights (N, k) exp(-t^2 / 2 sigma^2) normalised per
    sample, broadcast to (N, size, k); the one-hot centre tap (identity) where ``apply`` is
    false."""
    half = k // 2
    t = torch.arange(-half, half + 1, device=sigma.device, dtype=torch.float64)
    kern = torch.exp(-(t[None] ** 2) / (2 * sigma.double()[:, None] ** 2))
    kern = torch.where(apply.view(-1, 1), kern / kern.sum(1, keepdim=True), (t == 0).double())
    src = torch.arange(size, device=sigma.device)[:, None] + t.long()[None]
    src = torch.where(src < 0, -src, src)
    src = torch.where(src >= size, 2 * (size - 1) - src, src)
    return src, kern.float()[:, None].expand(-1, size, -1)


class RandomSolarize(_Coin):
    """x >= threshold -> 1 - x with probability p; the threshold on the [0, 1] scale."""

    def __init__(self, threshold=0.5, p=0.5):
        super().__init__(p)
        t = _checks.number(threshold, "threshold")
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] (images are on the [0, 1] scale; "
                             f"for a uint8 threshold t pass t / 255), got {threshold!r}")
        self.threshold = t

    def _shown(self):
        return {"threshold": self.threshold, "p": self.p}

    def transform(self, x):
        return torch.where(x >= self.threshold, 1.0 - x, x)


def _three(values, name):
    """Three finite numbers, one per RGB channel."""
    if _checks.is_number(values) or isinstance(values, (str, bytes)) \
            or not hasattr(values, "__len__"):
        raise TypeError(f"{name} must be a sequence of 3 numbers (R, G, B), got "
                        f"{type(values).__name__} {values!r}")
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (R, G, B), got {len(values)}: {values!r}")
    return tuple(_checks.number(v, name) for v in values)


class Normalize(_Op):
    """(x - mean) / std per channel (ImageNet's by default). ``inplace`` is accepted for
    torchvision's signature; the result is always a new tensor."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, inplace=False):
        super().__init__()
        self.mean = _three(mean, "mean")
        self.std = _three(std, "std")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {std}")
        _checks.flag(inplace, "inplace")

    def _shown(self):
        return {"mean": self.mean, "std": self.std}

    def apply(self, x, p):
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def _fused(x):
    """Whether a call on x takes the Triton kernels: the dispatch point's choice, except on
    shape-only calls (meta tensors, tracing), which take the torch ops (shapes, dtypes and
    autograd as a real call's)."""
    from fastssl import _dispatch
    return _dispatch.backend(x) == "triton" and not _dispatch.shape_only((x,))


def _colour_args(n, device, jitter, gray, solarize):
    """The colour kernels' per-sample arguments: (order, factors, flags, enabled, threshold)."""
    zeros = torch.zeros(n, dtype=torch.int32, device=device)
    flags = torch.stack([item[1]["apply"].int() if item is not None else zeros
                         for item in (jitter, gray, solarize)], 1).contiguous()
    if jitter is not None:
        order = jitter[1]["order"].int().contiguous()
        factors = jitter[1]["factors"].float().contiguous()
        enabled = jitter[0].enabled
    else:
        order = torch.zeros(n, 4, dtype=torch.int32, device=device)
        factors = torch.ones(n, 4, device=device)
        enabled = [False] * 4
    threshold = solarize[0].threshold if solarize is not None else 0.5
    return order, factors, flags, enabled, threshold


def colour_ops(x, jitter=None, gray=None, solarize=None):
    """ColorJitter, then RandomGrayscale, then RandomSolarize — each an (op, params) pair or
    None — on float32 images (N, 3, H, W): one fused Triton pass where the dispatch picks
    the kernels, the ops one by one otherwise (the same semantics)."""
    from fastssl import _dispatch
    if _fused(x):
        return _dispatch.kernels("augment").colour(
            x.float(), *_colour_args(x.shape[0], x.device, jitter, gray, solarize))
    for item in (jitter, gray, solarize):
        if item is not None:
            x = item[0].apply(x, item[1])
    return x


def blur_finish(x, blur, solarize=None, normalize=None, dtype=torch.float32,
                channels_last=False):
    """GaussianBlur, then RandomSolarize, then Normalize (each an (op, params) pair or None
    except the blur), then the output dtype and memory format: two fused Triton passes
    (rows; columns + the rest) where the dispatch picks the kernels, ops one by one
    otherwise."""
    from fastssl import _dispatch
    op, pb = blur
    if not _fused(x):
        x = op.apply(x, pb)
        for item in (solarize, normalize):
            if item is not None:
                x = item[0].apply(x, item[1])
        return _finish(x, dtype, channels_last)
    n, _, H, W = x.shape
    sol = solarize[1]["apply"].int() if solarize is not None else \
        torch.zeros(n, dtype=torch.int32, device=x.device)
    flags = torch.stack([pb["apply"].int(), sol], 1).contiguous()
    mean = std = None
    if normalize is not None:
        mean = torch.tensor(normalize[0].mean, device=x.device, dtype=torch.float32)
        std = torch.tensor(normalize[0].std, device=x.device, dtype=torch.float32)
    out = torch.empty(n, 3, H, W, device=x.device, dtype=dtype,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    k_h, k_w = op.kernel_sizes(H, W)
    threshold = solarize[0].threshold if solarize is not None else 0.5
    return _dispatch.kernels("augment").blur_finish(
        x.float(), pb["sigma"].float().contiguous(), flags, k_h, k_w, mean, std, threshold, out)


# ----------------------------------------------------------------------------- views

_OPS = (RandomResizedCrop, RandomHorizontalFlip, ColorJitter, RandomGrayscale, GaussianBlur,
        RandomSolarize, Normalize)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_generator(generator):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")


def _flatten(ops, where="op"):
    """fastssl ops from ``ops``, with nested Augment, nn.Sequential and torchvision Compose
    chains spliced in (so that a composed pipeline keeps the fused kernels)."""
    flat = []
    for i, op in enumerate(ops):
        if isinstance(op, Augment):
            if op.dtype != torch.float32 or op.channels_last:
                raise ValueError(f"{where} {i}: a nested Augment with dtype or channels_last "
                                 "set; set them on the outer Augment")
            flat += list(op)
        elif isinstance(op, nn.Sequential):
            flat += _flatten(list(op), where)
        elif type(op).__name__ == "Compose" and isinstance(getattr(op, "transforms", None), list):
            flat += _flatten(op.transforms, where)
        elif isinstance(op, _OPS):
            flat.append(op)
        else:
            raise TypeError(f"{where} {i} must be one of {', '.join(k.__name__ for k in _OPS)} "
                            f"(or a chain of them), got {type(op).__name__}")
    return flat


def _colour_run(ops, params, i):
    """A ColorJitter, RandomGrayscale, RandomSolarize run (each optional, in this order)
    starting at op i: ({kind: (op, params)}, index after the run)."""
    run = {}
    for kind in (ColorJitter, RandomGrayscale, RandomSolarize):
        if i < len(ops) and isinstance(ops[i], kind):
            run[kind] = (ops[i], params[i])
            i += 1
    return run, i


def _finishing(rest):
    kinds = [type(op) for op in rest]
    return kinds in ([], [RandomSolarize], [Normalize], [RandomSolarize, Normalize])


def _sample(ops, sizes, generator):
    """Every op's per-sample parameters, in order; a crop sets the sizes after it."""
    params = []
    for op in ops:
        params.append(op.params(sizes, generator))
        if isinstance(op, RandomResizedCrop):
            sizes = torch.tensor(op.size, device=sizes.device).expand(sizes.shape[0], 2)
    return params


_CHUNK = 16 * 256 * 256  # input pixels per pass on the CPU: 16 images of 256², whose views
# stay in cache; small images go in one pass (a chunk's fixed per-op cost would dominate)


def _apply(ops, batch, params, dtype=torch.float32, channels_last=False):
    """The chain on a float32 batch; on the CPU's portable path, chunk by chunk of about
    ``_CHUNK`` input pixels (every op is per sample: the same values as in one pass)."""
    n = batch.shape[0]
    step = max(1, _CHUNK // max(1, batch.shape[-1] * batch.shape[-2]))
    if n <= step or batch.device.type != "cpu" or _fused(batch):
        return _apply_all(ops, batch, params, dtype, channels_last)
    parts = [_apply_all(ops, batch[a:a + step],
                        [{k: v[a:a + step] for k, v in p.items()} for p in params],
                        dtype, channels_last) for a in range(0, n, step)]
    return _finish(torch.cat(parts), dtype, channels_last)


def _apply_all(ops, batch, params, dtype=torch.float32, channels_last=False):
    """The chain on a float32 batch. Fused patterns (on the Triton path): crop
    [+ flip] [+ colour run] in one kernel; a colour run in one kernel; GaussianBlur
    [+ RandomSolarize] [+ Normalize] ending the chain in two passes with the output cast."""
    from fastssl import _dispatch
    x, i = batch, 0
    while i < len(ops):
        op = ops[i]
        if isinstance(op, RandomResizedCrop):
            pc, i = params[i], i + 1
            flip = None
            if i < len(ops) and isinstance(ops[i], RandomHorizontalFlip):
                flip, i = params[i]["apply"], i + 1
            run, after = _colour_run(ops, params, i)
            if run and _fused(x):
                if flip is None:
                    flip = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
                args = _colour_args(x.shape[0], x.device, run.get(ColorJitter),
                                    run.get(RandomGrayscale), run.get(RandomSolarize))
                x = _dispatch.kernels("augment").resize(
                    x, pc["top"], pc["left"], pc["height"], pc["width"], flip, op.size,
                    colour=args)
                i = after
            else:
                x = op.apply(x, pc, flip)
            continue
        run, after = _colour_run(ops, params, i)
        if run:
            x = colour_ops(x, run.get(ColorJitter), run.get(RandomGrayscale),
                           run.get(RandomSolarize))
            i = after
        elif isinstance(op, GaussianBlur) and _finishing(ops[i + 1:]):
            tail = dict(zip([type(o) for o in ops[i + 1:]], zip(ops[i + 1:], params[i + 1:])))
            return blur_finish(x, (op, params[i]), tail.get(RandomSolarize), tail.get(Normalize),
                               dtype, channels_last)
        else:
            x = op.apply(x, params[i])
            i += 1
    return _finish(x, dtype, channels_last)


def _finish(x, dtype, channels_last):
    """The output dtype and memory format (contiguous NCHW or channels-last)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.to(dtype).contiguous(memory_format=fmt)


def _prepare(images, generator, return_params, channels_last_input):
    """(float32 batch, sizes, whether one (C, H, W) image came in, image sizes all equal)."""
    _check_generator(generator)
    _checks.flag(return_params, "return_params")
    single = isinstance(images, torch.Tensor) and images.dim() == 3
    batch, sizes = as_batch(images[None] if single else images, channels_last_input)
    uniform = not isinstance(images, (list, tuple)) or len(
        {tuple(im.shape[-2:]) for im in images}) == 1
    return batch, sizes, single, uniform


def _check_sizes(ops, uniform):
    if not uniform and not isinstance(ops[0], RandomResizedCrop):
        raise ValueError("images of different sizes need a RandomResizedCrop as the first op "
                         f"(the first op is {type(ops[0]).__name__})")


def _pipeline(ops, images, generator=None, return_params=False, channels_last_input=False,
              dtype=torch.float32, channels_last=False):
    batch, sizes, single, uniform = _prepare(images, generator, return_params,
                                             channels_last_input)
    _check_sizes(ops, uniform)
    params = _sample(ops, sizes, generator)
    out = _apply(ops, batch, params, dtype, channels_last)
    out = out[0] if single else out
    if not any(isinstance(op, Normalize) for op in ops):
        _mark_in_range(out)
    return (out, params) if return_params else out


class Augment(nn.Sequential):
    """One random view: a chain of ops in any order (with or without a crop), an
    ``nn.Sequential`` whose call takes the generator and fuses what it can.

    ``view = Augment(op, ...)(images, generator=g)``; ``return_params=True`` also returns
    the per-sample parameters (a dict per op) for inspection or replay with ``apply``.
    Nested Augment / nn.Sequential / torchvision Compose chains of fastssl ops are spliced
    in. ``dtype`` and ``channels_last`` set the output's dtype and memory format.
    """

    def __init__(self, *ops, dtype=torch.float32, channels_last=False):
        flat = _flatten(ops)
        if not flat:
            raise ValueError("Augment needs at least one op")
        if dtype not in _DTYPES:
            raise ValueError(f"output dtype must be float32, bfloat16 or float16, got {dtype}")
        channels_last = _checks.flag(channels_last, "channels_last")
        super().__init__(*flat)
        self.dtype, self.channels_last = dtype, channels_last

    @property
    def ops(self):
        return list(self)

    def extra_repr(self):
        shown = []
        if self.dtype != torch.float32:
            shown.append(f"dtype={self.dtype}")
        if self.channels_last:
            shown.append("channels_last=True")
        return ", ".join(shown)

    def sample(self, sizes, generator=None):
        return _sample(self.ops, sizes, generator)

    def apply(self, batch, params):
        return _apply(self.ops, batch, params, self.dtype, self.channels_last)

    def forward(self, images, generator=None, return_params=False, channels_last_input=False):
        return _pipeline(self.ops, images, generator, return_params, channels_last_input,
                         self.dtype, self.channels_last)


def _recipe(size, scale, jitter, blur_p, solarize_p, normalize=True, flip_p=0.5, **kw):
    blur_p, solarize_p = _check_p("blur_p", blur_p), _check_p("solarize_p", solarize_p)
    normalize = _checks.flag(normalize, "normalize")
    if isinstance(jitter, (str, bytes)) or not hasattr(jitter, "__len__") or len(jitter) != 4:
        raise ValueError(f"jitter must be 4 numbers (brightness, contrast, saturation, hue), "
                         f"got {jitter!r}")
    ops = [RandomResizedCrop(size, scale=scale), RandomHorizontalFlip(flip_p),
           ColorJitter(*jitter, p=0.8), RandomGrayscale(0.2)]
    if blur_p > 0:
        ops.append(GaussianBlur(p=blur_p))
    if solarize_p > 0:
        ops.append(RandomSolarize(p=solarize_p))
    if normalize:
        ops.append(Normalize())
    return Augment(*ops, **kw)


class MultiView(nn.Module):
    """Several views of the same images: ``__call__`` returns a list of tensors (and, with
    ``return_params=True``, each view's parameters)."""

    def __init__(self, views, name="MultiView"):
        super().__init__()
        views = list(views)
        for i, v in enumerate(views):
            if not isinstance(v, Augment):
                raise TypeError(f"view {i} must be an Augment, got {type(v).__name__}")
        self.views = nn.ModuleList(views)
        self.name = name

    def _get_name(self):
        return self.name

    def forward(self, images, generator=None, return_params=False, channels_last_input=False):
        batch, sizes, single, uniform = _prepare(images, generator, return_params,
                                                 channels_last_input)
        outs, params = [], []
        for v in self.views:
            _check_sizes(v.ops, uniform)
            p = v.sample(sizes, generator)
            out = v.apply(batch, p)
            outs.append(out[0] if single else out)
            params.append(p)
        return (outs, params) if return_params else outs


def SimCLRAugment(size=224, scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5, **kw):
    """SimCLR: two views, colour jitter 0.8 strength, blur p = 0.5."""
    return MultiView([_recipe(size, scale, jitter, blur_p, 0.0, **kw) for _ in range(2)],
                     "SimCLRAugment")


def BYOLAugment(size=224, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), **kw):
    """BYOL (also Barlow Twins, VICReg): asymmetric views — blur 1.0 / 0.1, solarize 0 / 0.2."""
    return MultiView([_recipe(size, scale, jitter, 1.0, 0.0, **kw),
                      _recipe(size, scale, jitter, 0.1, 0.2, **kw)], "BYOLAugment")


BarlowTwinsAugment = BYOLAugment
VICRegAugment = BYOLAugment


def MoCoV2Augment(size=224, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5, **kw):
    """MoCo v2: two views, crop scale (0.2, 1), blur p = 0.5."""
    return MultiView([_recipe(size, scale, jitter, blur_p, 0.0, **kw) for _ in range(2)],
                     "MoCoV2Augment")


def DINOAugment(global_size=224, local_size=96, n_local=8, global_scale=(0.4, 1.0),
                local_scale=(0.05, 0.4), jitter=(0.4, 0.4, 0.2, 0.1), **kw):
    """DINO: 2 global views (blur 1.0 / 0.1, solarize 0 / 0.2) + n_local local views (blur 0.5)."""
    n_local = _checks.integer(n_local, "n_local", lo=0)
    views = [_recipe(global_size, global_scale, jitter, 1.0, 0.0, **kw),
             _recipe(global_size, global_scale, jitter, 0.1, 0.2, **kw)]
    views += [_recipe(local_size, local_scale, jitter, 0.5, 0.0, **kw) for _ in range(n_local)]
    return MultiView(views, "DINOAugment")
