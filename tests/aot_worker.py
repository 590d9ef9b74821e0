"""Compile every shipped kernel configuration for one GPU architecture, with no GPU present.

Run as ``python tests/aot_worker.py 90``; prints one JSON object per configuration. It runs
in its own process because kernels decorated for the Triton interpreter (as the rest of
the test suite uses them) cannot be compiled.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastssl.kernels import (augment, barlow, infonce, kmeans, masked, prototype,  # noqa: E402
                             siglip, sketch)

FAMILIES = {"infonce": infonce, "siglip": siglip, "barlow": barlow, "augment": augment,
            "prototype": prototype, "masked": masked, "kmeans": kmeans,
            "sketch": sketch}
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTXAS = next(os.path.join(BIN, p) for p in ("ptxas-blackwell", "ptxas")
             if os.path.exists(os.path.join(BIN, p)))


def config_id(family, cfg):
    fn, sig, ce, _ = cfg
    flags = "".join(k[4] for k in ("HAS_MASK", "HAS_NEG", "HAS_VALS", "HAS_BIAS", "HAS_G")
                    if ce.get(k)) or "plain"
    flags += "-spherical" if ce.get("SPHERICAL") else ""
    flags += f"-{ce['PRECISION']}" if ce.get("PRECISION") in ("ieee", "tf32x3") else ""
    flags += "".join(f"-{k}{int(v)}" for k, v in ce.items() if k in ("PHASE", "EN_H", "NP",
                                                                       "VALUE"))
    blocks = "-".join(f"{k}{v}" for k, v in ce.items() if k.startswith("B"))
    dtype = next(iter(sig.values()))[1:]  # the first pointer is the embeddings'
    if "IMG" in sig:  # the masked-patch kernels: one per image pointer too
        dtype += "-img" + sig["IMG"][1:]
    if "TGT" in sig:  # the latent-target kernels: one per teacher-token pointer too
        dtype += "-tgt" + sig["TGT"][1:]
    return f"{family}.{fn.__name__}-{dtype}-{blocks}-{flags}"


def main(cc):
    arch = "sm_90a" if cc == 90 else f"sm_{cc}"
    for family, module in FAMILIES.items():
        for cfg in module.shipped_configs():
            fn, sig, ce, opts = cfg
            row = {"id": config_id(family, cfg), "cc": cc}
            try:
                src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in ce}},
                                constexprs=ce)
                k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": opts["num_warps"],
                                            "num_stages": opts["num_stages"]})
                with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                    f.write(k.asm["ptx"])
                out = subprocess.run([PTXAS, "-v", "--gpu-name", arch, f.name, "-o", os.devnull],
                                     capture_output=True, text=True)
                os.unlink(f.name)
                spills = [int(s) for s in re.findall(r"(\d+) bytes spill", out.stderr)]
                regs = re.findall(r"Used (\d+) registers", out.stderr)
                row.update(ok=out.returncode == 0 and bool(k.asm["cubin"]), ptxas=out.stderr[-2000:],
                           spill_bytes=max(spills) if spills else None,
                           registers=int(regs[0]) if regs else None,
                           shared=k.metadata.shared, wgmma="wgmma" in k.asm["ptx"],
                           # full-float32 products ("ieee") run on the FMA units: no wgmma
                           matmul="dot" in fn.src and ce.get("PRECISION") != "ieee")
            except Exception as e:  # reported per configuration by the test
                row.update(ok=False, error=f"{type(e).__name__}: {e}"[-2000:])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
