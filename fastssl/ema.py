"""Momentum (EMA) teachers for BYOL / MoCo / DINO.

    ema <- m * ema + (1 - m) * online          (every tensor)

The arithmetic runs in ``compute_dtype(teacher, student)``: the wider of the two dtypes and
at least float32 (a float64 teacher stays float64 whatever the student's dtype, so a step
of 5e-13 is kept; fp16/bf16 pairs compute in float32), rounded once to the teacher's dtype.

On CUDA the update is one multi-tensor kernel launch per (teacher dtype, student dtype)
pair and per ~320 chunks of 64 Ki elements (``csrc/ema.cu``, float32/float16/bfloat16/float64
in any pair, float64 arithmetic where either is float64), built on first use with
``torch.utils.cpp_extension.load`` (ninja) and cached. Where it cannot be built (no nvcc,
no CUDA) fastssl warns once and uses ``torch._foreach_lerp_`` in the same compute dtype;
CPU and meta tensors always take that path (``route`` decides, per group). ``m`` may be a
Python float or a 0-d tensor on the device (no host sync, so a schedule can run inside a
captured CUDA graph).
"""
import copy
import math
import os
import threading
import warnings

import torch
from torch import nn

from fastssl import _checks

_EXT = None
_EXT_ERROR = None
_LOCK = threading.Lock()


def _extension():
    """The compiled CUDA extension, or None (with one warning) when it cannot be built."""
    global _EXT, _EXT_ERROR
    if _EXT is not None or _EXT_ERROR is not None:
        return _EXT
    if os.environ.get("FASTSSL_BACKEND", "auto").lower() == "torch":
        return None
    with _LOCK:
        if _EXT is None and _EXT_ERROR is None:
            try:
                from torch.utils.cpp_extension import load
                here = os.path.dirname(os.path.abspath(__file__))
                csrc = next(p for p in (os.path.join(here, "csrc"),
                                        os.path.join(os.path.dirname(here), "csrc"))
                            if os.path.isfile(os.path.join(p, "ema.cu")))
                ext = load(name="fastssl_ema", sources=[os.path.join(csrc, "ema.cpp"),
                                                        os.path.join(csrc, "ema.cu")],
                           extra_cuda_cflags=["-O3"], verbose=False)
                _self_check(ext)
                _EXT = ext
            except Exception as e:  # no nvcc, no CUDA toolkit, a compiler error, a mismatch
                _EXT_ERROR = e
                warnings.warn(f"fastssl: the CUDA EMA kernel could not be built ({type(e).__name__}: "
                              f"{str(e)[:300]}); using torch._foreach_lerp_ instead", RuntimeWarning)
    return _EXT


@torch.no_grad()
def _self_check(ext):
    """Once per process: the kernel against fp32 arithmetic on a small mixed list (a tensor
    spanning several chunks, odd sizes, a misaligned view, 16-bit teachers); raises on any
    difference, so a broken build falls back instead of corrupting a teacher."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for te, to in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                   (torch.float16, torch.bfloat16), (torch.float64, torch.float32)):
        sizes = (3, 70001, 1 << 17, 1)
        wide = compute_dtype(te, to)
        ema = [torch.randn(n, device="cuda", generator=g).to(te) for n in sizes]
        online = [torch.randn(n + 1, device="cuda", generator=g).to(to)[1:] for n in sizes]
        want = [(0.9 * e.to(wide) + (1 - 0.9) * o.to(wide)).to(te) for e, o in zip(ema, online)]
        ext.ema_update(ema, online, 0.9, None, torch.cuda.current_stream().cuda_stream)
        for e, w in zip(ema, want):
            eps = torch.finfo(te).eps  # one rounding apart (fma against mul + add)
            if not torch.allclose(e.to(wide), w.to(wide), rtol=2 * eps, atol=2 * eps):
                raise RuntimeError(f"the EMA kernel disagrees with {wide} arithmetic")


def _tensor_list(value, name):
    if isinstance(value, torch.Tensor) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    items = list(value)
    if not all(map(torch.is_tensor, items)):
        i = next(i for i, t in enumerate(items) if not torch.is_tensor(t))
        raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(items[i]).__name__}")
    return items


def _momentum(m, name="momentum"):
    """A number or one-element tensor in [0, 1]; a CUDA tensor's value is not read."""
    return _checks.scalar(m, name, lo=0.0, hi=1.0)


def _check(ema, online, m):
    """Every check of ``ema_``; returns the tensor pairs grouped by (device, dtypes). One
    pass per property over the lists (they hold hundreds of tensors, every step)."""
    if len(ema) != len(online):
        raise _checks.ShapeError(f"the teacher has {len(ema)} tensors but the student has "
                                 f"{len(online)}")
    if [e.shape for e in ema] != [o.shape for o in online]:
        i = next(i for i, (e, o) in enumerate(zip(ema, online)) if e.shape != o.shape)
        raise _checks.ShapeError(f"tensor {i}: teacher shape {tuple(ema[i].shape)} != student "
                                 f"{tuple(online[i].shape)}")
    groups = {}
    for i, (e, o) in enumerate(zip(ema, online)):
        key = (e.device, o.device, e.dtype, o.dtype)
        if key not in groups:
            if e.device != o.device:
                raise ValueError(f"tensor {i}: teacher on {e.device}, student on {o.device}")
            if not (e.dtype.is_floating_point and o.dtype.is_floating_point):
                raise ValueError(f"tensor {i}: EMA needs floating tensors, got {e.dtype} / "
                                 f"{o.dtype}")
            groups[key] = ([], [])
        groups[key][0].append(e)
        groups[key][1].append(o)
    _momentum(m)
    if isinstance(m, torch.Tensor) and not _checks.has_values(m):
        real = next((d for d, *_ in groups if d.type != "meta"), None)
        if real is not None:
            raise ValueError(f"momentum is a meta tensor (no value) but the tensors are on "
                             f"{real}: pass a number or a tensor holding the value")
    return groups


@torch.no_grad()
def ema_(ema, online, m):
    """In place: ema[i] <- m * ema[i] + (1 - m) * online[i] for two lists of tensors,
    computed in ``compute_dtype(ema[i].dtype, online[i].dtype)`` and rounded once.

    ``m`` is a number or a one-element tensor in [0, 1] (a CUDA tensor is not read on the
    host: its value is used as it is). Every check runs before any tensor is written, so a
    failing call changes nothing.
    """
    ema, online = _tensor_list(ema, "ema"), _tensor_list(online, "online")
    _update(_check(ema, online, m), m)


def compute_dtype(teacher_dtype, student_dtype):
    """The dtype an update computes in: the wider of the two, at least float32."""
    return torch.promote_types(torch.promote_types(teacher_dtype, student_dtype), torch.float32)


_CODES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # csrc/ema.cpp's codes


def route(device, teacher_dtype, student_dtype, contiguous, kernel_built):
    """Which implementation updates one group of tensor pairs: "kernel" (csrc/ema.cu, CUDA
    tensors, contiguous, a dtype pair it takes, the extension built) or "foreach" (torch's
    lerp in ``compute_dtype``: everything else, CPU and meta tensors included). Both compute
    in ``compute_dtype(teacher_dtype, student_dtype)``."""
    if (device.type == "cuda" and kernel_built and contiguous
            and teacher_dtype in _CODES and student_dtype in _CODES):
        return "kernel"
    return "foreach"


def _update(groups, m):
    """The writes of ``ema_`` on groups from ``_check``: the CUDA kernel or foreach lerp."""
    for (device, _, e_dtype, o_dtype), (es, os_) in groups.items():
        ext = _extension() if device.type == "cuda" else None
        contiguous = all(e.is_contiguous() and o.is_contiguous() for e, o in zip(es, os_))
        if route(device, e_dtype, o_dtype, contiguous, ext is not None) == "kernel":
            # the kernel reads a tensor momentum as one float64 on the device (no host sync)
            m_t = (m.reshape(()).to(device, torch.float64) if isinstance(m, torch.Tensor)
                   else None)
            stream = torch.cuda.current_stream(device).cuda_stream
            ext.ema_update(es, os_, 0.0 if m_t is not None else float(m), m_t, stream)
        else:
            _foreach_update(es, os_, m)


def _foreach_update(ema, online, m):
    """ema <- lerp(ema, online, 1 - m) in ``compute_dtype``, rounded once to ema's dtype. A
    tensor ``m`` is used on the device (torch's foreach lerp would read it on the host)."""
    wide = compute_dtype(ema[0].dtype, online[0].dtype)
    if isinstance(m, torch.Tensor):
        weight = 1 - m.reshape(()).to(ema[0].device, wide)
        for e, o in zip(ema, online):
            if e.dtype == wide:
                e.lerp_(o.to(wide), weight)
            else:
                e.copy_(e.to(wide).lerp_(o.to(wide), weight))
        return
    weight = 1.0 - float(m)
    if ema[0].dtype == online[0].dtype:
        torch._foreach_lerp_(ema, online, weight)  # 16-bit lists: float32 arithmetic inside
    elif ema[0].dtype == wide:  # the student widened exactly, the teacher updated in place
        torch._foreach_lerp_(ema, [o.to(wide) for o in online], weight)
    else:
        for e, o in zip(ema, online):  # a 16-bit teacher: one rounding from float32
            e.copy_(e.to(wide).lerp_(o.to(wide), weight))


def _unwrap(model):
    """The module behind DDP / FSDP-style wrappers and torch.compile."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def update_momentum(model: nn.Module, model_ema: nn.Module, m) -> None:
    """lightly's ``update_momentum``: model_ema's parameters <- m * ema + (1 - m) * model's.

    Parameters only (buffers are left alone), matched in ``parameters()`` order.
    """
    for name, v in (("model", model), ("model_ema", model_ema)):
        if not isinstance(v, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(v).__name__}")
    ema_([p.data for p in _unwrap(model_ema).parameters()],
         [p.data for p in _unwrap(model).parameters()], m)


def cosine_schedule(step: int, max_steps: int, start_value: float, end_value: float,
                    period=None) -> float:
    """lightly's cosine schedule from start_value (step 0) to end_value (step max_steps - 1).

    end - (end - start) * (cos(pi * step / (max_steps - 1)) + 1) / 2; end_value once
    max_steps <= 1 or step >= max_steps - 1. With ``period``: the cosine has that period
    and repeats. ValueError for a negative step or max_steps, a period <= 0, or any
    argument that is NaN or infinite; TypeError for one that is not a number; a
    RuntimeWarning when step > max_steps without a period.
    """
    for name, v in (("step", step), ("max_steps", max_steps), ("start_value", start_value),
                    ("end_value", end_value)) + ((("period", period),) if period is not None else ()):
        _checks.number(v, name)
    if step < 0:
        raise ValueError(f"Current step number {step} can't be negative")
    if max_steps < 0:
        raise ValueError(f"Total step number {max_steps} can't be negative")
    if period is not None and period <= 0:
        raise ValueError(f"Period {period} must be larger than 0")
    if period is None and step > max_steps:
        warnings.warn(f"Current step number {step} exceeds max_steps {max_steps}.",
                      category=RuntimeWarning)
    step, max_steps = float(step), float(max_steps)
    start_value, end_value = float(start_value), float(end_value)
    if period is not None:
        cos = math.cos(2 * math.pi * step / period)
        return float(end_value - (end_value - start_value) * (cos + 1) / 2)
    if max_steps <= 1 or step >= max_steps - 1:
        return float(end_value)
    cos = math.cos(math.pi * step / (max_steps - 1))
    return float(end_value - (end_value - start_value) * (cos + 1) / 2)


class EMA(nn.Module):
    """A momentum teacher: a frozen deep copy of ``model`` updated by ``update()``.

    Args:
        model: the student (may be wrapped in DDP or compiled with torch.compile).
        momentum: m at step 0 (or always, with ``schedule=None``).
        final_momentum: m at the last step of the cosine schedule.
        schedule: "cosine" (``cosine_schedule(step, max_steps, momentum, final_momentum)``)
            or None (constant ``momentum``).
        include_buffers: also copy the student's buffers (BatchNorm statistics, counters)
            into the teacher at each update.

    ``update(step=None, max_steps=None)`` applies one step; ``.module`` is the teacher;
    ``state_dict()`` / ``load_state_dict()`` hold the teacher's tensors and the settings.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.996, final_momentum: float = 1.0,
                 schedule="cosine", include_buffers: bool = True):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        momentum = _checks.number(momentum, "momentum", lo=0.0, hi=1.0)
        final_momentum = _checks.number(final_momentum, "final_momentum", lo=0.0, hi=1.0)
        if schedule not in ("cosine", None):
            raise ValueError(f"schedule must be 'cosine' or None, got {schedule!r}")
        include_buffers = _checks.flag(include_buffers, "include_buffers")
        self._student = [model]  # a list, so the student is not registered as a submodule
        self.module = copy.deepcopy(_unwrap(model))
        self.module.requires_grad_(False)
        self.momentum = momentum
        self.final_momentum = final_momentum
        self.schedule = schedule
        self.include_buffers = include_buffers

    def current_momentum(self, step=None, max_steps=None):
        if self.schedule is None or step is None:
            return self.momentum
        if max_steps is None:
            raise ValueError("update(step=...) with the cosine schedule needs max_steps")
        return cosine_schedule(step, max_steps, self.momentum, self.final_momentum)

    @torch.no_grad()
    def update(self, step=None, max_steps=None) -> float:
        """One EMA step; returns the momentum used."""
        m = self.current_momentum(step, max_steps)
        student = _unwrap(self._student[0])
        teacher_params = [p.data for p in self.module.parameters()]
        student_params = [p.data for p in student.parameters()]
        groups = _check(teacher_params, student_params, m)
        teacher_buffers = student_buffers = []
        if self.include_buffers:
            teacher_buffers, student_buffers = list(self.module.buffers()), list(student.buffers())
            if len(teacher_buffers) != len(student_buffers):
                raise _checks.ShapeError(f"the teacher has {len(teacher_buffers)} buffers but the "
                                 f"student has {len(student_buffers)}")
            for i, (t, s) in enumerate(zip(teacher_buffers, student_buffers)):
                if t.shape != s.shape or t.device != s.device:
                    raise (_checks.ShapeError if t.shape != s.shape else ValueError)(
                        f"buffer {i}: teacher {tuple(t.shape)} on {t.device}, "
                        f"student {tuple(s.shape)} on {s.device}")
        # Every check above ran before this first write.
        _update(groups, m)
        if teacher_buffers:
            torch._foreach_copy_(teacher_buffers, student_buffers)
        return m

    def get_extra_state(self):
        return {"momentum": self.momentum, "final_momentum": self.final_momentum,
                "schedule": self.schedule, "include_buffers": self.include_buffers}

    def set_extra_state(self, state):
        self.momentum = state["momentum"]
        self.final_momentum = state["final_momentum"]
        self.schedule = state["schedule"]
        self.include_buffers = state["include_buffers"]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
