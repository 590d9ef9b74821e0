"""Token and patch masks for masked image modelling, drawn for a whole batch at once.

Every generator works on the device it is given (``device=``, or the device of the tensor
it reads), draws its randomness only from ``generator=`` (a ``torch.Generator``; the
default generator when None), so a seeded generator gives the same masks on every call, and
handles the batch with tensor operations: there is no Python loop over images.

- ``random_token_mask(size, mask_ratio, mask_class_token)``: lightly's index masks over a
  sequence whose token 0 is the class token -> ``(idx_keep, idx_mask)``.
- ``random_masking(size_or_tokens, ratio)`` / ``mae_random_masking(x, ratio)``: MAE's
  per-sample shuffle -> ``(ids_keep, mask, ids_restore)`` / ``(x_masked, mask, ids_restore)``,
  with ``get_at_index``, ``set_at_index`` and ``unshuffle`` (the decoder's un-shuffle).
- ``block_mask(batch, grid, ratio)``: BEiT / iBOT block-wise masks, bool ``(batch, h, w)``.
- ``simmim_mask(batch, input_size, mask_patch_size, model_patch_size, ratio)``: SimMIM's
  cell mask upsampled to the model's patch grid, bool ``(batch, H', W')``.
- ``multiblock_masks(batch, grid, ...)``: I-JEPA's context and target blocks as index
  lists ``(context_idx, target_idx)``, with the paper's settings as defaults and placement
  free of the reference collator's positional bias (see its docstring).
- ``masked_patch_loss(pred, images, mask, patch_size)``: MAE's norm-pix reconstruction loss
  (and SimMIM's L1, smooth-L1) over the masked patches, the targets read straight from the
  images by a fused kernel (kernels/masked.py).
- ``masked_latent_loss(pred, targets, mask)``: I-JEPA's and data2vec's regression to the
  teacher's (layer-/instance-normalised, layer-averaged) tokens at the scored positions (a
  bool mask or I-JEPA's target-block indices), the targets read straight from the teacher's
  tensor by the same family of fused kernels.

Boolean masks use True = masked (hidden from the encoder / to be predicted); MAE's float
``mask`` uses 1 = removed, 0 = kept, as MAE does. Index tensors are int64. Grids are
``(height, width)`` in patches and patch ``(r, c)`` has the flat index ``r * width + c``.

``block_mask`` and ``multiblock_masks`` read a few values on the host (whether any image is
still placing blocks; the block sizes and the batch minimum that fix the output shapes), so
on CUDA they synchronise a few times per call; the other generators never do.
"""
import math

import torch
from torch import Tensor

from fastssl import _checks, _ops

__all__ = ["random_token_mask", "random_masking", "mae_random_masking", "get_at_index",
           "set_at_index", "unshuffle", "block_mask", "simmim_mask", "multiblock_masks",
           "masked_patch_loss", "masked_latent_loss"]


# ----------------------------------------------------------------------------- arguments

def _device(device, generator, like=None):
    """The device to draw on: ``like``'s when a tensor is given, else ``device``, else the
    generator's, else the CPU. The generator (when given) must live on that device type."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    if like is not None:
        dev = like.device
        if device is not None and torch.device(device).type != dev.type:
            raise ValueError(f"device={device} but the tensor is on {dev}")
    elif device is not None:
        if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
            raise TypeError(f"device must be a torch.device, a string or None, got "
                            f"{type(device).__name__}")
        try:
            dev = torch.device(device)
        except RuntimeError as err:
            raise ValueError(f"device: {err}") from None
    elif generator is not None:
        dev = generator.device
    else:
        dev = torch.device("cpu")
    if generator is not None and generator.device.type != dev.type:
        raise ValueError(f"generator is on {generator.device} but the masks are drawn on {dev}")
    return dev


def _grid(grid, name="grid"):
    """An int g (a g x g grid) or an (h, w) pair of positive ints -> (h, w)."""
    return _checks.size2(grid, name)


def _range(value, name, lo, hi, lo_open=False):
    """A number v (the range [v, v]) or an increasing pair inside [lo, hi] -> (a, b)."""
    if _checks.is_number(value):
        v = _checks.number(value, name, lo=lo, hi=hi, lo_open=lo_open)
        return v, v
    return _checks.pair(value, name, lo=lo, hi=hi, lo_open=lo_open)


def _token_size(size, name="size"):
    """(batch, length) as two non-negative ints (a tuple, list or torch.Size)."""
    if isinstance(size, Tensor) or isinstance(size, (str, bytes)) or \
            not isinstance(size, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be a (batch_size, sequence_length) pair of integers, "
                        f"got {type(size).__name__}")
    if len(size) != 2:
        raise ValueError(f"{name} must be a (batch_size, sequence_length) pair, got "
                         f"{len(size)} values: {tuple(size)!r}")
    return (_checks.integer(size[0], f"{name}[0] (batch size)", lo=0),
            _checks.integer(size[1], f"{name}[1] (sequence length)", lo=0))


def _uniform(shape, lo, hi, generator, device):
    """U(lo, hi) in float64 (lo == hi gives lo exactly)."""
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    return lo + (hi - lo) * u


# ----------------------------------------------------------------------------- lightly

def random_token_mask(size, mask_ratio=0.6, mask_class_token=False, device=None,
                      generator=None):
    """lightly's ``random_token_mask``: random index masks for a batch of token sequences.

    Args:
        size: ``(batch_size, sequence_length)``; token 0 of each sequence is the class token.
        mask_ratio: proportion of the tokens to mask, in [0, 1].
        mask_class_token: False (default): the class token is always kept, first in
            ``idx_keep``, and only the ``L - 1`` patch tokens are masked. True: every token,
            the class token included, may be masked.
        device: where the indices are made (default: the generator's device, else CPU).
        generator: the ``torch.Generator`` the noise is drawn from.

    Returns:
        ``(idx_keep, idx_mask)``: int64 tensors of shapes ``(B, num_keep)`` and
        ``(B, L - num_keep)`` that together hold a permutation of ``0 .. L-1`` per row.

    The counts follow lightly (``lightly.models.utils.random_token_mask`` at its 2026 head):
    with the class token protected, ``num_keep = max(1, int((L - 1) * (1 - mask_ratio)) + 1)``
    (the class token plus ``int((L - 1) * (1 - mask_ratio))`` patch tokens), so
    ``(L - 1) - int((L - 1) * (1 - mask_ratio))`` patch tokens are masked (this is
    ``ceil((L - 1) * mask_ratio)`` up to float rounding, not ``int((L - 1) * mask_ratio)``);
    otherwise ``num_keep = int(L * (1 - mask_ratio))``. The draw is lightly's too: noise
    ``torch.rand(B, L)`` with the class token's set to -1 when it is protected,
    ``argsort`` per row, the smallest noise kept.
    """
    batch, length = _token_size(size)
    ratio = _checks.number(mask_ratio, "mask_ratio", lo=0.0, hi=1.0)
    mask_class_token = _checks.flag(mask_class_token, "mask_class_token")
    if length < 1:
        raise ValueError("size[1] (sequence length) must be >= 1 (the class token), got 0")
    dev = _device(device, generator)
    maskable = length - (0 if mask_class_token else 1)
    num_keep = int(maskable * (1.0 - ratio))
    noise = torch.rand(batch, length, generator=generator, device=dev)
    if not mask_class_token:
        noise[:, 0] = -1.0
        num_keep = max(1, num_keep + 1)
    order = torch.argsort(noise, dim=1)
    return order[:, :num_keep], order[:, num_keep:]


# ----------------------------------------------------------------------------- MAE

def random_masking(size_or_tokens, ratio=0.75, device=None, generator=None):
    """MAE's per-sample random masking, as indices.

    Args:
        size_or_tokens: ``(N, L)``, or a tensor of shape ``(N, L, ...)`` whose first two
            sizes and device are used (its values are not read).
        ratio: the proportion removed, in [0, 1).
        device: where the indices are made when a size is given (default: the generator's
            device, else CPU).
        generator: the ``torch.Generator`` the noise is drawn from.

    Returns:
        ``(ids_keep, mask, ids_restore)``: with ``len_keep = int(L * (1 - ratio))``, noise
        ``U(0, 1)`` of shape ``(N, L)`` (float32), ``ids_shuffle = argsort(noise, dim=1)``
        (smallest noise first) and ``ids_restore = argsort(ids_shuffle, dim=1)``:
        ``ids_keep = ids_shuffle[:, :len_keep]`` (int64 ``(N, len_keep)``), ``mask``
        float32 ``(N, L)`` with 1 = removed, 0 = kept (``mask[n, j] = 1`` exactly when
        ``ids_restore[n, j] >= len_keep``) and ``ids_restore`` int64 ``(N, L)``.
        ``get_at_index(x, ids_keep)`` gives MAE's ``x_masked``.
    """
    if isinstance(size_or_tokens, Tensor):
        if size_or_tokens.dim() < 2:
            raise _checks.ShapeError(f"size_or_tokens must be a (N, L, ...) tensor, got shape "
                                     f"{tuple(size_or_tokens.shape)}")
        n, length = size_or_tokens.shape[:2]
        dev = _device(device, generator, like=size_or_tokens)
    else:
        n, length = _token_size(size_or_tokens, "size_or_tokens")
        dev = _device(device, generator)
    ratio = _checks.number(ratio, "ratio", lo=0.0, hi=1.0, hi_open=True)
    len_keep = int(length * (1.0 - ratio))
    noise = torch.rand(n, length, generator=generator, device=dev)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    mask = (ids_restore >= len_keep).to(torch.float32)
    return ids_keep, mask, ids_restore


def mae_random_masking(x, ratio=0.75, generator=None):
    """MAE's ``random_masking(x, mask_ratio)``: ``x`` ``(N, L, D)`` -> ``(x_masked, mask,
    ids_restore)`` with ``x_masked = get_at_index(x, ids_keep)`` of shape
    ``(N, int(L * (1 - ratio)), D)``; ``mask`` and ``ids_restore`` as in ``random_masking``
    (the same draws for the same generator state)."""
    _checks.tensor(x, "x")
    if x.dim() != 3:
        raise _checks.ShapeError(f"x must be a (N, L, D) tensor, got shape {tuple(x.shape)}")
    ids_keep, mask, ids_restore = random_masking(x, ratio, generator=generator)
    return get_at_index(x, ids_keep), mask, ids_restore


def _check_index(tokens, index, name="index"):
    _checks.tensor(tokens, "tokens")
    _checks.tensor(index, name)
    if tokens.dim() < 2:
        raise _checks.ShapeError(f"tokens must have shape (B, L, ...), got "
                                 f"{tuple(tokens.shape)}")
    if index.dim() != 2:
        raise _checks.ShapeError(f"{name} must have shape (B, K), got {tuple(index.shape)}")
    if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got {index.dtype}")
    if index.shape[0] != tokens.shape[0]:
        raise _checks.ShapeError(f"{name} has batch size {index.shape[0]} but tokens have "
                                 f"{tokens.shape[0]}")
    if index.device != tokens.device:
        raise ValueError(f"{name} is on {index.device} but tokens are on {tokens.device}")
    return index.long()


def _expand_index(index, tokens):
    """(B, K) -> (B, K, *tokens.shape[2:]) for gather/scatter along dim 1."""
    rest = tokens.shape[2:]
    return index.view(*index.shape, *([1] * len(rest))).expand(*index.shape, *rest)


def get_at_index(tokens, index):
    """Rows of ``tokens`` at ``index`` per sample: ``(B, L, ...)`` with ``(B, K)`` ->
    ``(B, K, ...)``, ``out[b, k] = tokens[b, index[b, k]]`` (a gather; differentiable in
    ``tokens``). Indices must lie in [0, L)."""
    index = _check_index(tokens, index)
    return torch.gather(tokens, 1, _expand_index(index, tokens))


def set_at_index(tokens, index, value):
    """A copy of ``tokens`` with ``out[b, index[b, k]] = value[b, k]`` (out of place;
    ``tokens`` is not modified). ``value``: a tensor broadcastable to ``(B, K, ...)``
    (e.g. ``(B, K, D)`` or a ``(1, 1, D)`` mask token) or a number. With repeated indices in
    a row, which value lands is unspecified (as for ``torch.scatter``)."""
    index = _check_index(tokens, index)
    full = _expand_index(index, tokens)
    if _checks.is_number(value):
        return torch.scatter(tokens, 1, full, value)
    _checks.tensor(value, "value")
    if value.device != tokens.device:
        raise ValueError(f"value is on {value.device} but tokens are on {tokens.device}")
    try:
        src = value.to(tokens.dtype).expand(full.shape)
    except RuntimeError:
        raise _checks.ShapeError(f"value of shape {tuple(value.shape)} does not broadcast to "
                                 f"{tuple(full.shape)} (B, K, ...)") from None
    return torch.scatter(tokens, 1, full, src)


def unshuffle(tokens, ids_restore, mask_token=None, num_prefix_tokens=0):
    """MAE's decoder un-shuffle: tokens in shuffled order (the kept tokens, then the mask
    tokens) back to the original order, ``out[:, j] = tokens[:, ids_restore[:, j]]``.

    Args:
        tokens: ``(N, L, ...)`` in shuffled order, or with ``mask_token`` given only the
            ``(N, len_keep, ...)`` kept tokens (``mask_token``, broadcastable to one token,
            e.g. ``(1, 1, D)``, fills the ``L - len_keep`` removed places).
        ids_restore: ``(N, L)`` from ``random_masking``.
        num_prefix_tokens: leading tokens (class token, registers) that are not part of the
            shuffle: set aside and put back in front, as MAE's decoder does with its class
            token.

    Returns ``(N, num_prefix_tokens + L, ...)``. ``unshuffle(get_at_index(x, ids_keep),
    ids_restore, mask_token=m)`` is ``x`` with the removed tokens replaced by ``m``.
    """
    _checks.tensor(tokens, "tokens")
    p = _checks.integer(num_prefix_tokens, "num_prefix_tokens", lo=0)
    if tokens.dim() < 2 or tokens.shape[1] < p:
        raise _checks.ShapeError(f"tokens must have shape (N, num_prefix_tokens + K, ...), got "
                                 f"{tuple(tokens.shape)} with num_prefix_tokens={p}")
    prefix, body = tokens[:, :p], tokens[:, p:]
    ids_restore = _check_index(body, ids_restore, "ids_restore")
    length = ids_restore.shape[1]
    if mask_token is not None:
        _checks.tensor(mask_token, "mask_token")
        missing = length - body.shape[1]
        if missing < 0:
            raise _checks.ShapeError(f"tokens hold {body.shape[1]} shuffled tokens, more than "
                                     f"the {length} of ids_restore")
        shape = (body.shape[0], missing, *body.shape[2:])
        try:
            fill = mask_token.to(device=body.device, dtype=body.dtype).expand(shape)
        except RuntimeError:
            raise _checks.ShapeError(f"mask_token of shape {tuple(mask_token.shape)} does not "
                                     f"broadcast to one token {tuple(body.shape[2:])}") from None
        body = torch.cat([body, fill], dim=1)
    if body.shape[1] != length:
        raise _checks.ShapeError(f"tokens hold {body.shape[1]} shuffled tokens but ids_restore "
                                 f"has length {length} (pass mask_token= to fill the rest)")
    out = torch.gather(body, 1, _expand_index(ids_restore, body))
    return torch.cat([prefix, out], dim=1) if p else out


# ----------------------------------------------------------------------------- BEiT / iBOT

def _rect(top, left, h, w, height, width):
    """Bool (..., height, width): rows [top, top + h) x cols [left, left + w); top, left, h,
    w are tensors of the same shape (h, w may also be ints)."""
    rows = torch.arange(height, device=top.device)
    cols = torch.arange(width, device=top.device)
    h = torch.as_tensor(h, device=top.device)
    w = torch.as_tensor(w, device=top.device)
    in_r = (rows >= top[..., None]) & (rows < (top + h)[..., None])
    in_c = (cols >= left[..., None]) & (cols < (left + w)[..., None])
    return in_r[..., :, None] & in_c[..., None, :]


def _block_try(remaining, min_num, log_aspect, grid, generator, dev):
    """One BEiT try per image: (top, left, bh, bw, ok), ok where the rounded block honours
    the area and aspect bounds and is smaller than the grid on both sides."""
    (log_lo, log_hi), (height, width) = log_aspect, grid
    batch = remaining.shape[0]
    area = min_num + (remaining - min_num) * torch.rand(
        batch, generator=generator, device=dev, dtype=torch.float64)
    aspect = torch.exp(_uniform(batch, log_lo, log_hi, generator, dev))
    bh = torch.round(torch.sqrt(area * aspect)).long()
    bw = torch.round(torch.sqrt(area / aspect)).long()
    ratio_hw = bh.double() / bw.clamp_min(1).double()
    a_lo, a_hi = math.exp(log_lo), math.exp(log_hi)
    ok = (bh >= 1) & (bw >= 1) & (bh < height) & (bw < width) & (bh * bw >= min_num) & \
        (ratio_hw >= a_lo * (1 - 1e-12)) & (ratio_hw <= a_hi * (1 + 1e-12))
    # Placements inside the grid; sizes that do not fit draw from a dummy range.
    span_h = (height - bh + 1).clamp_min(1)
    span_w = (width - bw + 1).clamp_min(1)
    u = torch.rand(batch, 2, generator=generator, device=dev, dtype=torch.float64)
    top = torch.minimum((u[:, 0] * span_h).long(), span_h - 1)
    left = torch.minimum((u[:, 1] * span_w).long(), span_w - 1)
    return top, left, bh, bw, ok


def block_mask(batch, grid, ratio=(0.1, 0.5), min_num_patches=4, min_aspect=0.3,
               max_aspect=None, attempts=10, generator=None, device=None, return_params=False):
    """BEiT's block-wise masking, with iBOT's per-image ratio: bool ``(batch, h, w)``.

    Per image a ratio ``r`` is drawn: ``U(lo, hi)`` for ``ratio=(lo, hi)`` (iBOT's
    prediction ratio, 0.3 +- 0.2 in its recipe), or ``r = ratio`` for a number; the target
    is ``r * h * w`` patches. Blocks are then added one at a time until the target is
    reached. One try (BEiT's ``_mask``): with ``remaining = target - masked``, an area
    ``U(min_num_patches, remaining)`` and an aspect ``exp(U(log min_aspect, log
    max_aspect))``; ``bh = round(sqrt(area * aspect))``, ``bw = round(sqrt(area /
    aspect))``; top and left uniform over the placements inside the grid; the try succeeds
    when the block adds at least one and at most ``remaining`` new patches. After
    ``attempts`` failed tries in a row the image stops (BEiT gives up the same way), so an
    image never exceeds its target and may fall a little short of it.

    One rule differs from BEiT's code on purpose: a try also fails when the rounded block
    has fewer than ``min_num_patches`` patches or an aspect ``bh / bw`` outside
    ``[min_aspect, max_aspect]`` (BEiT's rounding can accept e.g. a 1 x 3 block for
    ``min_num_patches=4``), so every block honours both bounds. As in BEiT, a block must be
    smaller than the grid on both sides (``bh < h``, ``bw < w``). iBOT's own minimum area
    is ``(min(h, w) // 3) ** 2`` (16 on 14 x 14); BEiT's default, 4, is the default here.

    Images are processed together: each loop round gives every unfinished image one try, so
    the loop runs over tries, never over images.

    ``return_params=True`` also returns a dict: ``ratio`` (batch,) float64, ``blocks``
    (batch, M, 4) int64 rows ``(top, left, bh, bw)`` of the accepted blocks (zero rows
    after ``num_blocks``), ``num_blocks`` (batch,) int64.

    On the meta device the mask comes back shape-only; ``return_params`` there raises
    ValueError (the number of blocks is a drawn value).
    """
    batch = _checks.integer(batch, "batch", lo=1)
    height, width = _grid(grid)
    lo, hi = _range(ratio, "ratio", 0.0, 1.0)
    min_num = _checks.integer(min_num_patches, "min_num_patches", lo=1)
    a_lo = _checks.number(min_aspect, "min_aspect", lo=0.0, lo_open=True)
    a_hi = 1.0 / a_lo if max_aspect is None else \
        _checks.number(max_aspect, "max_aspect", lo=0.0, lo_open=True)
    if a_hi < a_lo:
        raise ValueError(f"max_aspect ({a_hi}) must be >= min_aspect ({a_lo})")
    attempts = _checks.integer(attempts, "attempts", lo=1)
    return_params = _checks.flag(return_params, "return_params")
    dev = _device(device, generator)
    if dev.type == "meta":  # the mask's shape is known; the blocks are drawn values
        if return_params:
            raise ValueError("block_mask(return_params=True) on the meta device: the number "
                             "of blocks depends on the drawn values")
        return torch.empty(batch, height, width, dtype=torch.bool, device=dev)

    n = height * width
    r = _uniform(batch, lo, hi, generator, dev)
    target = r * n
    mask = torch.zeros(batch, height, width, dtype=torch.bool, device=dev)
    count = torch.zeros(batch, dtype=torch.int64, device=dev)
    fails = torch.zeros(batch, dtype=torch.int64, device=dev)
    blocks = torch.zeros(batch, n + 1, 4, dtype=torch.int64, device=dev)
    num_blocks = torch.zeros(batch, dtype=torch.int64, device=dev)
    rows = torch.arange(batch, device=dev)
    log_lo, log_hi = math.log(a_lo), math.log(a_hi)
    active = count < target
    while bool(active.any()):
        top, left, bh, bw, ok = _block_try(target - count, min_num, (log_lo, log_hi),
                                           (height, width), generator, dev)
        remaining = target - count
        block = _rect(top, left, bh, bw, height, width)
        new = (block & ~mask).flatten(1).sum(1)
        accept = active & ok & (new > 0) & (new <= remaining)
        mask |= block & accept[:, None, None]
        count += torch.where(accept, new, 0)
        slot = num_blocks.clamp_max(n)
        row = torch.stack([top, left, bh, bw], 1)
        blocks[rows, slot] = torch.where(accept[:, None], row, blocks[rows, slot])
        num_blocks += accept.long()
        fails = torch.where(accept, 0, fails + active.long())
        active = active & (count < target) & (fails < attempts)
    if not return_params:
        return mask
    m = int(num_blocks.max())
    return mask, {"ratio": r, "blocks": blocks[:, :m].clone(), "num_blocks": num_blocks}


# ----------------------------------------------------------------------------- SimMIM

def simmim_mask(batch, input_size=192, mask_patch_size=32, model_patch_size=4, ratio=0.6,
                generator=None, device=None):
    """SimMIM's ``MaskGenerator`` for a batch: bool ``(batch, H / model_patch_size,
    W / model_patch_size)``.

    The image (``input_size``: an int or ``(H, W)`` in pixels) is cut into cells of
    ``mask_patch_size`` pixels; exactly ``ceil(cells * ratio)`` of the ``cells`` are masked
    in every image (a uniformly random subset per image), and each cell is repeated
    ``mask_patch_size / model_patch_size`` times along both axes (``repeat_interleave``) to
    the model's patch grid. ``input_size`` must be a multiple of ``mask_patch_size`` and
    ``mask_patch_size`` a multiple of ``model_patch_size`` (ValueError otherwise). The
    defaults are SimMIM's recipe at 192 px: 32 px cells, ratio 0.6, and the 4 px patches of
    its Swin encoder (its ViT-B uses ``model_patch_size=16``).
    """
    batch = _checks.integer(batch, "batch", lo=1)
    size_h, size_w = _grid(input_size, "input_size")
    cell = _checks.integer(mask_patch_size, "mask_patch_size", lo=1)
    patch = _checks.integer(model_patch_size, "model_patch_size", lo=1)
    ratio = _checks.number(ratio, "ratio", lo=0.0, hi=1.0)
    if size_h % cell or size_w % cell:
        raise ValueError(f"input_size {(size_h, size_w)} must be a multiple of "
                         f"mask_patch_size={cell}")
    if cell % patch:
        raise ValueError(f"mask_patch_size={cell} must be a multiple of "
                         f"model_patch_size={patch}")
    dev = _device(device, generator)
    gh, gw = size_h // cell, size_w // cell
    cells = gh * gw
    count = int(math.ceil(cells * ratio))
    noise = torch.rand(batch, cells, generator=generator, device=dev)
    chosen = torch.argsort(noise, dim=1)[:, :count]
    mask = torch.zeros(batch, cells, dtype=torch.bool, device=dev)
    mask.scatter_(1, chosen, True)
    scale = cell // patch
    mask = mask.view(batch, gh, gw)
    return mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


# ----------------------------------------------------------------------------- I-JEPA

def _block_size(scale, aspect, height, width, generator, dev):
    """I-JEPA's block size: s ~ U(scale), a ~ U(aspect), k = int(h * w * s),
    (round(sqrt(k a)), round(sqrt(k / a))) clamped to [1, height] x [1, width]."""
    s_lo, s_hi = scale
    a_lo, a_hi = aspect
    u = torch.rand(2, generator=generator, device=dev, dtype=torch.float64).tolist()
    s = s_lo + u[0] * (s_hi - s_lo)
    a = a_lo + u[1] * (a_hi - a_lo)
    k = int(height * width * s)
    bh = min(max(round(math.sqrt(k * a)), 1), height)
    bw = min(max(round(math.sqrt(k / a)), 1), width)
    return bh, bw, s, a


def _positions(shape, bh, bw, height, width, generator, dev):
    """Uniform top-left corners over every placement inside the grid: (*shape, 2)."""
    top = torch.randint(0, height - bh + 1, shape, generator=generator, device=dev)
    left = torch.randint(0, width - bw + 1, shape, generator=generator, device=dev)
    return torch.stack([top, left], -1)


def _layouts(batch, grid, pred_size, enc_size, n_pred, n_enc, min_keep, allow_overlap,
             attempts, generator, dev):
    """Uniform target and context positions per image, an image's whole layout drawn again
    while its context keeps fewer than ``min_keep`` patches: (pred_pos, enc_pos, context
    bool (batch, n_enc, h, w), counts (batch, n_enc))."""
    (height, width), (ph, pw), (eh, ew) = grid, pred_size, enc_size
    pred_pos = _positions((batch, n_pred), ph, pw, height, width, generator, dev)
    enc_pos = _positions((batch, n_enc), eh, ew, height, width, generator, dev)
    for attempt in range(attempts):
        targets = _rect(pred_pos[..., 0], pred_pos[..., 1], ph, pw, height, width)
        context = _rect(enc_pos[..., 0], enc_pos[..., 1], eh, ew, height, width)
        if not allow_overlap:
            context = context & ~targets.any(1, keepdim=True)
        counts = context.flatten(2).sum(2)
        bad = (counts < min_keep).any(1)
        if not bool(bad.any()):
            return pred_pos, enc_pos, context, counts
        new_pred = _positions((batch, n_pred), ph, pw, height, width, generator, dev)
        new_enc = _positions((batch, n_enc), eh, ew, height, width, generator, dev)
        pred_pos = torch.where(bad[:, None, None], new_pred, pred_pos)
        enc_pos = torch.where(bad[:, None, None], new_enc, enc_pos)
    raise ValueError(
        f"{int(bad.sum())} of {batch} images found no context with >= "
        f"min_keep={min_keep} patches outside their {n_pred} target blocks of "
        f"{ph}x{pw} ({eh}x{ew} context block, {height}x{width} grid) in {attempts} "
        "layouts; lower min_keep, pred_scale or n_pred, or set allow_overlap=True")


def multiblock_masks(batch, grid, enc_scale=(0.85, 1.0), pred_scale=(0.15, 0.2),
                     aspect=(0.75, 1.5), n_enc=1, n_pred=4, min_keep=10, allow_overlap=False,
                     attempts=20, generator=None, device=None, return_params=False):
    """I-JEPA's multi-block masks: context and target patch indices for a batch.

    Defaults are the paper's (ViT on a 14 x 14 grid: 4 targets of scale (0.15, 0.2) and
    aspect (0.75, 1.5), one context block of scale (0.85, 1.0) and unit aspect, no overlap,
    ``min_keep`` 10); the reference code's own defaults differ.

    Block sizes are drawn once per batch (one for the targets, one for the context):
    ``s ~ U(scale)``, ``a ~ U(aspect)`` (the context: ``a = 1``), ``k = int(h * w * s)``,
    ``bh = round(sqrt(k * a))``, ``bw = round(sqrt(k / a))``, clamped to the grid. A size
    whose block has fewer than ``min_keep`` patches is drawn again (up to ``attempts``
    times, then ValueError). ``s`` and ``a`` are drawn independently (the reference code
    derives both from one uniform draw). Locations are drawn per image.

    Placement, and why it is free of the reference collator's positional bias
    (facebookresearch/ijepa#60: the contexts it returns favour the top-left corner, never
    hold the last row or column and seldom the lower rows, so over a batch whole regions
    of the grid never reach the context):

    1. The ``n_pred`` target blocks of every image are placed first, each uniformly over
       *all* placements inside the grid (the reference's ``randint(0, h - bh)`` never
       reaches the last row and column, ijepa#40), independently of each other.
    2. Each context block is placed uniformly over all placements, independently of the
       targets; with ``allow_overlap=False`` the target patches are removed from it. An
       image whose context keeps fewer than ``min_keep`` patches draws its whole layout
       again (rejection, up to ``attempts`` rounds; then ValueError; the reference instead
       lets the context overlap the targets after repeated failures).
    3. Contexts hold different numbers of patches; all are cut to the batch minimum ``K``
       by keeping a *uniformly random* subset of each context (every patch of a context of
       ``n`` patches is kept with probability ``K / n``), returned in raster order. The
       reference keeps the first ``K`` in raster order, which is what empties the lower
       rows of its contexts.

    What remains is the geometry of uniformly placed blocks, which no placement of
    contiguous blocks removes: a block covers central patches from more positions than
    border ones, so with the paper's settings the centre lies in some target block in
    about 90% of images and is context in about 9%, the border in 35-55% (a context
    block smaller than the grid, e.g. 13 x 13 of 14 x 14, also covers the outermost ring
    less often). Placing the targets non-uniformly (favouring the border) would change
    what is predicted and still leaves the centre at about half the border's rate at
    these settings, so the targets stay uniform, as in the paper. With small targets the
    context coverage is close to uniform.

    Args:
        batch: number of images.
        grid: ``(h, w)`` patches (or an int for a square grid).
        enc_scale, pred_scale: ranges of the context / target block area as a fraction of
            the grid; a number v means (v, v).
        aspect: range of the target blocks' aspect ``bh / bw``.
        n_enc, n_pred: context blocks and target blocks per image.
        min_keep: the fewest patches a target block or a context may have.
        allow_overlap: True: the context blocks keep the target patches.
        attempts: redraws allowed for the sizes and for each image's layout.
        return_params: also return a dict with ``pred_size`` and ``enc_size`` ((bh, bw)
            ints), the drawn ``pred_scale``, ``pred_aspect``, ``enc_scale`` floats,
            ``pred_pos`` (batch, n_pred, 2) and ``enc_pos`` (batch, n_enc, 2) int64
            top-left corners, and ``context_mask`` bool (batch, n_enc, h, w): each context
            before the cut to ``K``.

    Returns:
        ``(context_idx, target_idx)`` (and the params dict third with
        ``return_params=True``), int64 on ``device``:
        ``context_idx`` ``(batch, n_enc, K_enc)``: flat patch indices ``r * w + c`` of each
        context, ascending, ``K_enc`` = the smallest context in the batch (>= min_keep);
        ``target_idx`` ``(batch, n_pred, bh * bw)``: each target block's patches in raster
        order (all target blocks have the batch's size, so none is cut). The reference
        returns the same as lists of ``n_enc`` / ``n_pred`` tensors of shape (batch, K):
        ``context_idx[:, i]`` is its i-th entry. Both shapes depend on drawn values, so on
        the meta device the call raises ValueError.
    """
    batch = _checks.integer(batch, "batch", lo=1)
    height, width = _grid(grid)
    enc_scale = _range(enc_scale, "enc_scale", 0.0, 1.0, lo_open=True)
    pred_scale = _range(pred_scale, "pred_scale", 0.0, 1.0, lo_open=True)
    if _checks.is_number(aspect):
        a = _checks.number(aspect, "aspect", lo=0.0, lo_open=True)
        aspect = (a, a)
    else:
        aspect = _checks.pair(aspect, "aspect", lo=0.0, lo_open=True)
    n_enc = _checks.integer(n_enc, "n_enc", lo=1)
    n_pred = _checks.integer(n_pred, "n_pred", lo=1)
    min_keep = _checks.integer(min_keep, "min_keep", lo=1)
    allow_overlap = _checks.flag(allow_overlap, "allow_overlap")
    attempts = _checks.integer(attempts, "attempts", lo=1)
    return_params = _checks.flag(return_params, "return_params")
    dev = _device(device, generator)
    if dev.type == "meta":
        raise ValueError("multiblock_masks on the meta device: its shapes (the block sizes, "
                         "the batch's smallest context) depend on the drawn values")
    n = height * width
    if min_keep > n:
        raise ValueError(f"grid {height}x{width} has {n} patches, fewer than min_keep={min_keep}")

    def size(scale, asp, what):
        for _ in range(attempts):
            bh, bw, s, a = _block_size(scale, asp, height, width, generator, dev)
            if bh * bw >= min_keep:
                return bh, bw, s, a
        raise ValueError(f"{what} blocks of scale {scale} on a {height}x{width} grid have "
                         f"fewer than min_keep={min_keep} patches (last drawn: {bh}x{bw}) "
                         f"in {attempts} draws; lower min_keep or raise the scale")

    ph, pw, p_s, p_a = size(pred_scale, aspect, "target")
    eh, ew, e_s, _ = size(enc_scale, (1.0, 1.0), "context")
    pred_pos, enc_pos, context, counts = _layouts(
        batch, (height, width), (ph, pw), (eh, ew), n_pred, n_enc, min_keep, allow_overlap,
        attempts, generator, dev)
    # Cut every context to the batch minimum by a uniformly random subset.
    k_enc = int(counts.min())
    priority = torch.rand(batch, n_enc, n, generator=generator, device=dev)
    priority = priority.masked_fill(~context.flatten(2), 2.0)
    context_idx = priority.topk(k_enc, dim=2, largest=False).indices.sort(dim=2).values
    r_idx = pred_pos[..., 0, None] + torch.arange(ph, device=dev)  # (batch, n_pred, ph)
    c_idx = pred_pos[..., 1, None] + torch.arange(pw, device=dev)  # (batch, n_pred, pw)
    target_idx = (r_idx[..., :, None] * width + c_idx[..., None, :]).flatten(2)
    if not return_params:
        return context_idx, target_idx
    return context_idx, target_idx, {
        "pred_size": (ph, pw), "enc_size": (eh, ew), "pred_scale": p_s, "pred_aspect": p_a,
        "enc_scale": e_s, "pred_pos": pred_pos, "enc_pos": enc_pos, "context_mask": context}


# ----------------------------------------------------------------------------- the loss

def masked_patch_loss(pred, images, mask, patch_size, norm_pix=True, loss="mse", beta=1.0,
                      eps=1e-6):
    """Masked-image-modelling reconstruction loss, the targets read from the images.

    images (N, C, H, W), uint8 or floating, H and W multiples of ``patch_size`` p: patch
    l = hy (W/p) + wx of image n holds P = p*p*C values in MAE's ``patchify`` order
    (row py, column px, channel c; channel fastest). ``mask`` (N, L) or (N, H/p, W/p), bool
    or float: 1 (True) marks a patch to reconstruct, 0 one that is not scored -- MAE's mask
    (1 = removed); non-negative float weights are accepted too. ``pred`` is (N, L, P), a
    prediction for every patch (MAE's decoder), or (M, P) for the M masked patches only, in
    the order of ``mask.nonzero()`` (image by image, patch by patch).

    With ``norm_pix`` (MAE's ``norm_pix_loss``) each target patch is normalised by its own
    mean and unbiased variance: t' = (t - mean) / sqrt(var + eps), eps = 1e-6 inside the
    root. With d = pred - t' over a patch's P values, the patch loss is the mean of d^2
    (``loss="mse"``), of |d| (``"l1"``), or of smooth-L1 with ``beta`` (``"smooth_l1"``),
    and the result is

        sum_l mask_l loss_l / sum_l mask_l

    -- MAE's ``(loss * mask).sum() / mask.sum()``. SimMIM's L1, summed over the masked
    pixels and divided by (their count + 1e-5) and by C, is ``loss="l1", norm_pix=False``
    without the 1e-5. Where no patch is masked the result is 0 with a zero gradient (MAE's
    formula gives 0 / 0 = NaN). The gradient flows to ``pred`` only.

    The fused path (kernels/masked.py; a portable twin on CPU) reads each target patch
    straight from ``images``: no patchified copy, no float32 target tensor, and unmasked
    patches are never read. Arithmetic in float32 (float64 for float64 ``pred``); the sum
    over patches in float64; the result in pred's dtype. A packed (M, P) ``pred`` is checked
    against the mask's count, and a float mask for negative or non-finite weights: each
    reads the mask on the host once (a device synchronisation on CUDA; a bool mask with
    (N, L, P) predictions reads nothing). On the portable path
    (CPU) the forward also writes the gradient of float32/float64 ``pred`` into a
    pred-shaped buffer that the backward scales and returns (the gradient's own memory,
    allocated a pass earlier), instead of reading the images a second time.
    """
    _checks.floating(pred, "pred")
    images = _checks.tensor(images, "images")
    if images.dim() != 4:
        raise _checks.ShapeError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating, got {images.dtype}")
    p = _checks.integer(patch_size, "patch_size", lo=1)
    N, C, H, W = images.shape
    if H % p or W % p:
        raise ValueError(f"patch_size {p} does not divide the image sides {H} x {W}")
    L, P = (H // p) * (W // p), p * p * C
    loss = _checks.choice(loss, "loss", ("mse", "l1", "smooth_l1"))
    norm_pix = _checks.flag(norm_pix, "norm_pix")
    beta = _checks.number(beta, "beta", lo=0.0, lo_open=True)
    eps = _checks.number(eps, "eps", lo=0.0)
    if norm_pix and P < 2:
        raise ValueError(f"norm_pix needs at least 2 values per patch for an unbiased "
                         f"variance, got P = patch_size^2 * C = {P}")
    mask = _checks.tensor(mask, "mask")
    if mask.shape not in ((N, L), (N, H // p, W // p)):
        raise _checks.ShapeError(f"mask must be (N, L) = ({N}, {L}) or (N, H/p, W/p) = "
                                 f"({N}, {H // p}, {W // p}), got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool or floating, got {mask.dtype}")
    for x, name in ((images, "images"), (mask, "mask")):
        if x.device != pred.device:
            raise ValueError(f"{name} is on {x.device} but pred on {pred.device}")
    weight = mask.reshape(N * L).to(torch.float32 if pred.dtype != torch.float64
                                    else torch.float64)
    if _checks.has_values(weight) and mask.dtype != torch.bool and \
            not bool(((weight >= 0) & torch.isfinite(weight)).all()):
        raise ValueError("mask weights must be finite and >= 0")
    live = weight != 0
    if pred.dim() == 3:
        if pred.shape != (N, L, P):
            raise _checks.ShapeError(f"pred must be (N, L, P) = ({N}, {L}, {P}) or (masked, "
                                     f"{P}), got {tuple(pred.shape)}")
        rows = pred.reshape(N * L, P)
        prow = torch.arange(N * L, device=pred.device)
    elif pred.dim() == 2:
        if pred.shape[1] != P:
            raise _checks.ShapeError(f"pred must be (masked, P = {P}) or (N, L, P), got "
                                     f"{tuple(pred.shape)}")
        if _checks.has_values(live) and int(live.sum()) != pred.shape[0]:
            raise _checks.ShapeError(f"pred has {pred.shape[0]} rows but the mask marks "
                                     f"{int(live.sum())} patches")
        rows = pred
        prow = torch.where(live, torch.cumsum(live.long(), 0) - 1, -1)
    else:
        raise _checks.ShapeError(f"pred must be (N, L, P) or (masked, P), got shape "
                                 f"{tuple(pred.shape)}")
    ell, _ = _ops.masked_patch(rows, images, weight, prow, p, norm_pix, loss, beta, eps)
    w = weight.to(torch.float64)
    total = (w * ell.to(torch.float64)).sum()
    return (total / w.sum().clamp_min(torch.finfo(torch.float64).tiny)).to(pred.dtype)


def _host_checks(*tensors):
    """Whether checks that read values on the host run: not on meta tensors, and not while
    torch.compile traces (a host read would break the graph)."""
    return _checks.has_values(*tensors) and not torch.compiler.is_compiling()


def _stacked(layers):
    """K (N, L, D) tensors as one (K, N, L, D) tensor: a strided view when they are equally
    spaced views of one storage with the same layout (``list(t)``, ``t.unbind(0)``), else a
    stacked copy in their common dtype."""
    t0 = layers[0]
    if len(layers) == 1:
        return t0.unsqueeze(0)
    same = _host_checks(*layers) and all(
        t.dtype == t0.dtype and t.stride() == t0.stride() and
        t.untyped_storage().data_ptr() == t0.untyped_storage().data_ptr() for t in layers)
    if same:
        step = layers[1].storage_offset() - t0.storage_offset()
        if step >= 0 and all(t.storage_offset() == t0.storage_offset() + k * step
                             for k, t in enumerate(layers)):
            return t0.as_strided((len(layers), *t0.shape), (step, *t0.stride()),
                                 t0.storage_offset())
    dtype = t0.dtype
    for t in layers[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.stack([t.to(dtype) for t in layers])


def _latent_targets(targets, pred):
    """The teacher's tokens as one detached (K, N, L, D) tensor, checked."""
    if isinstance(targets, (list, tuple)):
        layers = list(targets)
        if not layers:
            raise ValueError("targets must hold at least one layer (K >= 1), got an empty "
                             f"{type(targets).__name__}")
        for k, t in enumerate(layers):
            _checks.floating(t, f"targets[{k}]")
            if t.dim() != 3 or t.shape != layers[0].shape:
                raise _checks.ShapeError(
                    f"targets[{k}] must be (N, L, D) like targets[0] "
                    f"{tuple(layers[0].shape)}, got {tuple(t.shape)}")
            if t.device != pred.device:
                raise ValueError(f"targets[{k}] is on {t.device} but pred on {pred.device}")
        return _stacked([t.detach() for t in layers])
    _checks.floating(targets, "targets")
    if targets.dim() not in (3, 4):
        raise _checks.ShapeError(f"targets must be (N, L, D), (K, N, L, D) or a list of K "
                                 f"(N, L, D) tensors, got shape {tuple(targets.shape)}")
    if targets.device != pred.device:
        raise ValueError(f"targets is on {targets.device} but pred on {pred.device}")
    t = targets.detach()
    t = t.unsqueeze(0) if t.dim() == 3 else t
    if t.shape[0] == 0:
        raise ValueError("targets must hold at least one layer (K >= 1), got K = 0")
    return t


def _index_pairs(pred, mask, N, L, D):
    """(pred rows, weight, prow, trow) of integer token indices mask (N, M)."""
    M = mask.shape[1]
    if pred.shape != (N, M, D):
        raise _checks.ShapeError(f"pred must be (N, M, D) = ({N}, {M}, {D}) for a (N, M) "
                                 f"index mask, got {tuple(pred.shape)}")
    idx = mask.long()
    if _host_checks(idx) and idx.numel() and bool(((idx < 0) | (idx >= L)).any()):
        raise ValueError(f"mask indices must lie in [0, L) = [0, {L}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")
    base = torch.arange(N, device=idx.device)[:, None] * L
    weight = torch.ones(N * M, device=pred.device, dtype=_ops.acc_dtype(pred))
    return (pred.reshape(N * M, D), weight, torch.arange(N * M, device=pred.device),
            (base + idx).reshape(N * M))


def _bool_pairs(pred, mask, N, L, D):
    """(pred rows, weight, prow, trow) of a bool mask (N, L) with pred (N, L, D) or packed
    (M, D) in ``mask.nonzero()`` order: one pair per token, weight 1 where scored."""
    live = mask.reshape(N * L)
    weight = live.to(_ops.acc_dtype(pred))
    trow = torch.arange(N * L, device=pred.device)
    if pred.dim() == 3:
        if pred.shape != (N, L, D):
            raise _checks.ShapeError(f"pred must be (N, L, D) = ({N}, {L}, {D}) or (masked, "
                                     f"{D}) for a bool mask, got {tuple(pred.shape)}")
        return pred.reshape(N * L, D), weight, trow, trow
    if pred.dim() != 2 or pred.shape[1] != D:
        raise _checks.ShapeError(f"pred must be (masked, D = {D}) or (N, L, D) for a bool "
                                 f"mask, got {tuple(pred.shape)}")
    if _host_checks(live) and int(live.sum()) != pred.shape[0]:
        raise _checks.ShapeError(f"pred has {pred.shape[0]} rows but the mask marks "
                                 f"{int(live.sum())} tokens")
    return pred, weight, torch.where(live, torch.cumsum(live.long(), 0) - 1, -1), trow


def _latent_pairs(pred, mask, N, L, D):
    mask = _checks.tensor(mask, "mask")
    if mask.device != pred.device:
        raise ValueError(f"mask is on {mask.device} but pred on {pred.device}")
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise ValueError(f"mask must be bool (N, L) or integer token indices (N, M), got "
                         f"{mask.dtype}")
    if mask.dim() != 2 or mask.shape[0] != N or (mask.dtype == torch.bool and
                                                  mask.shape[1] != L):
        want = f"(N, L) = ({N}, {L})" if mask.dtype == torch.bool else f"(N = {N}, M)"
        raise _checks.ShapeError(f"mask must be {want} for targets of (N, L, D) = "
                                 f"({N}, {L}, {D}), got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return _bool_pairs(pred, mask, N, L, D)
    return _index_pairs(pred, mask, N, L, D)


def masked_latent_loss(pred, targets, mask, loss="smooth_l1", beta=1.0, layer_norm=True,
                       instance_norm=False, dim_scale=None, eps=1e-5):
    """Latent-target regression loss (I-JEPA, data2vec), the targets read from the teacher.

    ``targets``: the teacher's tokens (N, L, D), or K layers of them as a (K, N, L, D)
    tensor or a list/tuple of K (N, L, D) tensors, any floating dtype (e.g. bf16 under
    autocast); constants (detached, no gradient). ``mask`` says which (prediction, target)
    pairs are scored:

    - bool (N, L), True = scored: ``pred`` is (N, L, D), a prediction for every token
      (data2vec's student), or (M, D) for the M scored tokens in ``mask.nonzero()`` order;
    - integer (N, M) token indices into [0, L) (I-JEPA's target blocks, e.g. the n_pred
      blocks concatenated; duplicates allowed): ``pred`` is (N, M, D) and row (n, j)
      predicts token mask[n, j] of image n.

    The target of token (n, l) is the mean over the K layers

        y = (1/K) sum_k a_k,   a_k = (t_k[n, l] - mean_l t_k[n]) / sqrt(var_l t_k[n] + eps)

    with ``instance_norm`` (per channel over the L tokens of the image, biased variance:
    ``F.instance_norm`` on (N, D, L)), else a_k = t_k[n, l]; with ``layer_norm`` y is then
    normalised over its D channels, y' = (y - mean_d y) / sqrt(var_d y + eps) (biased, no
    affine: ``F.layer_norm(y, (D,))``). With d = pred - y' the pair loss is

        ell = sum_d l(d_d) / s,   l(d) = d^2 ("mse"), |d| ("l1"),
                                  0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta ("smooth_l1")

    with s = ``dim_scale`` (None: s = D, the element mean of ``F.smooth_l1_loss`` and
    ``F.mse_loss``), and the result is the mean of ell over the scored pairs (0 with a zero
    gradient when there are none). I-JEPA: K = 1, ``layer_norm=True``, the integer target
    indices (its loss is ``F.smooth_l1_loss(pred, get_at_index(F.layer_norm(h, (D,)), idx))``);
    data2vec: the top K blocks, ``instance_norm=True``, ``layer_norm=True``,
    ``dim_scale=D ** 0.5`` (summed over D and scaled by 1 / sqrt(D)). Both off: plain
    regression to the (averaged) teacher tokens. The gradient flows to ``pred`` only.

    The fused path (kernels/masked.py; a portable twin on CPU) walks the scored pairs, reads
    each pair's K target rows straight from the teacher tensor (any strides) and normalises
    them on the fly: no gathered, normalised or float32 copy of the targets, and no
    difference tensor, is stored; it keeps per-pair layer-norm statistics (and the (K, N, D)
    instance-norm statistics, a separate reduction over L) for the backward. A list of
    layers that are equally spaced views of one storage (``list(t)``, ``t.unbind(0)``) is
    read in place; any other list is stacked first, a copy of K N L D values in the
    targets' dtype (pass a (K, N, L, D) tensor to avoid it). Arithmetic in float32 (float64
    for float64 ``pred``), the sum over pairs in float64, the result in pred's dtype. A
    packed (M, D) ``pred`` is checked against the mask's count and integer indices against
    [0, L): each reads the mask on the host once (a device synchronisation on CUDA; skipped
    under torch.compile and on meta tensors; a bool mask with (N, L, D) predictions reads
    nothing). On the portable path the forward also writes the gradient of float32/float64
    ``pred`` into a pred-shaped buffer that the backward scales (as ``masked_patch_loss``).
    """
    _checks.floating(pred, "pred")
    t = _latent_targets(targets, pred)
    K, N, L, D = t.shape
    if D < 1:
        raise _checks.ShapeError(f"targets must have D >= 1 channels, got shape "
                                 f"{tuple(t.shape)}")
    loss = _checks.choice(loss, "loss", ("mse", "l1", "smooth_l1"))
    beta = _checks.number(beta, "beta", lo=0.0, lo_open=True)
    layer_norm = _checks.flag(layer_norm, "layer_norm")
    instance_norm = _checks.flag(instance_norm, "instance_norm")
    eps = _checks.number(eps, "eps", lo=0.0)
    scale = float(D) if dim_scale is None else \
        _checks.number(dim_scale, "dim_scale", lo=0.0, lo_open=True)
    if instance_norm and L < 1:
        raise ValueError("instance_norm needs at least one token per image (L >= 1), got L = 0")
    rows, weight, prow, trow = _latent_pairs(pred, mask, N, L, D)
    ell, _, _ = _ops.masked_latent(rows, t, weight, prow, trow, loss, beta, layer_norm,
                                   instance_norm, scale, eps)
    w = weight.to(torch.float64)
    total = (w * ell.to(torch.float64)).sum()
    return (total / w.sum().clamp_min(torch.finfo(torch.float64).tiny)).to(pred.dtype)
