"""Pretext tasks on the device, per sample, with their labels: RotNet's rotations, jigsaw
puzzles over a fixed permutation set, and relative patch position.

Every transform takes an image batch (N, C, H, W) (uint8 or floating), draws its
randomness for the whole batch at once from ``generator=`` (a ``torch.Generator`` on the
images' device; the default generator when None), uses only gathers, flips and
transposes (no interpolation: a rotated or cropped pixel is an input pixel), and returns
``(inputs, labels)``, and with ``return_params=True`` a dict of what it drew (every entry
one row per image). ``jigsaw`` and ``relative_patches`` replay such a dict given as
``params=`` (drawing nothing), so the parameters of a global batch can be drawn once, on a
stand-in batch of its shape (e.g. ``torch.zeros(()).expand(rows, C, H, W)``), and each
process replays its own rows.

- ``rotations(images)``: RotNet: every image in its four rotations by k x 90 degrees
  counter-clockwise (``torch.rot90``, exact), image-major, labels k = 0..3.
- ``jigsaw_permutations(count, cells, generator)``: Noroozi and Favaro's permutation set:
  from every permutation of the cells, greedily the one with the largest mean Hamming
  distance to those chosen so far (the first drawn at random); with the set's minimum
  pairwise Hamming distance.
- ``jigsaw(images, permutations, grid, tile)``: the image cut into grid x grid cells, in
  each a tile x tile crop at a random offset inside its cell (the gap and jitter that stop
  edge continuity from giving the answer), each tile standardised on its own (per tile and
  channel: mean 0, std 1), the tiles put in the order of a random permutation of the set:
  ``(N, grid**2, C, tile, tile)`` and the permutation's index.
- ``relative_patches(images, patch, gap, jitter)``: Doersch et al.: a centre patch and
  one of its 8 neighbours (label 0..7, raster order around the centre) a ``gap`` apart,
  each displaced by up to ``jitter`` pixels; optional colour dropping against the
  chromatic-aberration shortcut (one random channel kept, the others replaced by noise).
- ``region_mask(batch, size, kind, fraction)`` and ``inpainting_loss(pred, images, mask)``:
  the context encoder's hole (the central square, or one square at a random place per
  image) and its L2 over the hole's pixels.
- ``corrupt(images, kind, amount)``: a denoising autoencoder's input: additive Gaussian
  noise, or masking noise (each pixel zeroed with probability ``amount``).
- Colorization (Zhang et al.), deterministic: ``rgb_to_lab`` / ``lab_to_rgb`` (sRGB <-> CIE
  L*a*b* with kornia's and scikit-image's constants: D65 white (0.95047, 1, 1.08883) of the
  2-degree observer, the BT.709 sRGB matrix, the sRGB curve's knee 0.04045, Lab's
  eps = 0.008856 and slope 7.787; exact round trip), ``ab_bins`` (fastssl's 261 ab bins: the
  points of the grid of 10 that 8-bit sRGB colours reach), ``nearest_bin``, ``soft_encode``
  (5 nearest bins, Gaussian sigma = 5), ``rebalance_weights`` (the smoothed prior mixed with
  the uniform, inverted), ``annealed_mean`` (decoding at T = 0.38) and ``colorization_loss``
  (the rebalanced soft-target cross-entropy, O(N H W k) memory beyond the logits).
"""
import functools
import itertools
import math

import torch

from fastssl import _checks

__all__ = ["rotations", "jigsaw_permutations", "jigsaw", "relative_patches", "region_mask",
           "inpainting_loss", "corrupt", "rgb_to_lab", "lab_to_rgb", "ab_bins", "nearest_bin",
           "soft_encode", "rebalance_weights", "annealed_mean", "colorization_loss"]


def _images(images, name="images"):
    _checks.tensor(images, name)
    if images.dim() != 4:
        raise _checks.ShapeError(f"{name} must be a (N, C, H, W) batch, got shape "
                                 f"{tuple(images.shape)}")
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise ValueError(f"{name} must be uint8 or floating, got {images.dtype}")
    return images


def _generator(generator, device):
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got "
                            f"{type(generator).__name__}")
        if generator.device.type != torch.device(device).type:
            raise ValueError(f"the generator is on {generator.device}, the images on {device}")
    return generator


def _float(x):
    """float64 stays float64; every other dtype becomes float32."""
    return x.double() if x.dtype == torch.float64 else x.float()


def _replayed(params, key, shape, hi, what, device):
    """``params[key]``: an integer tensor of ``shape`` with values in [0, hi] (``hi`` a
    number or a tensor broadcast against it), as int64 on ``device``."""
    if not isinstance(params, dict) or key not in params:
        raise ValueError(f"params must be the dict of a return_params=True call ({what}), "
                         f"missing {key!r}")
    v = _checks.tensor(params[key], f"params[{key!r}]")
    if v.is_floating_point() or v.dtype == torch.bool or tuple(v.shape) != tuple(shape):
        raise _checks.ShapeError(f"params[{key!r}] must be integer {tuple(shape)}, got "
                                 f"{v.dtype} {tuple(v.shape)}")
    v = v.long().to(device)
    if _checks.has_values(v) and v.numel() and bool(((v < 0) | (v > hi)).any()):
        raise ValueError(f"params[{key!r}] lies outside {what}")
    return v


def _randint(high, n, generator, device):
    """n integers uniform in [0, high), int64."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return torch.floor(u * high).long().clamp_max(high - 1)


# ----------------------------------------------------------------------------- RotNet

def rotations(images):
    """(4N, C, H, W) rotated images and (4N,) int64 labels: image i's rotation by k x 90
    degrees counter-clockwise at row 4 i + k (square images: a quarter turn keeps the
    shape)."""
    _images(images)
    n, c, h, w = images.shape
    if h != w:
        raise _checks.ShapeError(f"rotations need square images (a quarter turn swaps the "
                                 f"sides), got {h} x {w}")
    out = torch.stack([torch.rot90(images, k, dims=(2, 3)) for k in range(4)], 1)
    labels = torch.arange(4, device=images.device).repeat(n)
    return out.reshape(4 * n, c, h, w), labels


# ----------------------------------------------------------------------------- jigsaw

def _hamming_to(perms, p):
    return (perms != p).sum(1)


def jigsaw_permutations(count=1000, cells=9, generator=None):
    """(count, cells) int64: Noroozi and Favaro's greedy set. The first permutation is drawn
    uniformly (``generator``, CPU); each next one is, among all cells! permutations, the
    one with the largest mean Hamming distance to the chosen ones (the first such in
    lexicographic order). Returns ``(permutations, min_distance)``: the set and its smallest
    pairwise Hamming distance (an int)."""
    count = _checks.integer(count, "count", lo=1)
    cells = _checks.integer(cells, "cells", lo=2)
    if cells > 10:
        raise ValueError(f"cells = {cells}: {cells}! permutations are too many to search")
    total = math.factorial(cells)
    if count > total:
        raise ValueError(f"count = {count} exceeds the {total} permutations of {cells} cells")
    first = int(torch.randint(total, (1,), generator=_generator(generator, "cpu")))
    out = _greedy(count, cells, first).clone()
    if count == 1:
        return out, cells
    d = (out[:, None, :] != out[None, :, :]).sum(2)
    d.fill_diagonal_(cells + 1)
    return out, int(d.min())


@functools.lru_cache(maxsize=8)
def _greedy(count, cells, first):
    """The greedy selection from permutation ``first`` (lexicographic index), cached: the
    1000-permutation search over 9! takes seconds."""
    total = math.factorial(cells)
    perms = torch.tensor(list(itertools.permutations(range(cells))), dtype=torch.int8)
    chosen = [first]
    dist_sum = _hamming_to(perms, perms[first]).long()
    taken = torch.zeros(total, dtype=torch.bool)
    taken[first] = True
    for _ in range(1, count):
        score = torch.where(taken, -1, dist_sum)
        nxt = int(score.argmax())
        chosen.append(nxt)
        taken[nxt] = True
        dist_sum += _hamming_to(perms, perms[nxt])
    return perms[chosen].long()


def _standardise(tiles, eps=1e-5):
    """Each tile and channel to mean 0, std 1 (over its pixels), in float32 (float64 for
    float64 tiles)."""
    t = _float(tiles)
    mean = t.mean((-2, -1), keepdim=True)
    std = t.std((-2, -1), keepdim=True, unbiased=False)
    return (t - mean) / (std + eps)


def _crop(images, which, top, left, size):
    """(M, C, size, size): the crops of images[which[m]] at (top[m], left[m]), one gather
    (exact; no copy of the images)."""
    ar = torch.arange(size, device=images.device)
    r = top[:, None] + ar
    q = left[:, None] + ar
    return images[which[:, None, None], :, r[:, :, None], q[:, None, :]].permute(0, 3, 1, 2)


def jigsaw(images, permutations, grid=3, tile=None, normalize=True, generator=None,
           return_params=False, params=None):
    """Shuffled tiles and the permutation's index (module docstring).

    ``images`` (N, C, H, W) with H, W >= grid; the cells are (H // grid) x (W // grid)
    (the remainder at the bottom and right unused); ``tile`` (default: 0.75 of the smaller
    cell side, at least 1) must fit a cell. ``permutations`` (P, grid**2) from
    ``jigsaw_permutations``. Tile j of the output is the cell ``permutations[label][j]``
    (raster order). Returns ``(tiles (N, grid**2, C, tile, tile), labels (N,))``, float32
    (float64 for float64 images) standardised per tile (``normalize``) or the input dtype;
    with ``return_params`` also ``{"offsets": (N, grid**2, 2) (top, left) inside each cell,
    "labels": (N,)}``; ``params`` (such a dict) replays its offsets and labels."""
    _images(images)
    grid = _checks.integer(grid, "grid", lo=1)
    cells = grid * grid
    _checks.tensor(permutations, "permutations")
    if permutations.dim() != 2 or permutations.shape[1] != cells or permutations.shape[0] < 1:
        raise _checks.ShapeError(f"permutations must be (P >= 1, grid**2 = {cells}), got "
                                 f"{tuple(permutations.shape)}")
    perm = permutations.to(images.device).long()
    if not torch.equal(perm.sort(1).values,
                       torch.arange(cells, device=perm.device).expand_as(perm)):
        raise ValueError("every row of permutations must be a permutation of 0 .. grid**2 - 1")
    n, c, h, w = images.shape
    ch, cw = h // grid, w // grid
    if ch < 1 or cw < 1:
        raise _checks.ShapeError(f"images of {h} x {w} cannot be cut into {grid} x {grid} cells")
    tile = max(1, int(0.75 * min(ch, cw))) if tile is None else _checks.integer(tile, "tile", lo=1)
    if tile > min(ch, cw):
        raise ValueError(f"tile = {tile} does not fit a {ch} x {cw} cell")
    g = _generator(generator, images.device)
    if params is None:
        labels = _randint(perm.shape[0], n, g, images.device)
        off_r = _randint(ch - tile + 1, n * cells, g, images.device).reshape(n, cells)
        off_c = _randint(cw - tile + 1, n * cells, g, images.device).reshape(n, cells)
    else:
        dev = images.device
        labels = _replayed(params, "labels", (n,), perm.shape[0] - 1, "the permutation set",
                           dev)
        limit = torch.tensor([ch - tile, cw - tile], device=dev)
        off = _replayed(params, "offsets", (n, cells, 2), limit,
                        f"the {ch} x {cw} cells for {tile}-pixel tiles", dev)
        off_r, off_c = off[..., 0], off[..., 1]
    cell = torch.arange(cells, device=images.device)
    top = (cell // grid) * ch + off_r                                         # (N, cells)
    left = (cell % grid) * cw + off_c
    order = perm[labels]                                                      # (N, cells)
    src_top, src_left = top.gather(1, order), left.gather(1, order)
    which = torch.arange(n, device=images.device).repeat_interleave(cells)
    tiles = _crop(images, which, src_top.reshape(-1), src_left.reshape(-1), tile)
    tiles = tiles.reshape(n, cells, c, tile, tile)
    if normalize:
        tiles = _standardise(tiles)
    if not return_params:
        return tiles, labels
    return tiles, labels, {"offsets": torch.stack([off_r, off_c], 2), "labels": labels}


# ----------------------------------------------------------------------------- patch position

# the 8 neighbours around the centre, raster order: (row step, column step)
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def relative_patches(images, patch, gap=None, jitter=None, color_drop=False, noise_std=0.01,
                     generator=None, return_params=False, params=None):
    """Doersch et al.'s relative position task: ``(centre, neighbour, label)``.

    Per image: the centre patch (``patch`` x ``patch``) at a random place that leaves room
    for its 8 neighbours, a neighbour direction ``label`` in 0..7 (``NEIGHBOURS``, raster
    order), the neighbour ``patch + gap`` pixels away in that direction (``gap`` default:
    patch // 2), each patch displaced by up to ``jitter`` pixels in each axis (default:
    patch // 8). With ``color_drop`` each patch keeps one random channel and the others
    become Gaussian noise of ``noise_std`` times the patch's std (the chromatic-aberration
    guard). Returns float32 patches (float64 for float64 images) (N, C, patch, patch) twice
    and int64 labels; with ``return_params`` also ``{"labels": (N,), "centre": (N, 2),
    "neighbour": (N, 2)`` (the corners), ``"kept": (N, 2)`` (each patch's kept channel, -1
    without colour dropping) and, with colour dropping, ``"noise": (N, 2, C, patch, patch)``
    (the standard normal draws)``}``; ``params`` (such a dict) replays them."""
    _images(images)
    patch = _checks.integer(patch, "patch", lo=1)
    gap = patch // 2 if gap is None else _checks.integer(gap, "gap", lo=0)
    jitter = patch // 8 if jitter is None else _checks.integer(jitter, "jitter", lo=0)
    color_drop = _checks.flag(color_drop, "color_drop")
    noise_std = _checks.number(noise_std, "noise_std", lo=0.0)
    n, c, h, w = images.shape
    span = 2 * (patch + gap) + patch + 2 * jitter  # the 3 x 3 layout, jitter on both sides
    if span > min(h, w):
        raise ValueError(f"patch {patch}, gap {gap} and jitter {jitter} need images of at "
                         f"least {span} x {span}, got {h} x {w}")
    g = _generator(generator, images.device)
    drop = color_drop and c > 1
    drawn = _draw_patches(images.shape, patch, gap, jitter, drop, g, images.device) \
        if params is None else _replay_patches(params, images.shape, patch, drop, images.device)
    every = torch.arange(n, device=images.device)
    a, b = (_float(_crop(images, every, drawn[k][:, 0], drawn[k][:, 1], patch))
            for k in ("centre", "neighbour"))
    if drop:
        a, b = (_drop_colour(x, drawn["kept"][:, j], drawn["noise"][:, j], noise_std)
                for j, x in enumerate((a, b)))
    if not return_params:
        return a, b, drawn["labels"]
    return a, b, drawn["labels"], drawn


def _draw_patches(shape, patch, gap, jitter, drop, g, dev):
    """The random draws of ``relative_patches`` (its ``return_params`` dict)."""
    n, c, h, w = shape
    step = patch + gap
    span = 2 * step + patch + 2 * jitter
    label = _randint(8, n, g, dev)
    base_r = step + jitter + _randint(h - span + 1, n, g, dev)
    base_c = step + jitter + _randint(w - span + 1, n, g, dev)
    jit = (_randint(2 * jitter + 1, 4 * n, g, dev) - jitter).reshape(4, n)
    steps = torch.tensor(NEIGHBOURS, device=dev)[label]                        # (N, 2)
    out = {"labels": label,
           "centre": torch.stack([base_r + jit[0], base_c + jit[1]], 1),
           "neighbour": torch.stack([base_r + steps[:, 0] * step + jit[2],
                                     base_c + steps[:, 1] * step + jit[3]], 1),
           "kept": torch.full((n, 2), -1, dtype=torch.int64, device=dev)}
    if drop:
        keep, noise = [], []
        for _ in range(2):
            keep.append(_randint(c, n, g, dev))
            noise.append(torch.randn((n, c, patch, patch), generator=g, device=dev))
        out["kept"], out["noise"] = torch.stack(keep, 1), torch.stack(noise, 1)
    return out


def _replay_patches(params, shape, patch, drop, dev):
    """A ``return_params`` dict of ``relative_patches``, checked against the images."""
    n, c, h, w = shape
    what = f"{h} x {w} images for {patch}-pixel patches"
    corner = torch.tensor([h - patch, w - patch], device=dev)
    out = {"labels": _replayed(params, "labels", (n,), 7, "the 8 directions", dev),
           "centre": _replayed(params, "centre", (n, 2), corner, what, dev),
           "neighbour": _replayed(params, "neighbour", (n, 2), corner, what, dev),
           "kept": torch.full((n, 2), -1, dtype=torch.int64, device=dev)}
    if drop:
        out["kept"] = _replayed(params, "kept", (n, 2), c - 1, f"the {c} channels", dev)
        noise = params.get("noise")
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or \
                tuple(noise.shape) != (n, 2, c, patch, patch):
            raise _checks.ShapeError(f"params['noise'] must be floating {(n, 2, c, patch, patch)}"
                                     f" (colour dropping), got {getattr(noise, 'shape', noise)}")
        out["noise"] = noise.to(dev)
    return out


def _drop_colour(x, keep, noise, noise_std):
    """Channel ``keep[i]`` of patch i kept, the others ``noise`` x the patch's std x
    ``noise_std``."""
    std = x.std((1, 2, 3), keepdim=True, unbiased=False)
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None] == \
        keep[:, None, None, None]
    return torch.where(chan, x, noise.to(x.dtype) * std * noise_std)


# ----------------------------------------------------------------------------- inpainting

def region_mask(batch, size, kind="center", fraction=0.5, generator=None, device=None):
    """bool (batch, H, W), True = the hole: a square of side round(fraction x min(H, W))
    (the context encoder's 0.5: a quarter of the area), at the centre (``kind="center"``)
    or at a uniform place inside the image per image (``"random"``)."""
    batch = _checks.integer(batch, "batch", lo=1)
    h, w = _checks.size2(size, "size")
    kind = _checks.choice(kind, "kind", ("center", "random"))
    fraction = _checks.number(fraction, "fraction", lo=0.0, hi=1.0)
    dev = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    g = _generator(generator, dev)
    side = int(round(fraction * min(h, w)))
    if kind == "center":
        top = torch.full((batch,), (h - side) // 2, device=dev)
        left = torch.full((batch,), (w - side) // 2, device=dev)
    else:
        top, left = _randint(h - side + 1, batch, g, dev), _randint(w - side + 1, batch, g, dev)
    # the rows and columns inside the square, then their outer product: one pass over H x W
    r = (torch.arange(h, device=dev)[None, :] - top[:, None]).to(torch.int64)
    c = (torch.arange(w, device=dev)[None, :] - left[:, None]).to(torch.int64)
    rows, cols = (r >= 0) & (r < side), (c >= 0) & (c < side)
    return rows[:, :, None] & cols[:, None, :]


def inpainting_loss(pred, images, mask):
    """The context encoder's reconstruction loss: mean over the hole's pixels and channels
    of (pred - target)^2, the target the images as float (uint8 scaled to [0, 1]); 0 with a
    zero gradient where no image has a hole. ``pred`` (N, C, H, W) like the images, ``mask``
    bool (N, H, W) from ``region_mask``."""
    _images(images)
    _checks.floating(pred, "pred")
    if pred.shape != images.shape:
        raise _checks.ShapeError(f"pred {tuple(pred.shape)} must have the images' shape "
                                 f"{tuple(images.shape)}")
    n, c, h, w = images.shape
    _checks.tensor(mask, "mask")
    if mask.dtype != torch.bool or mask.shape != (n, h, w):
        raise _checks.ShapeError(f"mask must be bool ({n}, {h}, {w}), got {mask.dtype} "
                                 f"{tuple(mask.shape)}")
    target = images.float() / 255 if images.dtype == torch.uint8 else images
    err = (pred - target.to(pred.dtype)).pow(2) * mask[:, None].to(pred.dtype)
    count = mask.sum() * c
    return err.sum() / count.clamp(min=1).to(pred.dtype)


# ----------------------------------------------------------------------------- denoising

def corrupt(images, kind="gaussian", amount=0.1, generator=None):
    """A denoising autoencoder's input, float32 (uint8 scaled to [0, 1]): ``"gaussian"``
    adds N(0, amount^2) noise to every pixel; ``"masking"`` zeroes each pixel (all its
    channels) with probability ``amount``. Returns (corrupted, kept): kept is the bool
    (N, H, W) mask of untouched pixels ("masking"; all True for "gaussian")."""
    _images(images)
    kind = _checks.choice(kind, "kind", ("gaussian", "masking"))
    amount = _checks.number(amount, "amount", lo=0.0)
    if kind == "masking" and amount > 1:
        raise ValueError(f"masking noise takes a probability in [0, 1], got {amount}")
    g = _generator(generator, images.device)
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    n, c, h, w = x.shape
    if kind == "gaussian":
        noise = torch.randn(x.shape, generator=g, device=x.device)
        return x + amount * noise, torch.ones(n, h, w, dtype=torch.bool, device=x.device)
    kept = torch.rand(n, h, w, generator=g, device=x.device) >= amount
    return x * kept[:, None], kept


# ----------------------------------------------------------------------------- colorization
#
# Zhang et al.'s "Colorful Image Colorization": predict an image's a*b* from its L* as a
# distribution over quantised ab bins. The colour constants are kornia's and scikit-image's
# (module docstring); the bins are fastssl's own, derived from the sRGB gamut.

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

    Per pixel, with kornia's and scikit-image's constants (module docstring):
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
