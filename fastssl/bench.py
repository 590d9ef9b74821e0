"""``fastssl bench``: time and memory of fastssl against the formulations users run today.

Every row is measured in this process (or, for CPU memory, in a child process) on this
machine; nothing is estimated. Results go to ``benchmarks/results/<device>-<date>.json``
plus a markdown table beside it.
"""
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as tF

import fastssl


# ----------------------------------------------------------------------------- baselines

def eager_nt_xent(z0, z1, temperature=0.5):
    """NT-Xent as the incumbents write it: normalise, four similarity blocks with the
    self-similarities removed, concatenated logits, cross-entropy (O(n^2) memory)."""
    n = z0.shape[0]
    a, b = tF.normalize(z0, dim=1), tF.normalize(z1, dim=1)
    off_diag = ~torch.eye(n, dtype=torch.bool, device=z0.device)
    l_ab, l_ba = a @ b.T / temperature, b @ a.T / temperature
    l_aa = (a @ a.T / temperature)[off_diag].view(n, n - 1)
    l_bb = (b @ b.T / temperature)[off_diag].view(n, n - 1)
    logits = torch.cat([torch.cat([l_ab, l_aa], 1), torch.cat([l_ba, l_bb], 1)])
    labels = torch.arange(n, device=z0.device).repeat(2)
    return tF.cross_entropy(logits, labels)


def _peers():
    """Optional incumbents importable here: {name: loss(z0, z1)} and {name: why not}."""
    found, missing = {}, {}
    try:
        from lightly.loss import NTXentLoss as LightlyNTXent
        found["lightly"] = LightlyNTXent(temperature=0.5)
    except Exception as e:  # not installed, or broken install
        missing["lightly"] = f"{type(e).__name__}: {e}"
    return found, missing


# ----------------------------------------------------------------------------- environment

def environment():
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastssl": fastssl.__version__,
        "platform": platform.platform(),
        "command": " ".join(["fastssl"] + sys.argv[1:]) if sys.argv else "",
        "date": datetime.date.today().isoformat(),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip())
    except Exception:
        env["git_commit"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, "\
                        f"{os.cpu_count()} cores)"
    return env


# ----------------------------------------------------------------------------- GPU timing

def _gpu_ceiling():
    """Measured bf16 dense matmul rate (TFLOP/s) on this GPU."""
    import triton.testing
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return 2 * 8192 ** 3 / ms / 1e9


def _time_gpu(loss_fn, z0, z1):
    import triton.testing
    out = {}

    def fwd():
        return loss_fn(z0, z1)

    def fwd_bwd():
        loss_fn(z0, z1).backward()

    out["fwd_ms"] = triton.testing.do_bench(fwd, return_mode="median")
    loss = fwd()
    out["bwd_ms"] = triton.testing.do_bench(lambda: loss.backward(retain_graph=True),
                                            return_mode="median", grad_to_none=[z0, z1])
    out["fwd_bwd_ms"] = triton.testing.do_bench(fwd_bwd, return_mode="median",
                                                grad_to_none=[z0, z1])
    del loss
    z0.grad = z1.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss_fn(z0, z1).backward()
    torch.cuda.synchronize()
    out["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    z0.grad = z1.grad = None
    return out


def bench_infonce_gpu(sizes, dims, dtypes, log):
    peak = _gpu_ceiling()
    log(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
    peers, missing = _peers()
    for name, why in missing.items():
        log(f"note: {name} not benchmarked ({why})")
    impls = {"fastssl": fastssl.nt_xent, "eager": eager_nt_xent,
             "torch.compile": torch.compile(eager_nt_xent)}
    impls.update(peers)
    rows = []
    for dtype in dtypes:
        for D in dims:
            for two_n in sizes:
                n = two_n // 2
                for name, fn in impls.items():
                    g = torch.Generator(device="cuda").manual_seed(two_n + D)
                    z0 = torch.randn(n, D, device="cuda", dtype=dtype, generator=g,
                                     requires_grad=True)
                    z1 = torch.randn(n, D, device="cuda", dtype=dtype, generator=g,
                                     requires_grad=True)
                    row = {"op": "nt_xent", "impl": name, "rows": two_n, "D": D,
                           "dtype": str(dtype).replace("torch.", "")}
                    try:
                        row.update(_time_gpu(fn, z0, z1))
                        flops = 6 * two_n * two_n * D
                        row["tflops"] = flops / row["fwd_bwd_ms"] / 1e9
                        row["fraction_of_bf16_peak"] = row["tflops"] / peak
                    except torch.cuda.OutOfMemoryError:
                        row["error"] = "out of memory"
                    except Exception as e:
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    finally:
                        del z0, z1
                        torch.cuda.empty_cache()
                    rows.append(row)
                    log(_fmt(row))
    return rows, {"bf16_peak_tflops": peak}


# ----------------------------------------------------------------------------- CPU timing

_CHILD = """
import json, resource, sys, time, statistics, torch
sys.path[:0] = {path!r}
import fastssl
from fastssl import bench
torch.set_num_threads({threads})
fn = fastssl.nt_xent if {impl!r} == "fastssl" else bench.eager_nt_xent
g = torch.Generator().manual_seed({two_n} + {D})
z0 = torch.randn({two_n} // 2, {D}, generator=g, dtype=getattr(torch, {dtype!r})).requires_grad_()
z1 = torch.randn({two_n} // 2, {D}, generator=g, dtype=getattr(torch, {dtype!r})).requires_grad_()
fn(z0, z1).backward()  # warm up
z0.grad = z1.grad = None
import ctypes, gc
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so reuse shows in RSS
open("/proc/self/clear_refs", "w").write("5")  # restart the peak-RSS counter here
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
base = rss("VmRSS:")
fn(z0, z1).backward()
peak = rss("VmHWM:") - base
z0.grad = z1.grad = None
t = {{"fwd": [], "bwd": [], "fwd_bwd": []}}
for _ in range({repeats}):
    a = time.perf_counter(); loss = fn(z0, z1); b = time.perf_counter()
    loss.backward(); c = time.perf_counter()
    t["fwd"].append(b - a); t["bwd"].append(c - b); t["fwd_bwd"].append(c - a)
    z0.grad = z1.grad = None
print(json.dumps({{"peak_extra_mib": peak / 2**20,
                  **{{k + "_ms": 1e3 * statistics.median(v) for k, v in t.items()}}}}))
"""


def _cpu_case(impl, two_n, D, dtype, repeats):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _CHILD.format(path=[here], threads=torch.get_num_threads(), impl=impl, two_n=two_n,
                         D=D, dtype=dtype, repeats=repeats)
    env = dict(os.environ, FASTSSL_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=1800)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_infonce_cpu(sizes, dims, dtypes, log, repeats=3):
    rows = []
    for dtype in dtypes:
        for D in dims:
            for two_n in sizes:
                for impl in ("fastssl", "eager"):
                    row = {"op": "nt_xent", "impl": impl if impl == "eager" else "fastssl (portable)",
                           "rows": two_n, "D": D, "dtype": dtype}
                    row.update(_cpu_case(impl, two_n, D, dtype, repeats))
                    rows.append(row)
                    log(_fmt(row))
    return rows, {}


# ----------------------------------------------------------------------------- output

def _fmt(row):
    if "error" in row:
        return f"  {row['impl']:>20} 2N={row['rows']:>7} D={row['D']:>5} {row['dtype']:>8}: {row['error']}"
    s = (f"  {row['impl']:>20} 2N={row['rows']:>7} D={row['D']:>5} {row['dtype']:>8}: "
         f"fwd {row['fwd_ms']:9.2f} ms  bwd {row['bwd_ms']:9.2f} ms  "
         f"fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  peak extra {row['peak_extra_mib']:9.1f} MiB")
    if "tflops" in row:
        s += f"  {row['tflops']:6.1f} TFLOP/s ({100 * row['fraction_of_bf16_peak']:.0f}% of peak)"
    return s


def markdown(result):
    env = result["environment"]
    lines = [f"### {result['op']} on {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, triton {env.get('triton')}, fastssl {env['fastssl']}, "
             f"commit {str(env.get('git_commit'))[:10]}" + (" — **CPU run**" if result["cpu"] else ""),
             "", "| impl | 2N | D | dtype | fwd ms | bwd ms | fwd+bwd ms | peak extra MiB |"
             + (" TFLOP/s |" if not result["cpu"] else ""),
             "|---|---|---|---|---|---|---|---|" + ("---|" if not result["cpu"] else "")]
    for r in result["rows"]:
        if "error" in r:
            cells = [r["impl"], r["rows"], r["D"], r["dtype"], r["error"], "", "", ""]
            cells += [""] if not result["cpu"] else []
        else:
            cells = [r["impl"], r["rows"], r["D"], r["dtype"], f"{r['fwd_ms']:.2f}",
                     f"{r['bwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}", f"{r['peak_extra_mib']:.1f}"]
            cells += [f"{r['tflops']:.1f}"] if not result["cpu"] else []
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _slug(device):
    keep = "".join(c if c.isalnum() else "-" for c in device.lower())
    return "-".join(p for p in keep.split("-") if p)[:40]


def run(op="infonce", sizes=None, dims=None, dtypes=None, quick=False, out_dir=None, log=print):
    if op != "infonce":
        raise ValueError(f"unknown benchmark {op!r}; available: infonce")
    cuda = torch.cuda.is_available()
    if cuda:
        sizes = sizes or ([4096, 16384] if quick else [4096, 16384, 65536, 262144])
        dims = dims or ([128] if quick else [128, 256, 1024])
        dtypes = dtypes or ["bfloat16", "float32"]
        log(f"GPU run on {torch.cuda.get_device_name()}")
        rows, extra = bench_infonce_gpu(sizes, dims, [getattr(torch, d) for d in dtypes], log)
    else:
        sizes = sizes or ([2048, 4096] if quick else [4096, 16384])
        dims = dims or [64]
        dtypes = dtypes or ["float32"]
        log("CPU run: the portable path (chunked PyTorch) against eager PyTorch; the Triton "
            "kernels need a CUDA GPU. Peak extra memory: a child process per case, warmed up, "
            "freed heap pages returned to the OS (malloc_trim), then its peak RSS during one "
            "forward+backward above its RSS before it.")
        rows, extra = bench_infonce_cpu(sizes, dims, dtypes, log, repeats=2 if quick else 3)
    env = environment()
    result = {"op": "infonce", "cpu": not cuda, "environment": env, "rows": rows, **extra}
    out_dir = out_dir or os.path.join(os.getcwd(), "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{_slug(env['device'] if cuda else 'cpu')}-{env['date']}-{op}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    log(f"wrote {stem}.json and {stem}.md")
    return result
