"""Pretext tasks on the device, per sample, with their labels: RotNet's rotations, jigsaw
puzzles over a fixed permutation set, and relative patch position (``tiles``); the context
encoder's hole and a denoising autoencoder's noise (``corruption``); colorization (``colour``).

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
from .colour import (AB_GRID, ab_bins, annealed_mean, colorization_loss, lab_to_rgb,  # noqa: F401
                     nearest_bin, rebalance_weights, rgb_to_lab, soft_encode)
from .corruption import corrupt, inpainting_loss, region_mask
from .tiles import NEIGHBOURS, jigsaw, jigsaw_permutations, relative_patches, rotations  # noqa: F401

__all__ = ["rotations", "jigsaw_permutations", "jigsaw", "relative_patches", "region_mask",
           "inpainting_loss", "corrupt", "rgb_to_lab", "lab_to_rgb", "ab_bins", "nearest_bin",
           "soft_encode", "rebalance_weights", "annealed_mean", "colorization_loss"]
