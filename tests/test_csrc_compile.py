"""CUDA C++ in csrc/ compiles with no GPU present: every .cu with nvcc for sm_80 and sm_90,
every torch binding with g++ -fsyntax-only against torch's headers."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
NVCC = shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda*/bin/nvcc")), None)


def test_csrc_has_sources():
    assert glob.glob(os.path.join(CSRC, "*.cu")) and glob.glob(os.path.join(CSRC, "*.cpp"))


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(CSRC, "*.cu"))),
                         ids=os.path.basename)
def test_cuda_sources_compile_for_sm80_and_sm90(source, tmp_path):
    out = subprocess.run([NVCC, "-c", "-O3", "-gencode=arch=compute_80,code=sm_80",
                          "-gencode=arch=compute_90,code=sm_90", source, "-o",
                          str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
@pytest.mark.parametrize("source", sorted(glob.glob(os.path.join(CSRC, "*.cpp"))),
                         ids=os.path.basename)
def test_bindings_compile_against_torch_headers(source):
    flags = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    out = subprocess.run(["g++", "-fsyntax-only", "-std=c++17", "-w", *flags,
                          "-DTORCH_EXTENSION_NAME=fastssl_check", source],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
