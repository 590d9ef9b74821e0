"""k-means: fastssl's fit (``clustering.kmeans``) against the eager formulation (the full
(N x K) distance matrix, ``argmin``, ``index_add_``), scikit-learn's Lloyd ``KMeans`` and
faiss's ``Kmeans``, each from the same initial centroids for the same number of
iterations, on the same float32 rows. One iteration and a longer fit per (N, K); time, peak
extra memory (CPU: peak RSS of a child process per case; GPU: the allocator's peak) and the
inertia each reaches (they agree to float32 rounding when the iterations agree)."""
import json
import os
import sys

import torch

from . import timing
from .timing import noop

KS = {"cpu": (1000, 10000), "cuda": (1000, 10000, 65536)}
EAGER_LIMIT = 4 << 30  # the eager formulation's (N x K) float32 matrix: skipped above 4 GiB
CPU_FIT_LIMIT = 10 ** 9  # N x K above this on a CPU: one iteration only (~1 min each)


def make_case(n, k, D, seed=0, device="cpu", dtype=torch.float32):
    """(x (n, D), init (k, D)): standard normal rows and the first k of them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g).to(device, dtype)
    return x, x[:k].clone()


def _eager(x, init, iterations):
    """k-means as people write it in torch: every distance in one (N x K) matrix."""
    c = init.clone()
    k = c.shape[0]
    for _ in range(iterations + 1):
        d = x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)
        labels = d.argmin(1)
        if _ == iterations:
            return labels, d.gather(1, labels[:, None]).sum()
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)[:, None]
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)


def _fastssl(x, init, iterations):
    from fastssl import clustering
    r = clustering.kmeans(x, init.shape[0], iterations, init=init, empty="keep")
    return r.labels, r.inertia


def _sklearn(x, init, iterations):
    from sklearn.cluster import KMeans
    km = KMeans(n_clusters=init.shape[0], init=init.numpy(), n_init=1, max_iter=iterations,
                tol=0.0, algorithm="lloyd").fit(x.numpy())
    return km.labels_, km.inertia_


def _faiss(x, init, iterations):
    import faiss
    km = faiss.Kmeans(x.shape[1], init.shape[0], niter=iterations,
                      max_points_per_centroid=10 ** 9, seed=0, verbose=False)
    km.train(x.numpy(), init_centroids=init.numpy())
    dist, labels = km.index.search(x.numpy(), 1)
    return labels[:, 0], float(dist.sum())


FIT = {"fastssl": _fastssl, "eager": _eager, "scikit-learn": _sklearn, "faiss-cpu": _faiss}
PEERS = {"scikit-learn": "sklearn", "faiss-cpu": "faiss"}

_CHILD = """
import ctypes, gc, json, sys, time, torch
sys.path[:0] = {path!r}
torch.set_num_threads({threads})
from fastssl.bench.kmeans import FIT, make_case
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
fit = FIT[{impl!r}]
x, init = make_case({n}, {k}, {D})
fit(x[:2 * {k}], init, 1)  # warm-up: imports, thread pools, first allocations
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS counter here
base = rss("VmRSS:")
t0 = time.perf_counter()
_, inertia = fit(x, init, {iterations})
seconds = time.perf_counter() - t0
print(json.dumps({{"ms": 1e3 * seconds, "peak_extra_mib": (rss("VmHWM:") - base) / 2**20,
                  "inertia": float(inertia)}}))
"""


def _cpu_case(impl, n, k, D, iterations, timeout=3600):
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _CHILD.format(path=[here], threads=torch.get_num_threads(), impl=impl, n=n, k=k,
                         D=D, iterations=iterations)
    env = dict(os.environ, FASTSSL_BACKEND="torch")
    try:
        out = timing.subprocess.run([sys.executable, "-c", code], capture_output=True,
                                    text=True, env=env, timeout=timeout)
    except timing.subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _gpu_case(impl, n, k, D, iterations, dtype):
    x, init = make_case(n, k, D, device="cuda", dtype=dtype)
    fit = FIT[impl]
    fit(x[:2 * k], init, 1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    _, inertia = fit(x, init, iterations)
    end.record()
    torch.cuda.synchronize()
    return {"ms": start.elapsed_time(end), "inertia": float(inertia),
            "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2 ** 20}


def available(cuda):
    """({impl: True} that run here, {impl: why not}) for the peers."""
    impls, missing = ["fastssl", "eager"], {}
    if cuda:
        return impls, {p: "CPU libraries: the GPU run times fastssl and eager" for p in PEERS}
    for impl, module in PEERS.items():
        try:
            __import__(module)
            impls.append(impl)
        except ImportError as e:
            missing[impl] = f"{type(e).__name__}: {e}"
    return impls, missing


def bench_kmeans(quick, log, save=noop, sizes=None, dims=None, dtypes=None):
    """One iteration and a ``fit``-iteration run (20 on a GPU, 5 on a CPU; quick: 3) for each
    N in ``sizes`` and K in ``KS``, D = ``dims[0]`` (default 256); on a CPU the longer run
    only where N x K <= CPU_FIT_LIMIT."""
    cuda = torch.cuda.is_available()
    where = "cuda" if cuda else "cpu"
    sizes = sizes or (([100_000] if quick else [100_000, 1_000_000]) if cuda else
                      ([20_000] if quick else [100_000, 1_000_000]))
    D = (dims or [256])[0]
    ks = KS[where][:1] if quick else KS[where]
    fit_iters = 3 if quick else (20 if cuda else 5)
    dtype = getattr(torch, (dtypes or ["bfloat16" if cuda else "float32"])[0])
    impls, missing = available(cuda)
    for impl, why in missing.items():
        log(f"note: {impl} not benchmarked ({why})")
    rows = []
    for n in sizes:
        for k in ks:
            if k > n:
                continue
            long = cuda or n * k <= CPU_FIT_LIMIT
            for iterations in (1, fit_iters) if long else (1,):
                for impl in impls:
                    row = {"op": "kmeans", "impl": impl, "rows": n, "K": k, "D": D,
                           "dtype": str(dtype if cuda else torch.float32).replace("torch.", ""),
                           "iterations": iterations}
                    if impl == "eager" and n * k * 4 > EAGER_LIMIT:
                        row["error"] = f"needs the {n * k * 4 / 2**30:.0f} GiB (N x K) matrix"
                    elif cuda:
                        try:
                            row.update(_gpu_case(impl, n, k, D, iterations, dtype))
                        except torch.cuda.OutOfMemoryError:
                            row["error"] = "out of GPU memory"
                            torch.cuda.empty_cache()
                    else:
                        row.update(_cpu_case(impl, n, k, D, iterations))
                    if "ms" in row:
                        row["ms_per_iteration"] = row["ms"] / iterations
                    rows.append(row)
                    log(fmt(row))
                    save(rows)
    return rows, {"peers": {"missing": missing}}


def fmt(row):
    head = (f"  {row['impl']:>14} kmeans N={row['rows']:>8} K={row['K']:>6} D={row['D']:>4} "
            f"{row['dtype']:>8} {row['iterations']:>2} it: ")
    if "error" in row:
        return head + row["error"]
    return head + (f"{row['ms']:10.1f} ms ({row['ms_per_iteration']:9.1f} ms/it)  peak extra "
                   f"{row['peak_extra_mib']:8.1f} MiB  inertia {row['inertia']:.6g}")
