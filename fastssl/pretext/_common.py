"""The pretext transforms' shared checks and draws: the image batch, the generator, the
accumulation dtype, replayed parameters and batched uniform integers."""
import torch

from fastssl import _checks


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
