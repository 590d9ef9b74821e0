"""Interleaved A/B of fastssl against the eager formulation on this machine's CPU.

    python benchmarks/ab_cpu.py siglip:2048:256 barlow:1024:4096 infonce:4096:64

Each round times every implementation once (forward + backward), in turn, so that noise
from other load falls on all of them alike; the median over the rounds is printed. Sizes
are `fastssl bench`'s (2N for infonce, n pairs for siglip, N for barlow/vicreg).
"""
import platform
import statistics
import sys
import time

import torch

import fastssl
from fastssl import bench


def ab(op, size, D, rounds=15):
    a, b = bench.make_inputs(op, size, D, torch.float32, "cpu")
    fns = bench.IMPLS[op]
    for f in fns.values():
        f(a, b).backward()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f(a, b).backward()
            times[k].append(time.perf_counter() - t0)
    return {k: round(1e3 * statistics.median(v), 2) for k, v in times.items()}


if __name__ == "__main__":
    print(f"CPU {platform.machine()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, fastssl {fastssl.__version__}; median ms, fwd+bwd")
    for spec in sys.argv[1:] or ["siglip:2048:256", "barlow:1024:1024"]:
        op, size, D = spec.split(":")
        print(spec, ab(op, int(size), int(D)), flush=True)
