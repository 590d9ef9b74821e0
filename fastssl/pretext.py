"""Pretext tasks on the device, per sample, with their labels: RotNet's rotations, jigsaw
puzzles over a fixed permutation set, and relative patch position.

Every transform takes an image batch (N, C, H, W) (uint8 or floating), draws its
randomness for the whole batch at once from ``generator=`` (a ``torch.Generator`` on the
images' device; the default generator when None), uses only gathers, flips and
transposes (no interpolation: a rotated or cropped pixel is an input pixel), and returns
``(inputs, labels)``, and with ``return_params=True`` a dict of what it drew.

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
"""
import functools
import itertools
import math

import torch

from fastssl import _checks

__all__ = ["rotations", "jigsaw_permutations", "jigsaw", "relative_patches", "region_mask",
           "inpainting_loss", "corrupt"]


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
    """Each tile and channel to mean 0, std 1 (over its pixels), in float32."""
    t = tiles.float()
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
           return_params=False):
    """Shuffled tiles and the permutation's index (module docstring).

    ``images`` (N, C, H, W) with H, W >= grid; the cells are (H // grid) x (W // grid)
    (the remainder at the bottom and right unused); ``tile`` (default: 0.75 of the smaller
    cell side, at least 1) must fit a cell. ``permutations`` (P, grid**2) from
    ``jigsaw_permutations``. Tile j of the output is the cell ``permutations[label][j]``
    (raster order). Returns ``(tiles (N, grid**2, C, tile, tile), labels (N,))``, float32
    standardised per tile (``normalize``) or the input dtype; with ``return_params`` also
    ``{"offsets": (N, grid**2, 2) (top, left) inside each cell, "labels": ...}``."""
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
    labels = _randint(perm.shape[0], n, g, images.device)
    off_r = _randint(ch - tile + 1, n * cells, g, images.device).reshape(n, cells)
    off_c = _randint(cw - tile + 1, n * cells, g, images.device).reshape(n, cells)
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
                     generator=None, return_params=False):
    """Doersch et al.'s relative position task: ``(centre, neighbour, label)``.

    Per image: the centre patch (``patch`` x ``patch``) at a random place that leaves room
    for its 8 neighbours, a neighbour direction ``label`` in 0..7 (``NEIGHBOURS``, raster
    order), the neighbour ``patch + gap`` pixels away in that direction (``gap`` default:
    patch // 2), each patch displaced by up to ``jitter`` pixels in each axis (default:
    patch // 8). With ``color_drop`` each patch keeps one random channel and the others
    become Gaussian noise of ``noise_std`` times the patch's std (the chromatic-aberration
    guard). Returns float32 patches (N, C, patch, patch) twice and int64 labels; with
    ``return_params`` also the drawn ``centre`` and ``neighbour`` corners (N, 2) and ``kept``
    channels (N, 2) (-1 without colour dropping)."""
    _images(images)
    patch = _checks.integer(patch, "patch", lo=1)
    gap = patch // 2 if gap is None else _checks.integer(gap, "gap", lo=0)
    jitter = patch // 8 if jitter is None else _checks.integer(jitter, "jitter", lo=0)
    color_drop = _checks.flag(color_drop, "color_drop")
    noise_std = _checks.number(noise_std, "noise_std", lo=0.0)
    n, c, h, w = images.shape
    step = patch + gap
    span = 2 * step + patch + 2 * jitter  # the 3 x 3 layout with jitter on both sides
    if span > min(h, w):
        raise ValueError(f"patch {patch}, gap {gap} and jitter {jitter} need images of at "
                         f"least {span} x {span}, got {h} x {w}")
    g = _generator(generator, images.device)
    dev = images.device
    label = _randint(8, n, g, dev)
    base_r = step + jitter + _randint(h - span + 1, n, g, dev)
    base_c = step + jitter + _randint(w - span + 1, n, g, dev)
    jit = (_randint(2 * jitter + 1, 4 * n, g, dev) - jitter).reshape(4, n)
    steps = torch.tensor(NEIGHBOURS, device=dev)[label]                        # (N, 2)
    centre = torch.stack([base_r + jit[0], base_c + jit[1]], 1)
    neigh = torch.stack([base_r + steps[:, 0] * step + jit[2],
                         base_c + steps[:, 1] * step + jit[3]], 1)
    every = torch.arange(n, device=dev)
    a = _crop(images, every, centre[:, 0], centre[:, 1], patch).float()
    b = _crop(images, every, neigh[:, 0], neigh[:, 1], patch).float()
    kept = torch.full((n, 2), -1, dtype=torch.int64, device=dev)
    if color_drop and c > 1:
        out = []
        for j, x in enumerate((a, b)):
            keep = _randint(c, n, g, dev)
            kept[:, j] = keep
            std = x.std((1, 2, 3), keepdim=True, unbiased=False)
            noise = torch.randn(x.shape, generator=g, device=dev) * std * noise_std
            chan = torch.arange(c, device=dev)[None, :, None, None] == keep[:, None, None, None]
            out.append(torch.where(chan, x, noise))
        a, b = out
    if not return_params:
        return a, b, label
    return a, b, label, {"centre": centre, "neighbour": neigh, "kept": kept}


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
    r = torch.arange(h, device=dev)[None, :, None]
    c = torch.arange(w, device=dev)[None, None, :]
    t, lft = top[:, None, None], left[:, None, None]
    return (r >= t) & (r < t + side) & (c >= lft) & (c < lft + side)


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
