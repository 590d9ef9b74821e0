"""k-means passes without the (N x K) distance matrix (``fastssl.clustering``).

Rows X (N x D) and centroids C (K x D) with squared norms q_k = ||c_k||^2 (float32):

``assign``       (one program per block of rows, one pass over the centroids): the nearest
                 centroid of every row and its distance. Euclidean: score_ik = q_k - 2 x_i . c_k
                 (||x_i - c_k||^2 less ||x_i||^2, the same minimiser), the distance
                 max(||x_i||^2 + min_k score_ik, 0); spherical: score_ik = -x_i . c_k (the
                 largest cosine for unit rows), the distance 1 - max_k x_i . c_k. Each tile
                 keeps its minimum and its first index (``tl.argmin`` breaks ties to the
                 left); a later tile replaces the running best only when strictly smaller,
                 so ties go to the lowest index, as ``argmin`` over the whole row does.
``segment_sum``  (one program per (centroid, D chunk)): the sum of the rows assigned to a
                 centroid, read through ``order`` (the rows sorted by label) between
                 ``offsets[k]`` and ``offsets[k + 1]``. Every program owns its output and
                 adds its rows in one fixed order: no atomics, bitwise reproducible.

Tile products of float32 rows use three TF32 passes (``tf32x3``: close to float32's
accuracy, still on the tensor cores) rather than one: an assignment that a 10-bit mantissa
would flip is a wrong assignment, not a rounding.
"""
import torch
import triton
import triton.language as tl

from .infonce import _dot_tile, _interpret, _launch_opts, _TY

# float32 tiles in three TF32 passes (about float32's accuracy, on the tensor cores)
_PRECISION = {torch.float32: "tf32x3", torch.float16: "tf32", torch.bfloat16: "tf32"}


@triton.jit
def _assign_kernel(X, C, QC, QX, LABEL, DIST, n, K, D, s_x0, s_x1, s_c0, s_c1,
                   SPHERICAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BM + tl.arange(0, BM).to(tl.int64)
    r_ok = rows < n
    best = tl.full([BM], float("inf"), dtype=tl.float32)
    arg = tl.zeros([BM], dtype=tl.int32)
    for k0 in range(0, K, BN):
        keys = k0 + tl.arange(0, BN).to(tl.int64)
        k_ok = keys < K
        x = _dot_tile(X, rows, n, s_x0, s_x1, C, keys, K, s_c0, s_c1, D,
                      BM, BN, BK, PRECISION, INTERPRET)
        if SPHERICAL:
            score = -x
        else:
            score = tl.load(QC + keys, mask=k_ok, other=0.0)[None, :] - 2.0 * x
        score = tl.where(k_ok[None, :], score, float("inf"))
        tile_best = tl.min(score, 1)
        tile_arg = tl.argmin(score, 1, tie_break_left=True).to(tl.int32) + k0
        better = tile_best < best
        arg = tl.where(better, tile_arg, arg)
        best = tl.where(better, tile_best, best)
    if SPHERICAL:
        dist = 1.0 + best
    else:
        dist = tl.maximum(tl.load(QX + rows, mask=r_ok, other=0.0) + best, 0.0)
    tl.store(LABEL + rows, arg, mask=r_ok)
    tl.store(DIST + rows, dist, mask=r_ok)


@triton.jit
def _segment_sum_kernel(X, ORDER, OFFSETS, OUT, D, s_x0, s_x1,
                        BR: tl.constexpr, BD: tl.constexpr):
    k = tl.program_id(0).to(tl.int64)
    pd = tl.program_id(1).to(tl.int64)
    dd = pd * BD + tl.arange(0, BD).to(tl.int64)
    d_ok = dd < D
    start = tl.load(OFFSETS + k)
    end = tl.load(OFFSETS + k + 1)
    acc = tl.zeros([BD], dtype=tl.float32)
    for r0 in range(start, end, BR):
        rr = r0 + tl.arange(0, BR)
        r_ok = rr < end
        idx = tl.load(ORDER + rr, mask=r_ok, other=0).to(tl.int64)
        x = tl.load(X + idx[:, None] * s_x0 + dd[None, :] * s_x1,
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    tl.store(OUT + k * D + dd, acc, mask=d_ok)


def config(dtype, D, interpret=None):
    """Block sizes per (dtype, D class); 64-wide in the interpreter (test shapes cross
    several tiles)."""
    if _interpret() if interpret is None else interpret:
        return {"assign": dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=1),
                "segment": dict(BR=64, BD=64, num_warps=4, num_stages=1)}
    bk = 32 if (dtype == torch.float32 or D <= 32) else 64
    return {"assign": dict(BM=128, BN=64, BK=bk, num_warps=8,
                           num_stages=1 if dtype == torch.float32 else 2),
            "segment": dict(BR=32, BD=128, num_warps=4, num_stages=1)}


def assign(x, centroids, spherical):
    """(labels (N,) int64, distances (N,) float32): the nearest centroid of every row (see
    the module docstring). centroids are cast to x's dtype."""
    n, D = x.shape
    K = centroids.shape[0]
    c = centroids.to(x.dtype).contiguous()
    label = torch.empty(n, device=x.device, dtype=torch.int32)
    dist = torch.empty(n, device=x.device, dtype=torch.float32)
    if n == 0:
        return label.long(), dist
    qc = c.float().pow(2).sum(1).contiguous()
    qx = x.float().pow(2).sum(1).contiguous()
    cfg = config(x.dtype, D)["assign"]
    _assign_kernel[(triton.cdiv(n, cfg["BM"]),)](
        x, c, qc, qx, label, dist, n, K, D, *x.stride(), *c.stride(),
        SPHERICAL=bool(spherical), BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"],
        PRECISION=_PRECISION[x.dtype], INTERPRET=_interpret(), **_launch_opts(cfg))
    return label.long(), dist


def segment_sum(x, labels, K):
    """(K, D) float32: the sum of x's rows per label, each label's rows added in the order of
    a stable sort by label (module docstring)."""
    n, D = x.shape
    out = torch.zeros(K, D, device=x.device, dtype=torch.float32)
    if n == 0 or K == 0:
        return out
    order = torch.sort(labels, stable=True).indices.to(torch.int32)
    counts = torch.bincount(labels, minlength=K)
    offsets = torch.zeros(K + 1, device=x.device, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    cfg = config(x.dtype, D)["segment"]
    _segment_sum_kernel[(K, triton.cdiv(D, cfg["BD"]))](
        x, order, offsets, out, D, *x.stride(), BR=cfg["BR"], BD=cfg["BD"],
        **_launch_opts(cfg))
    return out


def shipped_configs():
    """Every (kernel, signature, constexprs, options) the launchers can use on a GPU."""
    out, seen = [], set()
    i32 = "i32"
    for dtype, ty in _TY.items():
        for D in (32, 256):  # the two D classes of ``config``
            c = config(dtype, D, interpret=False)
            a, s = c["assign"], c["segment"]
            if (dtype, a["BK"]) in seen:
                continue
            seen.add((dtype, a["BK"]))
            sig = {"X": ty, "C": ty, "QC": "*fp32", "QX": "*fp32", "LABEL": "*i32",
                   "DIST": "*fp32"}
            sig.update({k: i32 for k in ("n", "K", "D", "s_x0", "s_x1", "s_c0", "s_c1")})
            for spherical in (False, True):
                out.append((_assign_kernel, sig, dict(
                    SPHERICAL=spherical, BM=a["BM"], BN=a["BN"], BK=a["BK"],
                    PRECISION=_PRECISION[dtype], INTERPRET=False), a))
            if D == 32:  # one segment-sum configuration per dtype
                sig = {"X": ty, "ORDER": "*i32", "OFFSETS": "*i32", "OUT": "*fp32"}
                sig.update({k: i32 for k in ("D", "s_x0", "s_x1")})
                out.append((_segment_sum_kernel, sig, dict(BR=s["BR"], BD=s["BD"]), s))
    return out
