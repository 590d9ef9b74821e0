"""Argument checks shared by every public entry point.

Rules (README, "Errors and edge cases"): a value of the wrong kind raises ``TypeError``, a
value of the right kind outside its domain raises ``ValueError``, and every message names
the argument. Numbers may be Python numbers, numpy scalars or one-element tensors; a CPU
tensor is checked like the number it holds. A CUDA tensor is not read on the host (that
would synchronise the device in the hot path): its value is used as it is.
"""
import math
import numbers

import torch
from torch import Tensor


class ShapeError(ValueError, AssertionError, RuntimeError):
    """A tensor of the wrong shape: sizes that differ between inputs (or ranks), a batch
    too small, the wrong number of dimensions. It is a ValueError (fastssl's rule for a
    value outside its domain), an AssertionError (what lightly's VICRegLoss raises for these
    inputs) and a RuntimeError (what torch raises for mismatched shapes inside lightly's and
    open_clip's losses), so code written against any of them catches it."""


def has_values(*tensors):
    """False when some tensor is on the meta device (shape inference, e.g. a model built
    under ``torch.device("meta")``): there, host reads of values (``int(t)``, ``.item()``,
    counts in a mask) are skipped, while shape, dtype and device checks still run."""
    return not any(isinstance(t, Tensor) and t.device.type == "meta" for t in tensors)


def _kind(value):
    return type(value).__name__


def is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def host_value(value, name):
    """The float held by a number or a CPU one-element tensor; None for a CUDA tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a {value.dtype} tensor")
        return float(value.detach().reshape(())) if value.device.type == "cpu" else None
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {_kind(value)} {value!r}"[:200])
    return float(value)


def check_value(v, name, lo=None, hi=None, lo_open=False, hi_open=False, nonzero=False,
                finite=True):
    """Domain checks on a float (NaN always fails)."""
    if math.isnan(v):
        raise ValueError(f"{name} must be a number, not NaN")
    if finite and math.isinf(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if nonzero and v == 0:
        raise ValueError(f"{name} must be non-zero, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {v}")
    return v


def number(value, name, **domain):
    """A Python float from a number or a one-element CPU tensor, checked against ``domain``
    (see ``check_value``). CUDA tensors are refused here: use ``scalar`` for arguments that
    may live on the device."""
    v = host_value(value, name)
    if v is None:
        raise TypeError(f"{name} must be a number or a CPU tensor, got a tensor on {value.device}")
    return check_value(v, name, **domain)


def scalar(value, name, **domain):
    """A number or a one-element tensor, returned unchanged after the checks; a CUDA
    tensor's value is not read (no host synchronisation)."""
    v = host_value(value, name)
    if v is not None:
        check_value(v, name, **domain)
    return value


def integer(value, name, lo=None):
    """A Python int (bool, float and str refused) that is >= lo."""
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool and value.device.type == "cpu":
        value = int(value)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {_kind(value)} {value!r}"[:200])
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def probability(value, name):
    return number(value, name, lo=0.0, hi=1.0)


def is_flag(value):
    """bool, numpy bool, or the integers 0 and 1."""
    if isinstance(value, numbers.Integral) or type(value).__name__ == "bool_":
        return value in (0, 1)
    return False


def flag(value, name):
    if not is_flag(value):
        raise TypeError(f"{name} must be True or False, got {_kind(value)} {value!r}"[:200])
    return bool(value)


def choice(value, name, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    return value


def pair(value, name, *, integer_values=False, **domain):
    """A number or a sequence of two numbers -> a tuple of two checked numbers."""
    if is_number(value) or isinstance(value, Tensor):
        raise TypeError(f"{name} must be a pair of numbers, got {_kind(value)} {value!r}"[:200])
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a pair of numbers, got {_kind(value)} {value!r}"[:200])
    if len(value) != 2:
        raise ValueError(f"{name} must be a pair of numbers, got {len(value)} values: {value!r}")
    if integer_values:
        return tuple(integer(v, name, lo=domain.get("lo")) for v in value)
    out = tuple(number(v, name, **domain) for v in value)
    if out[0] > out[1]:
        raise ValueError(f"{name} must be an increasing pair (lo, hi), got {value!r}")
    return out


def size2(value, name):
    """An int s (s x s) or an (h, w) pair of positive ints -> (h, w): image, grid and crop
    sizes."""
    if is_number(value):
        v = integer(value, name, lo=1)
        return v, v
    return pair(value, name, integer_values=True, lo=1)


def tensor(value, name):
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {_kind(value)}")
    return value


def floating(value, name):
    tensor(value, name)
    if not value.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {value.dtype}")
    return value
