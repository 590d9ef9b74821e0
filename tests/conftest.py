import os
import sys

import torch

# The Triton interpreter is chosen when a kernel is decorated: without CUDA, set it before
# anything imports fastssl.kernels. Kernels then run on CPU tensors with
# FASTSSL_BACKEND=triton; with CUDA the same tests run the compiled kernels.
CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

from fastssl import _reference  # noqa: E402


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    """Run a test on the portable path and on the Triton kernels (interpreted on CPU)."""
    monkeypatch.setenv("FASTSSL_BACKEND", request.param)
    # Small column blocks so the portable path's chunking is exercised at test sizes.
    monkeypatch.setattr(_reference, "BLOCK", 96)
    return request.param


@pytest.fixture
def device():
    return torch.device("cuda" if CUDA else "cpu")
