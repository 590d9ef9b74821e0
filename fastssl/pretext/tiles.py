"""Pretext tasks on tiles and whole images: RotNet's rotations, jigsaw puzzles over a fixed
permutation set (Noroozi and Favaro) and relative patch position (Doersch et al.); see
``fastssl.pretext``."""
import functools
import itertools
import math

import torch

from fastssl import _checks

from ._common import _float, _generator, _images, _randint, _replayed


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
    """Shuffled tiles and the permutation's index (``fastssl.pretext``).

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
