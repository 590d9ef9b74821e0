"""``fastssl bench``: time and memory of fastssl against the formulations users run today.

Every row is measured in this process (or, for CPU memory, in a child process) on this
machine; nothing is estimated. Results go to ``<out>/<device>-<date>-<op>.json`` plus a
markdown table and a plot beside it; ``<out>`` is ``--out``, by default ``./fastssl-bench``
(the checkout's ``benchmarks/results/`` holds only the committed results).

Ops: ``infonce`` (NT-Xent), ``siglip`` (sigmoid loss), ``maxbatch`` (largest NT-Xent batch
whose forward+backward completes), ``barlow`` and ``vicreg`` (cross-correlation losses;
size = N, the batch).
"""
import datetime
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as tF

import fastssl

OPS = ("infonce", "siglip", "maxbatch", "barlow", "vicreg", "ema", "augment", "dino", "ibot")
# K of the prototype-head benchmarks (DINO's and DINOv2's); FASTSSL_BENCH_K overrides it
# (read at import, so the child processes of a CPU run see the same K)
PROTOTYPES = int(os.environ.get("FASTSSL_BENCH_K", 65536))
DINO_CROPS = (10, 2)  # student crops (2 global + 8 local), teacher crops
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0


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


def eager_siglip(img, txt, scale=SIGLIP_SCALE, bias=SIGLIP_BIAS):
    """SigLIP as the incumbents write it: the full logits matrix and a +-1 label matrix."""
    logits = scale * img @ txt.T + bias
    labels = 2 * torch.eye(img.shape[0], device=img.device, dtype=img.dtype) - 1
    return -tF.logsigmoid(labels * logits).sum() / img.shape[0]


def eager_barlow(z_a, z_b, lambda_param=5e-3):
    """Barlow Twins as the reference implementation writes it: batch-norm both views, the
    D x D cross-correlation, on- and off-diagonal sums."""
    N, D = z_a.shape
    c = tF.batch_norm(z_a, None, None, training=True).T @ tF.batch_norm(z_b, None, None, training=True) / N
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.flatten()[:-1].view(D - 1, D + 1)[:, 1:].flatten().pow(2).sum()
    return on_diag + lambda_param * off_diag


def eager_vicreg(z_a, z_b, lam=25.0, mu=25.0, nu=1.0, eps=1e-4):
    """VICReg as the reference implementation writes it (D x D covariance matrices)."""
    N, D = z_a.shape
    inv = tF.mse_loss(z_a, z_b)
    a, b = z_a - z_a.mean(0), z_b - z_b.mean(0)
    var = (torch.relu(1 - torch.sqrt(a.var(0) + eps)).mean()
           + torch.relu(1 - torch.sqrt(b.var(0) + eps)).mean()) / 2
    off = ~torch.eye(D, dtype=torch.bool, device=z_a.device)
    cov = sum(((x.T @ x) / (N - 1))[off].pow(2).sum() / D for x in (a, b))
    return lam * inv + mu * var + nu * cov


def fastssl_nt_xent(z0, z1):
    return fastssl.nt_xent(z0, z1, 0.5)


def fastssl_siglip(img, txt):
    return fastssl.siglip_loss(img, txt, SIGLIP_SCALE, SIGLIP_BIAS)


_TEACHER = {}


def _teacher(op, student, prototypes):
    """Fixed teacher rows, teacher prototypes and centre for a prototype-head row (made once
    per shape, at the untimed warm-up call): unit rows like a DINO head's."""
    rows, D = student.shape
    K = prototypes.shape[0]
    key = (op, rows, K, D, student.dtype, student.device)
    if key not in _TEACHER:
        _TEACHER.clear()
        g = torch.Generator(device=student.device).manual_seed(rows + K + D)
        n = rows * DINO_CROPS[1] // DINO_CROPS[0] if op == "dino" else rows
        mk = lambda m: torch.nn.functional.normalize(torch.randn(  # noqa: E731
            m, D, device=student.device, generator=g), dim=1).to(student.dtype)
        _TEACHER[key] = (mk(n), mk(K), 0.01 * torch.randn(K, device=student.device,
                                                          generator=g))
    return _TEACHER[key]


def _ibot_weights(rows, device):
    """iBOT's token weights: rows split over images of 80 masked tokens (1 / 80 / images)."""
    images = max(1, rows // 80)
    image = torch.arange(rows, device=device) * images // rows
    counts = torch.bincount(image, minlength=images).float()
    return 1.0 / counts[image] / images


def eager_dino(s, W):
    """DINO's loss as lightly writes it on the head's logits: both (rows x K) score
    matrices, the teacher softmax, the student log-softmax, an einsum per crop pair."""
    t, V, c = _teacher("dino", s, W)
    S, T = DINO_CROPS
    B = t.shape[0] // T
    teacher = torch.softmax((t @ V.T - c) / 0.04, dim=-1).view(T, B, -1)
    student = torch.log_softmax((s @ W.T) / 0.1, dim=-1).view(S, B, -1)
    loss = -torch.einsum("tbk,sbk->tsb", teacher, student).mean(-1)  # (T, S) pair means
    return sum(loss[u, v] for u in range(T) for v in range(S) if u != v) / (T * S - min(T, S))


def fastssl_dino(s, W):
    t, V, c = _teacher("dino", s, W)
    return fastssl.prototype_cross_entropy(s, t, W, V, 0.1, 0.04, c,
                                           teacher_crops=DINO_CROPS[1])


def eager_ibot(s, W):
    """iBOT's patch loss as lightly writes it: the masked tokens' score matrices, softmax,
    log-softmax, per-token weights."""
    t, V, c = _teacher("ibot", s, W)
    w = _ibot_weights(s.shape[0], s.device)
    teacher = torch.softmax((t @ V.T - c) / 0.04, dim=-1)
    loss = torch.sum(-teacher * torch.log_softmax((s @ W.T) / 0.1, dim=-1), dim=-1)
    return (loss * w).sum()


def fastssl_ibot(s, W):
    t, V, c = _teacher("ibot", s, W)
    return fastssl.prototype_cross_entropy(s, t, W, V, 0.1, 0.04, c, pairing="rows",
                                           weights=_ibot_weights(s.shape[0], s.device))


IMPLS = {"infonce": {"fastssl": fastssl_nt_xent, "eager": eager_nt_xent},
         "dino": {"fastssl": fastssl_dino, "eager": eager_dino},
         "ibot": {"fastssl": fastssl_ibot, "eager": eager_ibot},
         "siglip": {"fastssl": fastssl_siglip, "eager": eager_siglip},
         "barlow": {"fastssl": fastssl.barlow_twins, "eager": eager_barlow},
         "vicreg": {"fastssl": fastssl.vicreg, "eager": eager_vicreg}}


def implementation(op, impl):
    """The loss for one bench row: fastssl's, the eager formulation, or that formulation
    under torch.compile (inductor; compiled at the warm-up call, so not in the timings)."""
    if impl == "torch.compile":
        return torch.compile(IMPLS[op]["eager"])
    return IMPLS[op][impl]


def make_inputs(op, size, D, dtype, device, seed=0):
    """Two embedding batches. NT-Xent's size is 2N (two views of N); SigLIP's is n pairs."""
    rows = size // 2 if op == "infonce" else size
    g = torch.Generator(device=device).manual_seed(seed + size + D)
    if op in ("dino", "ibot"):  # student rows and the K prototypes (unit rows)
        return [torch.nn.functional.normalize(torch.randn(
            n, D, device=device, generator=g), dim=1).to(dtype).requires_grad_()
            for n in (size, PROTOTYPES)]
    return [torch.randn(rows, D, device=device, dtype=dtype, generator=g).requires_grad_()
            for _ in range(2)]


def model_flops(op, size, D):
    """Forward+backward work of the textbook formulation: 3 matmuls of size x size x D
    (contrastive), or of N x D x D (cross-correlation: C and its two gradients; VICReg has
    two covariance matrices)."""
    if op == "barlow":
        return 6 * size * D * D
    if op == "vicreg":
        return 12 * size * D * D
    if op in ("dino", "ibot"):  # student and teacher scores, dS, dW: rows x K x D each
        teacher = size * DINO_CROPS[1] // DINO_CROPS[0] if op == "dino" else size
        return 2 * (3 * size + teacher) * PROTOTYPES * D
    return 6 * size * size * D


def _peers(op):
    """Optional incumbents importable here: {name: loss(a, b)} and {name: why not}."""
    found, missing = {}, {}
    if op == "infonce":
        try:
            from lightly.loss import NTXentLoss as LightlyNTXent
            found["lightly"] = LightlyNTXent(temperature=0.5)
        except Exception as e:
            missing["lightly"] = f"{type(e).__name__}: {e}"
        missing["Inf-CL"] = "no adapter: Inf-CL computes one-directional CLIP-style losses"
    if op == "siglip":
        try:
            from open_clip.loss import SigLipLoss as OpenClipSigLip
            ref = OpenClipSigLip()
            found["open_clip"] = lambda a, b: ref(a, b, torch.tensor(SIGLIP_SCALE, device=a.device),
                                                  torch.tensor(SIGLIP_BIAS, device=a.device))
        except Exception as e:
            missing["open_clip"] = f"{type(e).__name__}: {e}"
    return found, missing


# ----------------------------------------------------------------------------- environment

def environment():
    here = os.path.dirname(os.path.abspath(__file__))
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
        git = ["git", "-C", here]
        env["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
        env["git_dirty"] = bool(subprocess.run(
            git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
            text=True, timeout=10).stdout.strip())
    except Exception:
        env["git_commit"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["cuda"] = torch.version.cuda
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return env


# ----------------------------------------------------------------------------- GPU

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


def _noop(rows):
    pass


def bench_gpu(op, sizes, dims, dtypes, log, save=_noop):
    peak = _gpu_ceiling()
    log(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
    peers, missing = _peers(op)
    for name, why in missing.items():
        log(f"note: {name} not benchmarked ({why})")
    impls = dict(IMPLS[op])
    # dynamic=True: one compilation serves every size (per-shape recompiles would hit
    # dynamo's cache limit and silently fall back to eager).
    impls["torch.compile"] = torch.compile(impls["eager"], dynamic=True)
    impls.update(peers)
    rows = []
    for dtype in dtypes:
        for D in dims:
            for size in sizes:
                for name, fn in impls.items():
                    row = {"op": op, "impl": name, "rows": size, "D": D,
                           "dtype": str(dtype).replace("torch.", "")}
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
                    rows.append(row)
                    log(_fmt(row))
                    save(rows)
    return rows, {"bf16_peak_tflops": peak}


# ----------------------------------------------------------------------------- CPU

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
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def bench_cpu(op, sizes, dims, dtypes, log, repeats=3, save=_noop):
    rows = []
    for dtype in dtypes:
        for D in dims:
            for size in sizes:
                for impl in ("fastssl", "eager", "torch.compile"):
                    row = {"op": op, "impl": "fastssl (portable)" if impl == "fastssl" else impl,
                           "rows": size, "D": D, "dtype": dtype}
                    row.update(cpu_case(op, impl, size, D, dtype, repeats))
                    rows.append(row)
                    log(_fmt(row))
                    save(rows)
    return rows, {}


# ----------------------------------------------------------------------------- max batch

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


def bench_maxbatch(quick, log, save=_noop, dims=None, dtypes=None):
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


# ----------------------------------------------------------------------------- EMA

def resnet50_shapes():
    """Parameter shapes of ResNet-50 (161 tensors, 25.6 M parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inp = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inp, 1, 1), (width,), (width,), (width, width, 3, 3), (width,),
                       (width,), (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:
                shapes += [(4 * width, inp, 1, 1), (4 * width,), (4 * width,)]
            inp = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def vit_b16_shapes():
    """Parameter shapes of ViT-B/16 (152 tensors, 86.6 M parameters)."""
    d = 768
    shapes = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d),
                   (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,), (1000, d), (1000,)]


def _ema_methods(ema, online, m):
    from fastssl.ema import ema_
    flat_e = torch.cat([t.flatten() for t in ema])
    flat_o = torch.cat([t.flatten() for t in online])

    def loop():
        for e, o in zip(ema, online):
            e.mul_(m).add_(o, alpha=1 - m)

    return {
        "fastssl": lambda: ema_(ema, online, m),
        "python loop": loop,
        "foreach mul+add (lightly)": lambda: (torch._foreach_mul_(ema, m),
                                              torch._foreach_add_(ema, online, alpha=1 - m)),
        "foreach lerp (timm)": lambda: torch._foreach_lerp_(ema, online, 1 - m),
        "flat lerp_ (one buffer)": lambda: flat_e.lerp_(flat_o, 1 - m),
    }


def _time(fn, cuda, repeats=20):
    return _time_each({"fn": fn}, cuda, repeats)["fn"]


def _time_each(fns, cuda, repeats=20):
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


def bench_ema(quick, log, save=_noop):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    src = torch.ones(1 << 28 if cuda else 1 << 25, device=device)
    dst = torch.empty_like(src)
    copy_ms = _time(lambda: dst.copy_(src), cuda, 5)
    copy_gbs = 2 * src.numel() * 4 / copy_ms / 1e6  # one read and one write per element
    del src, dst
    log(f"measured copy bandwidth: {copy_gbs:.0f} GB/s (copy_ of a "
        f"{(1 << 28 if cuda else 1 << 25) * 4 >> 20} MiB tensor)")
    rows = []
    models = {"resnet50": resnet50_shapes()} if quick else {"resnet50": resnet50_shapes(),
                                                            "vit_b16": vit_b16_shapes()}
    for name, shapes in models.items():
        g = torch.Generator().manual_seed(0)
        ema = [torch.randn(sh, generator=g).to(device) for sh in shapes]
        online = [torch.randn(sh, generator=g).to(device) for sh in shapes]
        params = sum(t.numel() for t in ema)
        log(f"{name}: {len(shapes)} tensors, {params / 1e6:.1f} M parameters (fp32)")
        for impl, ms in _time_each(_ema_methods(ema, online, 0.996), cuda).items():
            gbs = 12 * params / ms / 1e6
            row = {"op": "ema", "impl": impl, "model": name, "tensors": len(shapes),
                   "params": params, "ms": ms, "gb_per_s": gbs,
                   "fraction_of_copy_bandwidth": gbs / copy_gbs}
            rows.append(row)
            log(f"  {impl:>28}: {ms:8.3f} ms  {gbs:7.1f} GB/s ({100 * gbs / copy_gbs:.0f}% of copy)")
            save(rows)
    return rows, {"copy_gb_per_s": copy_gbs}


# ----------------------------------------------------------------------------- augmentation

def _torchvision_loop(images, size):
    """The incumbent on a GPU batch: torchvision v2 transforms called once per sample (so
    that each sample gets its own random parameters)."""
    import torchvision.transforms.v2 as T
    aug = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                     T.RandomGrayscale(0.2), T.GaussianBlur(23, (0.1, 2.0)),
                     T.ToDtype(torch.float32, scale=True), T.Normalize(
                         (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return torch.stack([aug(im) for im in images])


def bench_augment(quick, log, save=_noop, sizes=None, dtypes=None):
    """The BYOL recipe: uint8 (N, 3, H, W) -> two views, in views per second, for each batch
    size N in ``sizes``."""
    from fastssl.augment import BYOLAugment
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    side, size = (128, 96) if quick and not cuda else (256, 224)
    if not sizes:
        sizes = ([256] if quick else [64, 256, 1024]) if cuda else ([16] if quick else [16, 64])
    dtype = getattr(torch, (dtypes or ["bfloat16" if cuda else "float32"])[0])
    rows = []
    for n in sizes:
        images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device)
        aug = BYOLAugment(size=size, dtype=dtype)
        impls = {"fastssl": lambda: aug(images)}
        try:
            import torchvision  # noqa: F401
            impls["torchvision v2, per-sample loop"] = lambda: _torchvision_loop(images, size)
        except Exception as e:
            if n == sizes[0]:
                log(f"note: torchvision not benchmarked ({type(e).__name__}: {e})")
        if n == sizes[0]:
            try:
                import kornia  # noqa: F401
            except Exception as e:
                log(f"note: kornia not benchmarked ({type(e).__name__}: {e})")
        log(f"BYOL recipe: {n} uint8 images {side}x{side} -> 2 views {size}x{size} "
            f"{str(dtype).replace('torch.', '')} on {device}")
        for impl, fn in impls.items():
            views = 2 if impl == "fastssl" else 1
            ms = _time(fn, cuda, 5 if not cuda else 20)
            row = {"op": "augment", "impl": impl, "batch": n, "side": side, "size": size,
                   "dtype": str(dtype).replace("torch.", ""), "views_per_call": views * n,
                   "ms": ms, "views_per_s": views * n / ms * 1e3}
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                row["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
            rows.append(row)
            log(f"  {impl:>32}: {ms:9.2f} ms per call, {row['views_per_s']:10.0f} views/s")
            save(rows)
        del images
    return rows, {}


# ----------------------------------------------------------------------------- output

def _fmt(row):
    head = f"  {row['impl']:>20} {row['op']} size={row['rows']:>7} D={row['D']:>5} {row['dtype']:>8}: "
    if "error" in row:
        return head + row["error"]
    s = head + (f"fwd {row['fwd_ms']:9.2f} ms  bwd {row['bwd_ms']:9.2f} ms  "
                f"fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  peak extra {row['peak_extra_mib']:9.1f} MiB")
    if "tflops" in row:
        s += f"  {row['tflops']:6.1f} TFLOP/s ({100 * row['fraction_of_bf16_peak']:.0f}% of peak)"
    return s


def markdown(result):
    env = result["environment"]
    cpu = result["cpu"]
    size_name = {"infonce": "2N", "siglip": "n", "barlow": "N", "vicreg": "N"}.get(result["op"], "size")
    lines = [f"### {result['op']} on {env['device']} ({env['date']})", "",
             f"torch {env['torch']}, triton {env.get('triton')}, fastssl {env['fastssl']}, "
             f"commit {str(env.get('git_commit'))[:10]}" + (" — **CPU run**" if cpu else ""), ""]
    if result["op"] == "augment":
        lines += ["| impl | batch | input | view | dtype | views per call | ms | views/s |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['impl']} | {r['batch']} | {r['side']}² | {r['size']}² | "
                  f"{r.get('dtype', 'float32')} | "
                  f"{r['views_per_call']} | {r['ms']:.2f} | {r['views_per_s']:.0f} |"
                  for r in result["rows"]]
        return "\n".join(lines) + "\n"
    if result["op"] == "ema":
        lines += ["| model | impl | ms | GB/s (12 B/param) | of copy bandwidth |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['impl']} | {r['ms']:.3f} | {r['gb_per_s']:.1f} | "
                  f"{100 * r['fraction_of_copy_bandwidth']:.0f}% |" for r in result["rows"]]
        return "\n".join(lines) + "\n"
    if result["op"] == "maxbatch":
        lines += ["| impl | D | dtype | largest 2N that completes | stopped by | memory budget |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['impl']} | {r['D']} | {r['dtype']} | {r['max_rows']} | {r['stopped_by']} | "
                  + (f"{r['budget_mib']} MiB extra (CPU) |" if "budget_mib" in r else "the GPU |")
                  for r in result["rows"]]
        return "\n".join(lines) + "\n"
    lines += [f"| impl | {size_name} | D | dtype | fwd ms | bwd ms | fwd+bwd ms | peak extra MiB |"
              + ("" if cpu else " TFLOP/s |"),
              "|---|---|---|---|---|---|---|---|" + ("" if cpu else "---|")]
    for r in result["rows"]:
        if "error" in r:
            cells = [r["impl"], r["rows"], r["D"], r["dtype"], r["error"], "", "", ""]
        else:
            cells = [r["impl"], r["rows"], r["D"], r["dtype"], f"{r['fwd_ms']:.2f}",
                     f"{r['bwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}", f"{r['peak_extra_mib']:.1f}"]
        if not cpu:
            cells.append(f"{r['tflops']:.1f}" if "tflops" in r else "")
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    if result.get("max_rows"):
        lines += ["", f"K = {PROTOTYPES}: the largest rows count whose forward+backward fits",
                  "", "| impl | largest rows | stopped by | memory budget |", "|---|---|---|---|"]
        lines += [f"| {k} | {r['max_rows']} | {r['stopped_by']} | {r['budget']} |"
                  for k, r in result["max_rows"].items()]
    return "\n".join(lines) + "\n"


def _slug(device):
    keep = "".join(c if c.isalnum() else "-" for c in device.lower())
    return "-".join(p for p in keep.split("-") if p)[:40]


# The smallest --sizes value each op can measure: NT-Xent's size is 2N (two views of N >= 1
# samples, so an even number), the cross-correlation losses standardise over >= 2 samples.
MIN_SIZE = {"infonce": 2, "siglip": 1, "barlow": 2, "vicreg": 2, "augment": 1,
            "dino": DINO_CROPS[0], "ibot": 1}
DTYPES = ("float32", "bfloat16", "float16")


class BenchmarkFailed(RuntimeError):
    """Every row of a benchmark failed: nothing was measured and no result file written."""


def check_args(op, sizes=None, dims=None, dtypes=None):
    """ValueError naming the flag for values no op can measure, before anything runs."""
    ops = OPS if op == "all" else (op,)
    if op != "all" and op not in OPS:
        raise ValueError(f"unknown benchmark {op!r}; available: {', '.join(OPS)}, all")
    for flag, values in (("--sizes", sizes), ("--dims", dims)):
        bad = [v for v in values or [] if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"{flag} takes positive integers, got {bad[0]}")
    for o in ops:
        low = MIN_SIZE.get(o)
        if low is None or not sizes:
            continue
        small = [v for v in sizes if v < low or (o == "infonce" and v % 2)
                 or (o == "dino" and v % DINO_CROPS[0])]
        if small:
            need = "an even number >= 2 (2N rows: two views of N)" if o == "infonce" \
                else f"a multiple of {DINO_CROPS[0]} (student crops x images)" \
                if o == "dino" else f">= {low}"
            raise ValueError(f"--sizes for {o} must be {need}, got {small[0]}")
    unknown = [d for d in dtypes or [] if d not in DTYPES]
    if unknown:
        raise ValueError(f"--dtypes takes {', '.join(DTYPES)}, got {unknown[0]!r}")


def run(op="infonce", sizes=None, dims=None, dtypes=None, quick=False, out_dir=None, log=print):
    """Run one benchmark; the JSON and markdown files are rewritten after every measured row,
    so a run stopped early still leaves what it measured (a file is written only once a row
    has succeeded). A PNG plot goes beside them. Raises ``BenchmarkFailed`` when every row
    failed (no file is written then)."""
    check_args(op, sizes, dims, dtypes)
    if op == "all":
        return run_all(sizes, dims, dtypes, quick, out_dir, log)
    cuda = torch.cuda.is_available()
    env = environment()
    out_dir = out_dir or default_out()
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{_slug(env['device'] if cuda else 'cpu')}-{env['date']}-{op}")
    extra = {}
    ignored = [name for name, v, used in (("--sizes", sizes, op not in ("maxbatch", "ema")),
                                           ("--dims", dims, op not in ("augment", "ema")),
                                           ("--dtypes", dtypes, op != "ema")) if v and not used]
    if ignored:
        log(f"note: {op} does not take {', '.join(ignored)} (ignored)")

    def save(rows):
        result = {"op": op, "cpu": not cuda, "environment": env, "rows": rows, **extra}
        if not any("error" not in r for r in rows):
            return result  # nothing measured yet: no file
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(result))
        return result

    if op == "maxbatch":
        if not cuda:
            log("CPU run: the portable path against eager PyTorch.")
        rows, extra = bench_maxbatch(quick, log, save, dims, dtypes)
    elif op == "augment":
        if not cuda:
            log("CPU run: the portable path (batched per-sample matrices and torch ops).")
        rows, extra = bench_augment(quick, log, save, sizes, dtypes)
    elif op == "ema":
        if not cuda:
            log("CPU run: fastssl takes torch._foreach_lerp_ on CPU tensors; the CUDA kernel "
                "needs a GPU.")
        rows, extra = bench_ema(quick, log, save)
    elif cuda:
        if op == "infonce":
            sizes = sizes or ([4096, 16384] if quick else [4096, 16384, 65536, 262144])
            dims = dims or ([128] if quick else [128, 256, 1024])
        elif op == "siglip":
            sizes = sizes or ([4096] if quick else [4096, 16384, 32768])
            dims = dims or [768]
        elif op in ("dino", "ibot"):
            sizes = sizes or ([2560] if quick else [640, 2560, 8192, 16384])
            dims = dims or [256]
        else:
            sizes = sizes or ([256] if quick else [256, 2048])
            dims = dims or ([2048] if quick else [2048, 8192])
        dtypes = dtypes or (["bfloat16"] if quick else ["bfloat16", "float32"])
        log(f"GPU run on {torch.cuda.get_device_name()}")
        rows, extra = bench_gpu(op, sizes, dims, [getattr(torch, d) for d in dtypes], log, save)
    else:
        if op in ("barlow", "vicreg"):
            sizes = sizes or ([256] if quick else [256, 1024, 2048])
            dims = dims or ([1024] if quick else [4096])
        elif op in ("dino", "ibot"):
            sizes = sizes or ([320] if quick else [640, 1280, 2560])
            dims = dims or [256]
        else:
            sizes = sizes or ([2048, 4096] if quick else [2048, 4096, 8192, 16384])
            dims = dims or ([64] if op == "infonce" else [256])
        dtypes = dtypes or ["float32"]
        log("CPU run: the portable path (chunked PyTorch) against eager PyTorch and "
            "torch.compile of the same formulation (inductor's C++ backend, compiled during "
            "the warm-up); the Triton kernels need a CUDA GPU. Peak extra memory: a child "
            "process per case, warmed up, "
            "freed heap pages returned to the OS (malloc_trim), then its peak RSS during one "
            "forward+backward above its RSS before it.")
        rows, extra = bench_cpu(op, sizes, dims, dtypes, log, 2 if quick else 3, save)
    if op in ("dino", "ibot") and any("error" not in r for r in rows):
        log(f"largest {op} rows count (K = {PROTOTYPES}, D = {dims[0]}, {dtypes[0]})")
        extra = dict(extra, max_rows=prototype_max_rows(op, dims[0], str(dtypes[0]).replace(
            "torch.", ""), quick, log))
    result = save(rows)
    if not any("error" not in r for r in rows):
        raise BenchmarkFailed(f"bench {op}: every one of the {len(rows)} cases failed "
                              f"(first: {rows[0].get('error') if rows else 'no cases'}); no "
                              "result file written")
    written = [stem + ".json", stem + ".md"]
    try:
        plot(result, stem + ".png")
        written.append(stem + ".png")
    except ImportError:
        log("note: matplotlib is not installed; no plot written")
    log(f"wrote {', '.join(written)}")
    result["files"] = written
    return result


def default_out():
    """Where results go without ``--out``: ./fastssl-bench (never the checkout's committed
    benchmarks/results, unless asked)."""
    return os.path.join(os.getcwd(), "fastssl-bench")


def run_all(sizes=None, dims=None, dtypes=None, quick=False, out_dir=None, log=print):
    """Every benchmark in turn with the same flags; one markdown summary of all of them."""
    out_dir = out_dir or default_out()
    results, failed = [], []
    for op in OPS:
        log(f"== {op}")
        try:
            results.append(run(op, sizes, dims, dtypes, quick, out_dir, log))
        except BenchmarkFailed as e:
            log(str(e))
            failed.append(str(e))
    if not results:
        raise BenchmarkFailed("bench all: every benchmark failed; no result file written")
    env = results[0]["environment"]
    cuda = not results[0]["cpu"]
    path = os.path.join(out_dir, f"{_slug(env['device'] if cuda else 'cpu')}-{env['date']}-all.md")
    with open(path, "w") as f:
        f.write(summary(results))
    log(f"wrote {path}")
    if failed:
        raise BenchmarkFailed(f"bench all: {len(failed)} of {len(OPS)} benchmarks measured "
                              f"nothing: " + "; ".join(failed))
    return results


def headline(result):
    """One line: fastssl against the strongest baseline at the largest size both finished."""
    rows = [r for r in result["rows"] if "error" not in r]
    op = result["op"]
    if op == "maxbatch":
        return "; ".join(f"{r['impl']}: 2N = {r['max_rows']}" for r in rows)
    if op == "ema":
        parts = []
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model and r["impl"] == "fastssl"]
            others = [r for r in rows if r["model"] == model and r["impl"] != "fastssl"]
            if mine and others:
                best = min(others, key=lambda r: r["ms"])
                parts.append(f"{model}: {mine[0]['ms']:.2f} ms vs {best['impl']} {best['ms']:.2f} ms")
        return "; ".join(parts)
    if op == "augment":
        return "; ".join(f"{r['impl']}, batch {r['batch']}: {r['views_per_s']:.0f} views/s" for r in rows)
    key = lambda r: (r["D"], r["dtype"])  # noqa: E731
    best_line = ""
    for group in dict.fromkeys(map(key, rows)):
        mine = {r["rows"]: r for r in rows if key(r) == group and r["impl"].startswith("fastssl")}
        others = [r for r in rows if key(r) == group and not r["impl"].startswith("fastssl")
                  and r["rows"] in mine]
        if not others:
            continue
        size = max(r["rows"] for r in others)
        best = min((r for r in others if r["rows"] == size), key=lambda r: r["fwd_bwd_ms"])
        m = mine[size]
        best_line = (f"size {size}, D {group[0]}, {group[1]}: {m['fwd_bwd_ms']:.1f} ms / "
                     f"{m['peak_extra_mib']:.0f} MiB vs {best['impl']} {best['fwd_bwd_ms']:.1f} ms / "
                     f"{best['peak_extra_mib']:.0f} MiB")
    if result.get("max_rows"):
        best_line += "; largest rows: " + ", ".join(
            f"{k} {r['max_rows']}" for k, r in result["max_rows"].items())
    return best_line


def summary(results, image_dir=None):
    """Markdown: a table of every result (device, date, versions, headline), then each table
    and its plot."""
    lines = ["| op | device | date | versions | fastssl vs the strongest baseline (fwd+bwd, peak extra memory) |",
             "|---|---|---|---|---|"]
    for r in results:
        env = r["environment"]
        device = env["device"] + (" — **CPU run**" if r["cpu"] else "")
        versions = (f"torch {env['torch']}, triton {env.get('triton')}, fastssl {env['fastssl']}"
                    + (f", CUDA {env['cuda']}" if env.get("cuda") else ""))
        lines.append(f"| {r['op']} | {device} | {env['date']} | {versions} | {headline(r)} |")
    parts = ["\n".join(lines) + "\n"]
    for r in results:
        parts.append(markdown(r))
        png = r.get("plot")
        if png:
            parts.append(f"![{r['op']}]({os.path.join(image_dir, png) if image_dir else png})\n")
    return "\n".join(parts)


def _label(r):
    return f"{r['impl']}" + (f", D={r['D']}, {r['dtype']}" if "D" in r else "")


def plot(result, path):
    """A PNG beside the JSON: time and memory against batch size, one line per implementation
    (and D, dtype); bars for ``maxbatch`` and ``ema``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    env, op = result["environment"], result["op"]
    rows = [r for r in result["rows"] if "error" not in r]
    title = f"{op} on {env['device']}{' (CPU run)' if result['cpu'] else ''}, {env['date']}"
    if op in ("maxbatch", "ema"):
        fig, ax = plt.subplots(figsize=(7, 3.6))
        if op == "maxbatch":
            labels, values = [_label(r) for r in rows], [r["max_rows"] for r in rows]
            ax.set_xlabel("largest 2N whose forward+backward completes")
        else:
            labels, values = [f"{r['model']}: {r['impl']}" for r in rows], [r["ms"] for r in rows]
            ax.set_xlabel("ms per update")
        ax.barh(labels, values, color=["C0" if "fastssl" in lab else "C7" for lab in labels])
        ax.invert_yaxis()
    else:
        size_key, time_key = ("batch", "ms") if op == "augment" else ("rows", "fwd_bwd_ms")
        has_mem = any("peak_extra_mib" in r for r in rows)
        fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4),
                                 squeeze=False)
        lines = {}
        for r in rows:
            label = _label(r) if op != "augment" else r["impl"]
            lines.setdefault(label, []).append(r)
        panels = [(time_key, "ms per call" if op == "augment" else "forward+backward ms")]
        if has_mem:
            panels.append(("peak_extra_mib", "peak extra memory (MiB)"))
        for ax, (key, ylabel) in zip(axes[0], panels):
            for label, rs in lines.items():
                rs = sorted((r for r in rs if key in r), key=lambda r: r[size_key])
                ax.plot([r[size_key] for r in rs], [r[key] for r in rs], marker="o", label=label,
                        linestyle="-" if "fastssl" in label else "--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel({"infonce": "2N (rows)", "siglip": "n (pairs)", "augment": "batch"}.get(op, "N (batch)"))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
        axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    result["plot"] = os.path.basename(path)
