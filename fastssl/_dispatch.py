"""The one place that decides which implementation runs a call.

CUDA tensors with Triton importable take the Triton kernels; anything else takes the
portable PyTorch path in ``fastssl._reference``; float64 always takes the portable path.
``FASTSSL_BACKEND=triton|torch`` forces a path (read on every call). ``triton`` with CPU
tensors runs the kernels through the Triton interpreter, which needs ``TRITON_INTERPRET=1``
before triton is first imported; on a machine without CUDA, fastssl sets it itself when
``FASTSSL_BACKEND=triton`` is set before fastssl (and triton) are imported.

Shape inference. Meta tensors (and the fake tensors of tracers) hold no values: ``shape_only``
says so, and it is the one rule for them. ``fastssl._ops._Op`` sends such calls to the
registered custom op, whose fake implementation gives outputs of the right shape and dtype
(and whose autograd formula gives the gradients' shapes); ``backend`` gives meta tensors the
portable path, whose torch ops infer shapes, for the few callers that use a kernel module
directly (Sinkhorn-Knopp's passes, the augmentation passes) whatever FASTSSL_BACKEND says.
"""
import importlib
import importlib.util
import os
import sys

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

BACKENDS = ("auto", "triton", "torch")
_modules = {}


def triton_available():
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _wants_interpreter():
    """FASTSSL_BACKEND=triton on a machine without CUDA, TRITON_INTERPRET unset."""
    return (os.environ.get("FASTSSL_BACKEND", "").strip().lower() == "triton"
            and "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available())


def _choose_interpreter():
    """Set TRITON_INTERPRET=1 for a forced triton backend without CUDA. Triton decides at
    its own import whether its kernels (and its standard library's) are interpreted, so
    this works only before triton is first imported; afterwards it raises, saying so."""
    if not _wants_interpreter():
        return
    if "triton" in sys.modules:
        raise RuntimeError(
            "FASTSSL_BACKEND=triton with CPU tensors runs the kernels in the Triton "
            "interpreter, which must be chosen before triton is first imported: set "
            "TRITON_INTERPRET=1 in the environment (or set FASTSSL_BACKEND=triton before "
            "importing fastssl and triton)")
    os.environ["TRITON_INTERPRET"] = "1"


if _wants_interpreter() and "triton" not in sys.modules:
    _choose_interpreter()  # at import, when FASTSSL_BACKEND=triton was set first


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def requested():
    value = os.environ.get("FASTSSL_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTSSL_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def _is_meta(t):
    return isinstance(t, torch.Tensor) and t.device.type == "meta"


def shape_only(args):
    """Whether a call on ``args`` can only infer shapes: some argument is a meta tensor or
    a tensor subclass (FakeTensor, FunctionalTensor, ...: a tracer's), or a tracer or
    dispatch mode is active. Such a call must take the ops' fake implementations."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return True
    return any(isinstance(a, torch.Tensor) and (type(a) not in (torch.Tensor, torch.nn.Parameter)
                                                or a.device.type == "meta") for a in args)


def backend(*tensors):
    """'triton' or 'torch' for a call on these tensors (None entries are ignored).

    float64 always takes the portable path, in float64 on the tensors' device: the kernels
    accumulate in float32 and take fp32/fp16/bf16 operands. Meta tensors take it too (their
    shapes are inferred by its torch ops; a kernel cannot run on them).
    """
    want = requested()
    present = [t for t in tensors if t is not None]
    if want == "torch" or any(t.dtype == torch.float64 or _is_meta(t) for t in present):
        return "torch"
    on_cuda = all(t.is_cuda for t in present)
    if want == "triton":
        if not triton_available():
            raise RuntimeError("FASTSSL_BACKEND=triton but triton cannot be imported")
        if not on_cuda and not interpreting():
            cuda = torch.cuda.is_available()
            if _modules or cuda or "TRITON_INTERPRET" in os.environ:
                raise RuntimeError(
                    "FASTSSL_BACKEND=triton with CPU tensors runs the kernels in the Triton "
                    "interpreter: set TRITON_INTERPRET=1 before fastssl's kernels are first "
                    "imported (TRITON_INTERPRET is "
                    f"{os.environ.get('TRITON_INTERPRET', 'unset')}"
                    + (", and no CUDA device is present)" if not cuda else
                       "), or pass CUDA tensors, or set FASTSSL_BACKEND=torch"))
        return "triton"
    return "triton" if on_cuda and triton_available() and not interpreting() else "torch"


def kernels(family):
    """The module implementing an op family ('infonce', ...) for the chosen backend."""
    if family not in _modules:
        _choose_interpreter()
        _modules[family] = importlib.import_module(f"fastssl.kernels.{family}")
    return _modules[family]


def implementation(family, *tensors):
    """(backend name, module with forward/backward) for one call."""
    name = backend(*tensors)
    if name == "triton":
        return name, kernels(family)
    from fastssl import _reference
    return name, getattr(_reference, family)


def describe():
    """{op family: the path a call on this machine's default device takes, and why}."""
    cuda = torch.cuda.is_available()
    want = requested()
    if want == "torch":
        why = "torch (forced by FASTSSL_BACKEND=torch)"
    elif want == "triton":
        why = "triton (forced; " + ("CUDA)" if cuda else "CPU tensors run in the Triton interpreter)")
    elif cuda and triton_available():
        why = "triton on CUDA tensors; torch (portable) on CPU tensors"
    elif cuda:
        why = "torch (portable): triton is not importable"
    else:
        why = "torch (portable): no CUDA device"
    if want == "torch" or not cuda:
        ema = "torch._foreach_lerp_" + (" (forced)" if want == "torch" else ": no CUDA device")
    else:
        ema = "CUDA multi-tensor kernel (csrc/ema.cu, built on first use; foreach fallback)"
    return {"infonce (nt_xent, info_nce, clip_loss)": why, "siglip (siglip_loss)": why,
            "barlow (barlow_twins, vicreg: Gram formulation)": why,
            "augment (crop/resize, colour, blur passes)": why,
            "prototype (prototype_cross_entropy, sinkhorn_knopp)": why,
            "masked (masking.masked_patch_loss, masked_latent_loss)": why,
            "kmeans (clustering.kmeans, clustering.assign)": why,
            "sketch (losses.SIGReg, LeJEPALoss)": why,
            "ema (update_momentum, EMA)": ema}
