"""``run`` and ``run_all``: flags checked, defaults per op and device, rows measured and
saved as they come, the result files written."""
import json
import os

import torch

from . import formulations
from .augment import bench_augment
from .ema import bench_ema
from .kmeans import bench_kmeans
from .machine import environment
from .maxbatch import LARGEST, bench_maxbatch, largest_rows
from .report import markdown, plot, slug, summary
from .timing import bench_cpu, bench_gpu

OPS = ("infonce", "supcon", "sigreg", "detcon", "clip", "siglip", "maxbatch", "barlow",
       "vicreg", "ema", "augment", "dino", "ibot", "mae", "kmeans")
# The smallest --sizes value each op can measure: NT-Xent's size is 2N (two views of N >= 1
# samples, so an even number), the cross-correlation losses standardise over >= 2 samples.
MIN_SIZE = {"infonce": 2, "supcon": 2, "sigreg": 1, "detcon": 1, "clip": 1, "siglip": 1,
            "barlow": 2, "vicreg": 2, "augment": 1,
            "dino": formulations.DINO_CROPS[0], "ibot": 1, "mae": 1, "kmeans": 1}
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
        small = [v for v in sizes if v < low or (o in ("infonce", "supcon") and v % 2)
                 or (o == "dino" and v % formulations.DINO_CROPS[0])]
        if small:
            need = "an even number >= 2 (2N rows: two views of N)" if o in ("infonce", "supcon") \
                else f"a multiple of {formulations.DINO_CROPS[0]} (student crops x images)" \
                if o == "dino" else f">= {low}"
            raise ValueError(f"--sizes for {o} must be {need}, got {small[0]}")
    if "mae" in ops and dims:
        bad = [d for d in dims if d % formulations.MAE_PATCH]
        if bad:
            raise ValueError(f"--dims for mae (the image side) must be a multiple of "
                             f"{formulations.MAE_PATCH}, got {bad[0]}")
    unknown = [d for d in dtypes or [] if d not in DTYPES]
    if unknown:
        raise ValueError(f"--dtypes takes {', '.join(DTYPES)}, got {unknown[0]!r}")


# Default (--sizes, --dims) per device and op when the flags are not given: (quick, full)
# pairs of lists; "*" covers every other op measured by the shared CPU/GPU timing loop.
SHAPES = {
    # --quick on the GPU: the workloads of the GPU targets (benchmarks/NOTES.md)
    "gpu": {"infonce": (([16384, 65536], [4096, 16384, 65536, 262144]), ([256], [128, 256, 1024])),
            "supcon": (([32768], [4096, 16384, 32768, 65536]), ([128], [128])),
            "sigreg": (([4096], [4096, 16384, 65536]), ([256], [256])),
            # detcon: b images of formulations.DETCON_MASKS = 16 regions
            "detcon": (([1024], [256, 1024, 4096]), ([128], [128])),
            "siglip": (([32768], [4096, 16384, 32768]), ([768], [768])),
            "clip": (([65536], [4096, 16384, 65536]), ([768], [768])),
            "dino": (([8190], [640, 2560, 8190, 16380]), ([256], [256])),
            "mae": (([256], [64, 256, 1024]), ([224], [224])),
            "barlow": (([256, 2048], [256, 2048, 8192]), ([8192], [2048, 8192])),
            "*": (([256], [256, 2048]), ([2048], [2048, 8192]))},
    "cpu": {"barlow": (([256], [256, 1024, 2048]), ([1024], [4096])),
            "dino": (([320], [640, 1280, 2560]), ([256], [256])),
            "mae": (([32], [64, 256]), ([224], [224])),
            "sigreg": (([1024, 4096], [1024, 4096, 16384]), ([256], [256])),
            "detcon": (([64], [64, 256]), ([128], [128])),
            "infonce": (([2048, 4096], [2048, 4096, 8192, 16384]), ([64], [64])),
            "supcon": (([2048, 4096], [2048, 4096, 8192, 16384]), ([128], [128])),
            "*": (([2048, 4096], [2048, 4096, 8192, 16384]), ([256], [256]))},
}
SHAPES["gpu"]["vicreg"] = SHAPES["gpu"]["barlow"]
SHAPES["gpu"]["ibot"] = (([8192], [640, 2560, 8192, 16384]), ([256], [256]))
SHAPES["cpu"]["vicreg"] = SHAPES["cpu"]["barlow"]
SHAPES["cpu"]["ibot"] = SHAPES["cpu"]["dino"]
CPU_NOTE = ("CPU run: the portable path (chunked PyTorch) against eager PyTorch and "
            "torch.compile of the same formulation (inductor's C++ backend, compiled during the "
            "warm-up); the Triton kernels need a CUDA GPU. Peak extra memory: a child process "
            "per case, warmed up, freed heap pages returned to the OS (malloc_trim), then its "
            "peak RSS during one forward+backward above its RSS before it.")


def default_shapes(op, cuda, quick, sizes=None, dims=None, dtypes=None):
    """The flags' values, or the op's defaults on this device: (sizes, dims, dtypes)."""
    table = SHAPES["gpu" if cuda else "cpu"]
    (quick_sizes, full_sizes), (quick_dims, full_dims) = table.get(op, table["*"])
    sizes = sizes or (quick_sizes if quick else full_sizes)
    dims = dims or (quick_dims if quick else full_dims)
    if not dtypes:
        dtypes = (["bfloat16"] if quick else ["bfloat16", "float32"]) if cuda else ["float32"]
    return list(sizes), list(dims), list(dtypes)


def _measure(op, cuda, sizes, dims, dtypes, quick, log, save):
    """The rows of one op and its extra result fields, from the op's own bench."""
    if op == "maxbatch":
        if not cuda:
            log("CPU run: the portable path against eager PyTorch.")
        return bench_maxbatch(quick, log, save, dims, dtypes)
    if op == "augment":
        if not cuda:
            log("CPU run: the portable path (banded per-sample resampling and torch ops).")
        return bench_augment(quick, log, save, sizes, dtypes)
    if op == "kmeans":
        log("k-means from the same initial centroids (the first K rows) for the same "
            "iterations, float32 rows" + ("" if cuda else "; CPU: peak RSS of a child process "
                                          "per case"))
        return bench_kmeans(quick, log, save, sizes, dims, dtypes)
    if op == "ema":
        if not cuda:
            log("CPU run: fastssl takes torch._foreach_lerp_ on CPU tensors; the CUDA kernel "
                "needs a GPU.")
        return bench_ema(quick, log, save)
    sizes, dims, dtypes = default_shapes(op, cuda, quick, sizes, dims, dtypes)
    if cuda:
        log(f"GPU run on {torch.cuda.get_device_name()}")
        rows, extra = bench_gpu(op, sizes, dims, [getattr(torch, d) for d in dtypes], log, save,
                                compiled=not quick or op == "infonce")
    else:
        log(CPU_NOTE)
        rows, extra = bench_cpu(op, sizes, dims, dtypes, log, 2 if quick else 3, save)
    if op in LARGEST and any("error" not in r for r in rows):
        checked = extra.get("peers", {}).get("check", {})
        peers = [k for k, v in checked.items() if not isinstance(v, str)]
        extra = dict(extra, max_rows_unit=LARGEST[op][0], max_rows=largest_rows(
            op, dims[0], dtypes[0], quick, log, peers))
    return rows, extra


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
    stem = os.path.join(out_dir, f"{slug(env['device'] if cuda else 'cpu')}-{env['date']}-{op}")
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

    rows, extra = _measure(op, cuda, sizes, dims, dtypes, quick, log, save)
    result = save(rows)
    if not any("error" not in r for r in rows):
        raise BenchmarkFailed(f"bench {op}: every one of the {len(rows)} cases failed "
                              f"(first: {rows[0].get('error') if rows else 'no cases'}); no "
                              "result file written")
    return _write_plot(result, stem, log)


def _write_plot(result, stem, log):
    """The PNG beside the JSON and markdown (when matplotlib is there); the files listed."""
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
    path = os.path.join(out_dir, f"{slug(env['device'] if cuda else 'cpu')}-{env['date']}-all.md")
    with open(path, "w") as f:
        f.write(summary(results))
    log(f"wrote {path}")
    if failed:
        raise BenchmarkFailed(f"bench all: {len(failed)} of {len(OPS)} benchmarks measured "
                              f"nothing: " + "; ".join(failed))
    return results
