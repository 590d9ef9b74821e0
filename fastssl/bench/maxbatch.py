"""The largest batch whose forward+backward completes (GPU) or stays within a memory
budget (CPU): doubling, then bisection."""
import torch

from .formulations import DINO_CROPS, IMPLS, make_inputs
from .timing import cpu_case, noop



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
    finally:
        del a, b
        torch.cuda.empty_cache()


def _fits_cpu(impl, size, D, dtype, budget_mib, op="infonce"):
    r = cpu_case(op, impl, size, D, dtype, repeats=0, warm=False)
    if "error" in r:
        return False, None
    return r["peak_extra_mib"] <= budget_mib, r["first_fwd_bwd_ms"] / 1e3


def max_batch(fits, start, cap, step, log, name, label="2N"):
    """Doubling from ``start`` until a failure or ``cap``, then bisection to ``step`` rows.
    ``fits(size) -> (ok, seconds)``. Returns (largest size that fits, reason it stopped)."""
    good, bad, size = 0, None, start
    while size <= cap:
        ok, secs = fits(size)
        log(f"  {name:>8} {label}={size:>9}: {'ok' if ok else 'does not fit'}"
            + (f" ({secs:.2f} s)" if secs else ""))
        if not ok:
            bad = size
            break
        good = size
        size *= 2
    if bad is None:
        return good, f"reached the cap of {cap} rows"
    while bad - good > step:
        mid = (good + bad) // 2 // step * step
        if mid in (good, bad):
            break
        ok, secs = fits(mid)
        log(f"  {name:>8} {label}={mid:>9}: {'ok' if ok else 'does not fit'}")
        good, bad = (mid, bad) if ok else (good, mid)
    return good, "memory"


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


def prototype_max_rows(op, D, dtype, quick, log):
    """The largest student-rows count of a prototype-head forward+backward (K = 65,536) for
    fastssl and the eager formulation: on the GPU what completes, on the CPU what stays
    within a memory budget (a child process's peak RSS), as ``maxbatch``."""
    out = {}
    step = DINO_CROPS[0] * 64 if op == "dino" else 512
    if torch.cuda.is_available():
        cap = (1 << 16) if quick else (1 << 20)
        for name, fn in IMPLS[op].items():
            size, why = max_batch(lambda s: _fits_gpu(fn, s, D, getattr(torch, dtype), op),
                                  step, cap, step, log, name, "rows")
            out[name] = {"max_rows": size, "stopped_by": why, "budget": "the GPU"}
    else:
        budget, cap = (512, 4 * step) if quick else (2048, 16 * step)
        for name in IMPLS[op]:
            size, why = max_batch(lambda s: _fits_cpu(name, s, D, dtype, budget, op), step,
                                  cap, step, log, name, "rows")
            out[name] = {"max_rows": size, "stopped_by": why, "budget": f"{budget} MiB extra"}
    for name, r in out.items():
        log(f"  {name}: largest rows = {r['max_rows']} (stopped by {r['stopped_by']}, "
            f"budget {r['budget']})")
    return out
