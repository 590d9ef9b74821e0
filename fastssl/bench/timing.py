"""Timing and peak extra memory of one loss: on the GPU in this process (CUDA events,
the allocator's peak), on the CPU in a fresh child process per case (peak RSS)."""
import json
import os
import subprocess
import sys

import torch

from . import peers
from .formulations import IMPLS, make_inputs, model_flops
from .report import fmt_row



def implementation(op, impl):
    """The loss for one bench row: fastssl's, the eager formulation, that formulation
    under torch.compile (inductor; compiled at the warm-up call, so not in the timings),
    or a peer library's (``peers.find``)."""
    if impl == "torch.compile":
        return torch.compile(IMPLS[op]["eager"])
    if impl in IMPLS[op]:
        return IMPLS[op][impl]
    found, missing = peers.find(op, "cuda" if torch.cuda.is_available() else "cpu")
    if impl not in found:
        raise ValueError(f"{impl!r} is not available for {op}: "
                         f"{missing.get(impl, 'no such implementation')}")
    return found[impl]


def _gpu_ceiling():
    """Measured bf16 dense matmul rate (TFLOP/s) on this GPU."""
    import triton.testing
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192 ** 3 / ms / 1e9


def _time_gpu(loss_fn, a, b):
    import triton.testing
    out = {"fwd_ms": triton.testing.do_bench(lambda: loss_fn(a, b), return_mode="median")}
    loss = loss_fn(a, b)
    out["bwd_ms"] = triton.testing.do_bench(lambda: loss.backward(retain_graph=True),
                                            return_mode="median", grad_to_none=[a, b])
    out["fwd_bwd_ms"] = triton.testing.do_bench(lambda: loss_fn(a, b).backward(),
                                                return_mode="median", grad_to_none=[a, b])
    del loss
    out["peak_extra_mib"] = _gpu_peak(loss_fn, a, b)
    return out


def _gpu_peak(loss_fn, a, b):
    a.grad = b.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss_fn(a, b).backward()
    torch.cuda.synchronize()
    a.grad = b.grad = None
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def noop(rows):
    pass


def _gpu_row(op, name, fn, size, D, dtype, peak):
    row = {"op": op, "impl": name, "rows": size, "D": D, "dtype": str(dtype).replace("torch.", "")}
    a = b = None
    try:
        a, b = make_inputs(op, size, D, dtype, "cuda")
        row.update(_time_gpu(fn, a, b))
        row["tflops"] = model_flops(op, size, D) / row["fwd_bwd_ms"] / 1e9
        row["fraction_of_bf16_peak"] = row["tflops"] / peak
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    del a, b
    torch.cuda.empty_cache()
    return row


def bench_gpu(op, sizes, dims, dtypes, log, save=noop, compiled=True):
    """Every shape for fastssl, the eager formulation and the peers, then (``compiled``)
    every shape for torch.compile: its compilation, tens of seconds, comes last, so a run
    stopped at a time limit keeps the other rows."""
    peak = _gpu_ceiling()
    log(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
    found, peer_info = peers.report(op, "cuda", dims[0], log)
    impls = {**IMPLS[op], **found}
    if compiled:
        # dynamic=True: one compilation serves every size (per-shape recompiles would hit
        # dynamo's cache limit and silently fall back to eager).
        impls["torch.compile"] = torch.compile(IMPLS[op]["eager"], dynamic=True)
    else:
        log("torch.compile not measured (--quick on the GPU compiles only for infonce)")
    shapes = [(dtype, D, size) for dtype in dtypes for D in dims for size in sizes]
    order = [(name, shape) for name in impls if name != "torch.compile" for shape in shapes]
    order.sort(key=lambda item: shapes.index(item[1]))
    order += [("torch.compile", shape) for shape in shapes if compiled]
    rows = []
    for name, (dtype, D, size) in order:
        rows.append(_gpu_row(op, name, impls[name], size, D, dtype, peak))
        log(fmt_row(rows[-1]))
        save(rows)
    return rows, {"bf16_peak_tflops": peak, "peers": peer_info}


_CHILD = """
import ctypes, gc, json, statistics, sys, time, torch
sys.path[:0] = {path!r}
from fastssl import bench
torch.set_num_threads({threads})
fn = bench.implementation({op!r}, {impl!r})
a, b = bench.make_inputs({op!r}, {size}, {D}, getattr(torch, {dtype!r}), "cpu")
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
if {warm}:
    fn(a, b).backward()
    a.grad = b.grad = None
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so reuse shows in RSS
open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS counter here
base = rss("VmRSS:")
t0 = time.perf_counter()
fn(a, b).backward()
first = time.perf_counter() - t0
peak = rss("VmHWM:") - base
a.grad = b.grad = None
t = {{"fwd": [], "bwd": [], "fwd_bwd": []}}
# At least {repeats} timed runs, more while they fit in ~5 s (at most 25): a steadier median
repeats = max({repeats}, min(25, int(5.0 / max(first, 1e-3)))) if {repeats} else 0
for _ in range(repeats):
    t0 = time.perf_counter(); loss = fn(a, b); t1 = time.perf_counter()
    loss.backward(); t2 = time.perf_counter()
    t["fwd"].append(t1 - t0); t["bwd"].append(t2 - t1); t["fwd_bwd"].append(t2 - t0)
    a.grad = b.grad = None
out = {{"peak_extra_mib": peak / 2**20, "first_fwd_bwd_ms": 1e3 * first}}
if repeats:
    out.update({{k + "_ms": 1e3 * statistics.median(v) for k, v in t.items()}})
    out["repeats"] = repeats
print(json.dumps(out))
"""


def cpu_case(op, impl, size, D, dtype, repeats, warm=True, timeout=1800):
    """Run one case in a fresh process: peak extra RSS and median times."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _CHILD.format(path=[here], threads=torch.get_num_threads(), op=op, impl=impl,
                         size=size, D=D, dtype=dtype, repeats=repeats, warm=warm)
    env = dict(os.environ, FASTSSL_BACKEND="torch")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {timeout} s"}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_cpu(op, sizes, dims, dtypes, log, repeats=3, save=noop):
    found, peer_info = peers.report(op, "cpu", dims[0], log)
    rows = []
    for dtype in dtypes:
        for D in dims:
            for size in sizes:
                for impl in ("fastssl", "eager", "torch.compile", *found):
                    row = {"op": op, "impl": "fastssl (portable)" if impl == "fastssl" else impl,
                           "rows": size, "D": D, "dtype": dtype}
                    row.update(cpu_case(op, impl, size, D, dtype, repeats))
                    rows.append(row)
                    log(fmt_row(row))
                    save(rows)
    return rows, {"peers": peer_info}


def time_one(fn, cuda, repeats=20):
    return time_each({"fn": fn}, cuda, repeats)["fn"]


def time_each(fns, cuda, repeats=20):
    """Median milliseconds per call of each function. On the GPU: CUDA-event timings
    (``triton.testing.do_bench``). On the CPU the functions are timed in turns (each round
    times every function once, starting one further along), so a drift of the machine's
    speed during the run falls on all of them alike instead of on whichever ran first."""
    import statistics
    import time
    if cuda:
        import triton.testing
        return {k: triton.testing.do_bench(f, return_mode="median") for k, f in fns.items()}
    names = list(fns)
    for k in names:
        fns[k]()
    times = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}
