"""Empirical characteristic function sums of sliced projections (``fastssl.losses.sketch``).

Projections x (V, N, M) float32 (V independent sets of N samples, M directions) and knots
t (K,) float32:

``forward``   C[v, m, k] = sum_n cos(t_k x[v, n, m]),   S[v, m, k] = sum_n sin(t_k x[v, n, m])
              One program per (set v, block of BM directions, knot k) and a loop over the N
              samples in blocks of BN: each lane adds its samples in order, the block is
              reduced once at the end. Every program owns its outputs: no atomics, bitwise
              reproducible.
``backward``  with upstream gradients gC, gS (V, M, K):
              d x[v, n, m] = sum_k t_k (gS[v, m, k] cos(t_k x) - gC[v, m, k] sin(t_k x))
              One program per (set, block of BN samples, block of BM directions), a loop
              over the knots.

Nothing of size (N x M x K) exists: the forward reads x once per knot, the backward once.
Both evaluate cos and sin at t_k x exactly (no angle-addition recurrence over the knots),
so they are as accurate as the eager formula's float32 arithmetic.
"""
import torch
import triton
import triton.language as tl

from .infonce import _interpret, _launch_opts


@triton.jit
def _fwd_kernel(X, T, C, S, N, M, K, BN: tl.constexpr, BM: tl.constexpr):
    v = tl.program_id(0).to(tl.int64)
    mb = tl.program_id(1)
    k = tl.program_id(2)
    cols = mb * BM + tl.arange(0, BM)
    c_ok = cols < M
    t = tl.load(T + k)
    base = X + v * N * M
    acc_c = tl.zeros([BN, BM], dtype=tl.float32)
    acc_s = tl.zeros([BN, BM], dtype=tl.float32)
    for n0 in range(0, N, BN):
        rows = n0 + tl.arange(0, BN)
        ok = (rows < N)[:, None] & c_ok[None, :]
        x = tl.load(base + rows.to(tl.int64)[:, None] * M + cols[None, :], mask=ok, other=0.0)
        tx = t * x
        acc_c += tl.where(ok, tl.cos(tx), 0.0)
        acc_s += tl.where(ok, tl.sin(tx), 0.0)
    out = v * M * K + cols.to(tl.int64) * K + k
    tl.store(C + out, tl.sum(acc_c, 0), mask=c_ok)
    tl.store(S + out, tl.sum(acc_s, 0), mask=c_ok)


@triton.jit
def _bwd_kernel(X, T, GC, GS, DX, N, M, K, BN: tl.constexpr, BM: tl.constexpr):
    v = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.program_id(2) * BM + tl.arange(0, BM)
    c_ok = cols < M
    ok = (rows < N)[:, None] & c_ok[None, :]
    offs = v * N * M + rows.to(tl.int64)[:, None] * M + cols[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0)
    g_base = v * M * K + cols.to(tl.int64) * K
    dx = tl.zeros([BN, BM], dtype=tl.float32)
    for k in range(0, K):
        t = tl.load(T + k)
        gc = tl.load(GC + g_base + k, mask=c_ok, other=0.0)
        gs = tl.load(GS + g_base + k, mask=c_ok, other=0.0)
        tx = t * x
        dx += t * (gs[None, :] * tl.cos(tx) - gc[None, :] * tl.sin(tx))
    tl.store(DX + offs, dx, mask=ok)


def config(interpret=None):
    """Block sizes per pass: 32 x 64 tiles on the GPU at 4 warps (16 float32 registers a
    thread per tile-sized value: the forward's two accumulators, the backward's x and
    gradient, beside libdevice's cos and sin; 64 x 64 tiles spill in the backward);
    32 x 32 in the interpreter (test shapes cross several tiles)."""
    if _interpret() if interpret is None else interpret:
        small = dict(BN=32, BM=32, num_warps=4, num_stages=1)
        return {"fwd": small, "bwd": small}
    return {"fwd": dict(BN=32, BM=64, num_warps=4, num_stages=1),
            "bwd": dict(BN=32, BM=64, num_warps=4, num_stages=1)}


def _checked(x, t):
    if x.dtype != torch.float32 or t.dtype != torch.float32:
        raise TypeError(f"ecf sums take float32 projections and knots, got {x.dtype}, {t.dtype}")
    return x.contiguous(), t.contiguous()


def forward(x, t):
    """(C, S), each (V, M, K) float32: the sums over the samples (module docstring)."""
    x, t = _checked(x, t)
    V, N, M = x.shape
    K = t.shape[0]
    C = torch.zeros(V, M, K, device=x.device, dtype=torch.float32)
    S = torch.zeros_like(C)
    if V * N * M * K == 0:
        return C, S
    cfg = config()["fwd"]
    _fwd_kernel[(V, triton.cdiv(M, cfg["BM"]), K)](
        x, t, C, S, N, M, K, BN=cfg["BN"], BM=cfg["BM"], **_launch_opts(cfg))
    return C, S


def backward(x, t, grad_c, grad_s):
    """d x (V, N, M) float32 from the gradients of C and S (module docstring)."""
    x, t = _checked(x, t)
    V, N, M = x.shape
    K = t.shape[0]
    dx = torch.zeros_like(x)
    if V * N * M * K == 0:
        return dx
    cfg = config()["bwd"]
    _bwd_kernel[(V, triton.cdiv(N, cfg["BN"]), triton.cdiv(M, cfg["BM"]))](
        x, t, grad_c.float().contiguous(), grad_s.float().contiguous(), dx, N, M, K,
        BN=cfg["BN"], BM=cfg["BM"], **_launch_opts(cfg))
    return dx


def shipped_configs():
    """Every (kernel, signature, constexprs, options) the launchers can use on a GPU."""
    c = config(interpret=False)
    ce = {p: dict(BN=c[p]["BN"], BM=c[p]["BM"]) for p in c}
    ints = {"N": "i32", "M": "i32", "K": "i32"}
    fwd = {"X": "*fp32", "T": "*fp32", "C": "*fp32", "S": "*fp32", **ints}
    bwd = {"X": "*fp32", "T": "*fp32", "GC": "*fp32", "GS": "*fp32", "DX": "*fp32", **ints}
    return [(_fwd_kernel, fwd, ce["fwd"], c["fwd"]), (_bwd_kernel, bwd, ce["bwd"], c["bwd"])]
