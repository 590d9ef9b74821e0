"""The largest batch whose forward+backward completes (GPU) or stays within a memory
budget (CPU): doubling, then bisection."""
import torch

from .formulations import (DETCON_MASKS, DINO_CROPS, IMPLS, PROTOTYPES, SIGREG_KNOTS,
                           SIGREG_VECTORS, make_inputs)
from .timing import cpu_case, implementation, noop


def _fits_gpu(fn, size, D, dtype, op="infonce"):
    import time
    a = b = None
    try:
        a, b = make_inputs(op, size, D, dtype, "cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(a, b).backward()
        torch.cuda.synchronize()
        return True, time.perf_counter() - t
    except torch.cuda.OutOfMemoryError:
        return False, None
    except RuntimeError as e:  # a limit other than memory (cub's sort of > INT_MAX keys)
        return False, f"{type(e).__name__}: {str(e)[:120]}"
    finally:
        del a, b
        torch.cuda.empty_cache()


def _fits_cpu(impl, size, D, dtype, budget_mib, op="infonce"):
    r = cpu_case(op, impl, size, D, dtype, repeats=0, warm=False)
    if "error" in r:
        return False, None
    return r["peak_extra_mib"] <= budget_mib, r["first_fwd_bwd_ms"] / 1e3


def max_batch(fits, start, cap, step, log, name, label="2N", unit="rows"):
    """Doubling from ``start`` until a failure or ``cap``, then bisection to ``step`` rows.
    ``fits(size) -> (ok, seconds)``, or ``(False, reason)`` for a failure other than memory.
    Returns (largest size that fits, reason it stopped: "memory", the cap, or the smallest
    failing size's reason); ``unit`` names what a size counts in that reason."""
    good, bad, size, why = 0, None, start, "memory"

    def probe(size):
        ok, secs = fits(size)
        failed = f"fails: {secs}" if isinstance(secs, str) else "does not fit"
        log(f"  {name:>8} {label}={size:>9}: {'ok' if ok else failed}"
            + (f" ({secs:.2f} s)" if ok and secs else ""))
        return ok, (secs if isinstance(secs, str) else "memory")
    while size <= cap:
        ok, reason = probe(size)
        if not ok:
            bad, why = size, reason
            break
        good = size
        size *= 2
    if bad is None:
        return good, f"reached the cap of {cap} {unit}"
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if mid in (good, bad):
            break
        ok, reason = probe(mid)
        if ok:
            good = mid
        else:
            bad, why = mid, reason
    return good, why


def bench_maxbatch(quick, log, save=noop, dims=None, dtypes=None):
    rows = []
    if torch.cuda.is_available():
        D, cap = (dims or [128])[0], (1 << 17) if quick else (1 << 21)
        dtype = getattr(torch, (dtypes or ["bfloat16"])[0])
        free = torch.cuda.mem_get_info()[1] / 2 ** 30
        log(f"largest NT-Xent 2N whose forward+backward completes on one GPU "
            f"({free:.0f} GiB), D={D}, {str(dtype)[6:]}; fastssl capped at {cap} rows (time, not memory)")
        for name, fn in IMPLS["infonce"].items():
            size, why = max_batch(lambda s: _fits_gpu(fn, s, D, dtype), 4096, cap, 1024,
                                  log, name)
            rows.append({"op": "maxbatch", "impl": name, "D": D, "dtype": str(dtype)[6:],
                         "max_rows": size, "stopped_by": why})
            save(rows)
    else:
        D, dtype = (dims or [64])[0], (dtypes or ["float32"])[0]
        budget = 512 if quick else 2048
        cap = 8192 if quick else 65536
        log(f"CPU run: largest NT-Xent 2N whose forward+backward stays within {budget} MiB of "
            f"extra memory (peak RSS of a child process), D={D}, {dtype}, capped at {cap} rows")
        for impl in ("fastssl", "eager"):
            size, why = max_batch(lambda s: _fits_cpu(impl, s, D, dtype, budget), 1024, cap,
                                  512, log, impl)
            rows.append({"op": "maxbatch", "impl": impl, "D": D, "dtype": dtype,
                         "max_rows": size, "stopped_by": why, "budget_mib": budget})
            save(rows)
    for r in rows:
        log(f"  {r['impl']}: max 2N = {r['max_rows']} (stopped by {r['stopped_by']})")
    return rows, {}


# op: (what its size counts, step, CPU cap (quick, full), GPU cap (quick, full)); the CPU
# caps bound the run's time (fastssl's cost grows as rows squared), not its memory.
LARGEST = {
    "dino": (f"student rows (K = {PROTOTYPES})", DINO_CROPS[0] * 64, (2560, 10240),
             (1 << 16, 1 << 20)),
    "ibot": (f"student rows (K = {PROTOTYPES})", 512, (2048, 8192), (1 << 16, 1 << 20)),
    "supcon": ("2N (two views of N, 100 classes)", 512, (2048, 65536), (1 << 17, 1 << 21)),
    "sigreg": (f"N (M = {SIGREG_VECTORS} directions, {SIGREG_KNOTS} knots)", 512,
               (2048, 65536), (1 << 17, 1 << 21)),
    "detcon": (f"images ({DETCON_MASKS} regions each)", 32, (128, 1024), (1 << 12, 1 << 15)),
}


def largest_rows(op, D, dtype, quick, log, peers=(), budget_mib=None):
    """The largest batch of ``op`` (``LARGEST``: its unit, step and caps) whose
    forward+backward completes on the GPU, or stays within a memory budget on the CPU (a
    child process's peak RSS), for fastssl, the eager formulation and ``peers`` (names for
    ``implementation``; on the GPU not with ``quick``), as ``maxbatch`` does for NT-Xent.
    ``budget_mib`` replaces the CPU budget (2,048 MiB, 512 with ``quick``). Returns {impl:
    {max_rows, stopped_by, budget}}; torch.compile is left out (it would compile once per
    size)."""
    what, step, cpu_cap, gpu_cap = LARGEST[op]
    unit = what.split(" (")[0]
    out = {}
    if torch.cuda.is_available():
        names = [*IMPLS[op], *(() if quick else peers)]  # --quick: a 20 s step on the GPU
        cap = gpu_cap[0 if quick else 1]
        log(f"largest {op} batch, in {what}, whose forward+backward completes on one GPU, "
            f"D={D}, {dtype}, capped at {cap}")
        for name in names:
            fn = implementation(op, name)
            size, why = max_batch(lambda s: _fits_gpu(fn, s, D, getattr(torch, dtype), op),
                                  step, cap, step, log, name, "rows", unit)
            out[name] = {"max_rows": size, "stopped_by": why, "budget": "the GPU"}
    else:
        budget = budget_mib or (512 if quick else 2048)
        cap = cpu_cap[0 if quick else 1]
        log(f"largest {op} batch, in {what}, whose forward+backward stays within {budget} "
            f"MiB of extra memory (peak RSS of a child process), D={D}, {dtype}, capped at "
            f"{cap}")
        for name in [*IMPLS[op], *peers]:
            size, why = max_batch(lambda s: _fits_cpu(name, s, D, dtype, budget, op), step,
                                  cap, step, log, name, "rows", unit)
            out[name] = {"max_rows": size, "stopped_by": why, "budget": f"{budget} MiB extra"}
    for name, r in out.items():
        log(f"  {name}: largest batch = {r['max_rows']} {unit} (stopped by "
            f"{r['stopped_by']}, budget {r['budget']})")
    return out
