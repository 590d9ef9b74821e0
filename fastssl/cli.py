"""``fastssl`` command line: ``fastssl info`` and ``fastssl bench``."""
import argparse
import os
import platform
import sys

import torch

from fastssl import bench


def _info(args):
    import fastssl
    from fastssl import _dispatch
    print(f"fastssl {fastssl.__version__}")
    print(f"python  {platform.python_version()} ({platform.platform()})")
    print(f"torch   {torch.__version__}")
    try:
        import triton
        print(f"triton  {triton.__version__}")
    except Exception as e:
        print(f"triton  not importable ({type(e).__name__})")
    try:
        import numpy
        print(f"numpy   {numpy.__version__}")
    except Exception:
        print("numpy   not installed")
    if torch.cuda.is_available():
        cap = ".".join(map(str, torch.cuda.get_device_capability()))
        print(f"device  {torch.cuda.get_device_name()} (sm_{cap.replace('.', '')}, "
              f"CUDA {torch.version.cuda})")
    else:
        print(f"device  CPU only ({os.cpu_count()} cores)")
    print(f"FASTSSL_BACKEND={os.environ.get('FASTSSL_BACKEND', 'auto')}  "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    print("paths:")
    for op, path in _dispatch.describe().items():
        print(f"  {op:<50} {path}")
    return 0


def _csv(kind):
    def parse(text):
        try:
            return [kind(v) for v in text.split(",") if v]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, "
                                             f"got {text!r}")
    return parse


def _bench(args):
    for d in args.dtypes or []:
        if d not in ("float32", "bfloat16", "float16"):
            raise SystemExit(f"fastssl bench: unknown dtype {d!r} (float32, bfloat16, float16)")
    bench.run(args.op, sizes=args.sizes, dims=args.dims, dtypes=args.dtypes, quick=args.quick,
              out_dir=args.out)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="fastssl", description="fused kernels for SSL pretraining")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, and the path each op takes")
    p.set_defaults(func=_info)
    p = sub.add_parser("bench", help="time fastssl against eager PyTorch and torch.compile")
    p.add_argument("op", nargs="?", default="infonce", choices=list(bench.OPS),
                   help="infonce (NT-Xent), siglip, maxbatch (largest NT-Xent batch), barlow, "
                        "vicreg, ema, augment")
    p.add_argument("--sizes", type=_csv(int),
                   help="batch sizes: 2N rows for infonce, n pairs for siglip, N for "
                        "barlow/vicreg")
    p.add_argument("--dims", type=_csv(int), help="embedding widths D")
    p.add_argument("--dtypes", type=_csv(str), help="float32,bfloat16,float16")
    p.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    p.add_argument("--out", help="results folder (default ./benchmarks/results)")
    p.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
