"""pytest-benchmark: NT-Xent forward+backward, fastssl against eager PyTorch and
torch.compile of it, on CUDA when present (else small CPU sizes on the portable path).

    pytest benchmarks --benchmark-columns=median,iqr,rounds
"""
import pytest
import torch

import fastssl
from fastssl import bench
from fastssl.bench import eager_nt_xent

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
CASES = [(16384, 256, torch.bfloat16), (65536, 256, torch.bfloat16), (16384, 128, torch.float32)] \
    if CUDA else [(4096, 64, torch.float32)]
IMPLS = {"fastssl": fastssl.nt_xent, "eager": eager_nt_xent,
         "compile": torch.compile(eager_nt_xent)}
SIGLIP = {"fastssl": bench.fastssl_siglip, "eager": bench.eager_siglip,
          "compile": torch.compile(bench.eager_siglip)}
SIGLIP_CASES = [(32768, 768, torch.bfloat16)] if CUDA else [(2048, 256, torch.float32)]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("two_n,D,dtype", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_nt_xent_fwd_bwd(benchmark, impl, two_n, D, dtype):
    if impl != "fastssl" and CUDA and two_n * two_n * 4 * 6 > torch.cuda.mem_get_info()[0]:
        pytest.skip(f"{impl} needs O(n^2) memory: more than this GPU has free at 2N={two_n}")
    g = torch.Generator(device=DEVICE).manual_seed(0)
    z0 = torch.randn(two_n // 2, D, device=DEVICE, dtype=dtype, generator=g, requires_grad=True)
    z1 = torch.randn(two_n // 2, D, device=DEVICE, dtype=dtype, generator=g, requires_grad=True)
    fn = IMPLS[impl]

    def step():
        fn(z0, z1).backward()
        z0.grad = z1.grad = None
        _sync()

    step()  # warm up (and compile)
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu",
                                torch=torch.__version__, rows=two_n, D=D, dtype=str(dtype))
    benchmark.pedantic(step, rounds=5 if CUDA else 2, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", list(SIGLIP))
@pytest.mark.parametrize("n,D,dtype", SIGLIP_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_siglip_fwd_bwd(benchmark, impl, n, D, dtype):
    if impl != "fastssl" and CUDA and n * n * 4 * 6 > torch.cuda.mem_get_info()[0]:
        pytest.skip(f"{impl} needs O(n^2) memory: more than this GPU has free at n={n}")
    a, b = bench.make_inputs("siglip", n, D, dtype, DEVICE)
    fn = SIGLIP[impl]

    def step():
        fn(a, b).backward()
        a.grad = b.grad = None
        _sync()

    step()
    benchmark.extra_info.update(device=torch.cuda.get_device_name() if CUDA else "cpu",
                                torch=torch.__version__, n=n, D=D, dtype=str(dtype))
    benchmark.pedantic(step, rounds=5 if CUDA else 2, iterations=1, warmup_rounds=1)
