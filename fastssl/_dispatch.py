"""The one place that decides which implementation runs a call.

CUDA tensors with Triton importable take the Triton kernels; anything else takes the
portable PyTorch path in ``fastssl._reference``. ``FASTSSL_BACKEND=triton|torch`` forces a
path (read on every call). ``triton`` with CPU tensors runs the kernels through the Triton
interpreter, which needs ``TRITON_INTERPRET=1`` before the kernels are first imported;
on a machine without CUDA, fastssl sets it itself when ``FASTSSL_BACKEND=triton`` is set
before fastssl's kernels load.
"""
import importlib
import os

import torch

BACKENDS = ("auto", "triton", "torch")
_modules = {}


def triton_available():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def requested():
    value = os.environ.get("FASTSSL_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"FASTSSL_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}")
    return value


def backend(*tensors):
    """'triton' or 'torch' for a call on these tensors (None entries are ignored).

    float64 always takes the portable path, in float64 on the tensors' device: the kernels
    accumulate in float32 and take fp32/fp16/bf16 operands.
    """
    want = requested()
    present = [t for t in tensors if t is not None]
    if want == "torch" or any(t.dtype == torch.float64 for t in present):
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
        if (requested() == "triton" and not torch.cuda.is_available()
                and "TRITON_INTERPRET" not in os.environ):
            os.environ["TRITON_INTERPRET"] = "1"
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
            "ema (update_momentum, EMA)": ema}
