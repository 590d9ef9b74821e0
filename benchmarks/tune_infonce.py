"""Block-size sweep of the NT-Xent kernels on a CUDA GPU (the second command of a GPU lease):
  python3 benchmarks/tune_infonce.py OUT.json [--two-n 65536] [--dims 256,128] [--seconds 150]
For each D, the forward kernel's launch table (BM, BN, BK, warps, stages) is varied with
the backward's at its default, then the backward's (BM, BN, BK, BD, warps, stages; the
column kernel takes the same tile with the roles exchanged) with the forward's at its
default. Each variant: the median forward and backward times (fastssl bench's GPU timing),
and its loss and gradients against the shipped table's (a different launch table only
reorders sums: relative differences stay at bf16 rounding, 1e-2). Rows are written to
OUT.json as they are measured; the sweep stops starting variants after --seconds."""
import argparse
import json
import sys
import time

import torch
import triton

import fastssl
from fastssl.bench.timing import _gpu_ceiling, _time_gpu
from fastssl.kernels import infonce as K

FWD = [  # (BM, BN, BK, num_warps, num_stages)
    (128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (128, 64, 64, 4, 3),
    (64, 64, 64, 4, 3), (128, 128, 64, 8, 2), (256, 64, 64, 8, 3), (128, 64, 128, 8, 3),
    (64, 128, 64, 4, 3)]
BWD = {  # (BM, BN, BK, BD, num_warps, num_stages) per D
    256: [(64, 32, 64, 256, 8, 2), (64, 64, 64, 256, 8, 2), (64, 32, 64, 256, 8, 3),
          (128, 32, 64, 256, 8, 2), (64, 64, 64, 128, 8, 2), (128, 64, 64, 128, 8, 2),
          (64, 32, 64, 256, 4, 2), (64, 64, 32, 256, 8, 2)],
    128: [(64, 64, 64, 128, 8, 2), (64, 64, 64, 128, 8, 3), (128, 64, 64, 128, 8, 2),
          (64, 32, 64, 128, 8, 2), (64, 128, 64, 128, 8, 2), (64, 64, 64, 64, 8, 2),
          (64, 64, 64, 128, 4, 2)],
}


def table(default, fwd=None, bwd=None):
    out = {k: dict(v) for k, v in default.items()}
    if fwd:
        out["fwd"] = dict(zip(("BM", "BN", "BK", "num_warps", "num_stages"), fwd))
    if bwd:
        out["bwd"] = dict(zip(("BM", "BN", "BK", "BD", "num_warps", "num_stages"), bwd))
        out["bwd_cols"] = dict(out["bwd"], BM=out["bwd"]["BN"], BN=out["bwd"]["BM"])
    return out


def measure(z0, z1):
    """``fastssl bench``'s GPU timing of one NT-Xent call, and its loss and gradients."""
    out = _time_gpu(fastssl.nt_xent, z0, z1)
    z0.grad = z1.grad = None
    loss = fastssl.nt_xent(z0, z1)
    g0, g1 = torch.autograd.grad(loss, [z0, z1])
    return out, [loss.detach().float(), g0.float(), g1.float()]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--two-n", type=int, default=65536)
    p.add_argument("--dims", default="256,128")
    p.add_argument("--seconds", type=float, default=150)
    a = p.parse_args()
    stop = time.monotonic() + a.seconds
    shipped = K.config
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "two_n": a.two_n, "dtype": "bfloat16", "rows": []}
    peak = result["bf16_peak_tflops"] = _gpu_ceiling()
    print(f"{result['device']}, torch {torch.__version__}, triton {triton.__version__}, "
          f"measured bf16 matmul peak {peak:.0f} TFLOP/s", flush=True)
    for D in map(int, a.dims.split(",")):
        g = torch.Generator(device="cuda").manual_seed(D)
        z0 = torch.randn(a.two_n // 2, D, device="cuda", dtype=torch.bfloat16, generator=g)
        z1 = torch.randn(a.two_n // 2, D, device="cuda", dtype=torch.bfloat16, generator=g)
        z0.requires_grad_(), z1.requires_grad_()
        default = shipped(torch.bfloat16, D)
        variants = [("shipped", None, None)] + [("fwd", f, None) for f in FWD] \
            + [("bwd", None, b) for b in BWD.get(D, BWD[128])]
        ref = None
        for kind, f, b in variants:
            if time.monotonic() > stop:
                print(f"D={D}: time is up, {kind} {f or b} and later not run", flush=True)
                break
            cfg = table(default, f, b)
            K.config = lambda dtype, d, interpret=None, cfg=cfg: cfg
            row = {"D": D, "varied": kind, "fwd": cfg["fwd"], "bwd": cfg["bwd"]}
            try:
                t, outs = measure(z0, z1)
                row.update(t)
                n2 = a.two_n
                row["fwd_tflops"] = 2 * n2 * n2 * D / t["fwd_ms"] / 1e9
                row["bwd_tflops"] = 8 * n2 * n2 * D / t["bwd_ms"] / 1e9  # 4 tile matmuls
                if ref is None:
                    ref = outs
                row["max_rel_diff_vs_shipped"] = max(
                    float((o - r).norm() / r.norm().clamp_min(1e-30)) for o, r in zip(outs, ref))
            except Exception as e:  # out of resources (shared memory), compile errors
                row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
            finally:
                K.config = shipped
            torch.cuda.empty_cache()
            result["rows"].append(row)
            with open(a.out, "w") as fh:
                json.dump(result, fh, indent=1)
            tile = f if kind == "fwd" else b if kind == "bwd" else "-"
            print(f"D={D} {kind:>7} {str(tile):>28}: " + (row.get("error") or
                  f"fwd {row['fwd_ms']:.3f} ms ({row['fwd_tflops']:.0f} TFLOP/s), bwd "
                  f"{row['bwd_ms']:.3f} ms ({row['bwd_tflops']:.0f} TFLOP/s), diff "
                  f"{row['max_rel_diff_vs_shipped']:.1e}"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
