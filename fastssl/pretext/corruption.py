"""Inputs with a part removed or corrupted: the context encoder's hole and its L2, and a
denoising autoencoder's noise; see ``fastssl.pretext``."""
import torch

from fastssl import _checks

from ._common import _generator, _images, _randint


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
