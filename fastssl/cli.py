"""``fastssl`` command line: ``fastssl info``, ``pretrain``, ``prepare`` and ``bench``."""
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
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, "
                                             f"got {text!r}")
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, "
                                             f"got {text!r}")
        return values
    return parse


def _bench(args, parser):
    try:
        bench.check_args(args.op, args.sizes, args.dims, args.dtypes)
    except ValueError as e:
        parser.error(str(e))
    try:
        bench.run(args.op, sizes=args.sizes, dims=args.dims, dtypes=args.dtypes,
                  quick=args.quick, out_dir=args.out)
    except bench.BenchmarkFailed as e:
        print(f"fastssl bench: {e}", file=sys.stderr)
        return 1
    return 0


def _pretrain(args, parser, argv):
    from fastssl import pretrain
    from fastssl.pretrain.data import PHOTOS
    methods = pretrain.methods_for_all(args.data) if args.method == "all" else [args.method]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.data not in (None, PHOTOS) and not os.path.exists(args.data):
        parser.error(f"--data {args.data!r} is not a folder, a prepared array or "
                     f"{PHOTOS!r}")
    if args.scale is not None and not (len(args.scale) == 2 and 0 < args.scale[0] <= args.scale[1] <= 1):
        parser.error(f"--scale takes two numbers 0 < lo <= hi <= 1, got {args.scale}")
    if args.resume is not None and args.method == "all":
        parser.error("--resume continues one run: name its --method")
    if args.nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from fastssl.pretrain import launch
        return launch.spawn(args.nproc, _without_nproc(argv))
    try:
        pretrain.run(methods, out_dir=args.out, data=args.data, epochs=args.epochs,
                     batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                     weight_decay=args.weight_decay, arch=args.arch, width=args.width,
                     size=args.size, scale=args.scale, flip_p=args.flip_p,
                     test_fraction=args.test_fraction, knn_k=args.knn_k, seed=args.seed,
                     device=args.device, max_steps=args.max_steps, stop_after=args.stop_after,
                     workers=args.workers, precision=args.precision, resume=args.resume,
                     evaluate=not args.no_eval, progress=not args.no_progress,
                     fine_tune=not args.no_fine_tune, fine_tune_draws=args.fine_tune_draws)
    except ValueError as e:  # bad settings found once the data is known
        parser.error(str(e))
    return 0


def _without_nproc(argv):
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _prepare(args, parser):
    from fastssl.pretrain import prepare
    if not os.path.isdir(args.folder):
        parser.error(f"{args.folder!r} is not a folder")
    try:
        meta = prepare(args.folder, args.side, args.out, workers=args.workers)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.out}: {meta['images']} images of {args.side}x{args.side} in "
          f"{len(meta['classes'])} classes ({len(meta['skipped'])} unreadable files left out; "
          f"listed in {args.out}.json)")
    return 0


def _checked(kind, ok, rule):
    """An argparse type: ``kind(text)`` that satisfies ``ok``, else a usage error."""
    name = {int: "an integer", float: "a number"}[kind]

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        if not ok(v):  # the comparisons also refuse nan
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v
    return parse


def _method(text):
    """``--method``: a method's name, ``all``, or pretext tasks joined by '+'."""
    from fastssl.pretrain.methods import METHODS, get
    if text == "all" or text in METHODS:
        return text
    if "+" not in text:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from "
                                         f"{', '.join(METHODS)}, all, or pretext tasks "
                                         f"joined by '+', e.g. rotation+jigsaw)")
    try:
        get(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def _positive(kind):
    return _checked(kind, lambda v: 0 < v < float("inf"), "a positive finite number")


_non_negative = _checked(float, lambda v: 0 <= v < float("inf"), "a finite number >= 0")
_non_negative_int = _checked(int, lambda v: v >= 0, ">= 0")
_fraction = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")


def _add_pretrain(sub, argv):
    """The ``pretrain`` sub-command: what to train on and how (``_add_run_options``: where
    and how it runs)."""
    from fastssl.pretrain import DEFAULTS, EPOCHS, METHODS

    p = sub.add_parser("pretrain", help="train a small CNN with an SSL method, then kNN and "
                       "linear-probe it on held-out images",
                       description="Pretrain an encoder with one SSL method (or all) built "
                       "from fastssl's losses, EMA and augmentation, then evaluate the frozen "
                       "encoder on held-out images (kNN, linear probe, and with 1/5/10 labels "
                       "per class) beside the same encoder at random initialisation and raw "
                       "pixels, and fine-tune the trained and random-init encoders end to end "
                       "(1/5/10 labels per class and every label). Default data: "
                       "scikit-learn's digits (no download). One process, or many under torchrun (--nproc N on one machine). Writes "
                       "runs/<method>-<time>/report.json, loss.png, checkpoint.pt and encoder.pt.")
    p.add_argument("--method", required=True, type=_method, metavar="METHOD",
                   help=f"{', '.join(METHODS)}, all (each in turn), or pretext tasks joined "
                   f"by '+' (rotation+jigsaw: one encoder, the task losses summed)")
    p.add_argument("--data", help="image folder, one sub-folder per class (labels are used "
                   "for evaluation only; streamed by --workers), or an array from `fastssl "
                   "prepare`, or `photos` (crops of scikit-learn's two colour sample photographs, no "
                   "download; for colorization); default: scikit-learn's digits")
    p.add_argument("--epochs", type=_positive(int), help="default: " + ", ".join(
        f"{m} {e}" for m, e in EPOCHS.items()) + " on the digits; about 1000 steps on --data")
    p.add_argument("--batch-size", type=_positive(int), help=f"per process; the global batch "
                   f"is this x the number of processes (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=_positive(float), help="learning rate per 256 images of the "
                   "global batch (linear scaling), default 4e-3 (adamw), 0.3 (lars)")
    p.add_argument("--width", type=_positive(int), help=f"encoder base width, default {DEFAULTS['width']}")
    p.add_argument("--size", type=_positive(int), help="view side in pixels (default on the "
                   "digits 16, relpos and cpc 32, jigsaw 36; 64 for --data)")
    p.add_argument("--scale", type=float, nargs=2, metavar=("LO", "HI"),
                   help="crop area range (digits: 0.3 1 for simclr/moco/simsiam, 0.5 1 for "
                        "byol/barlow/vicreg; --data: 0.2 1)")
    p.add_argument("--flip-p", type=_fraction, help="horizontal flip probability (default 0 for "
                   "the digits, 0.5 for --data)")
    p.add_argument("--test-fraction", type=_fraction, help=f"held-out share of each class, "
                   f"default {DEFAULTS['test_fraction']}")
    p.add_argument("--knn-k", type=_positive(int), help=f"neighbours, default {DEFAULTS['knn_k']}")
    p.add_argument("--seed", type=int, help=f"default {DEFAULTS['seed']}")
    _add_run_options(p)
    p.set_defaults(func=lambda a, parser=p: _pretrain(a, parser, argv))


def _add_run_options(p):
    """``pretrain``'s device, output, process, optimiser, resume and evaluation options."""
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--out", default="runs", help="runs folder (default ./runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=_positive(int), default=1, help="processes on this "
                   "machine (runs torchrun; with torchrun itself, leave it out)")
    p.add_argument("--optimizer", choices=["adamw", "lars"], help="default adamw (LARS for "
                   "large global batches)")
    p.add_argument("--weight-decay", type=_non_negative, help="default 1e-4 (adamw), 1e-6 (lars)")
    p.add_argument("--arch", help="encoder: small (default; vit for mae and simmim), vit "
                   "(fastssl's ViT), or a torchvision / timm model name (resnet18, "
                   "resnet50, vit_small_patch16_224, ...) when installed")
    p.add_argument("--max-steps", type=_positive(int), help="end the run (and its "
                   "schedules) after this many optimiser steps")
    p.add_argument("--stop-after", type=_positive(int), help="stop after this many steps "
                   "with a checkpoint, schedules unchanged (continue with --resume)")
    p.add_argument("--resume", help="a run folder or its checkpoint.pt: continue that run")
    p.add_argument("--workers", type=_non_negative_int, help="data-loader processes "
                   "(default 0: load in the training process)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp64"], help="auto "
                   "(default): bf16 autocast on CUDA, fp32 on CPU; fp64: weights, views and "
                   "losses in float64 (slow; runs that agree across process counts to "
                   "float64 rounding)")
    p.add_argument("--no-eval", action="store_true", help="train and save only")
    p.add_argument("--no-fine-tune", action="store_true", help="evaluate the frozen encoder "
                   "only: no end-to-end fine-tuning (which adds about 11 s per encoder on "
                   "the digits, one CPU thread)")
    p.add_argument("--fine-tune-draws", type=_positive(int), default=2, help="draws of the "
                   "labelled images per shot count (1/5/10 per class) for fine-tuning, mean "
                   "and std over them (default 2; the run with every label is one)")


def _add_prepare(sub):
    """The ``prepare`` sub-command: an image folder decoded once into a uint8 array."""
    p = sub.add_parser("prepare", help="decode an image folder once into a memory-mapped "
                       "uint8 array for --data", description="Decode every image of FOLDER "
                       "(one sub-folder per class) once, resized and centre-cropped to SIDE, "
                       "into OUT (a .npy uint8 array (N, 3, SIDE, SIDE)) and OUT.json (labels, "
                       "classes, unreadable files). `fastssl pretrain --data OUT` reads it by "
                       "memory map.")
    p.add_argument("folder")
    p.add_argument("--side", type=_positive(int), required=True, help="image side in pixels "
                   "(pretrain decodes folders at round(size * 8 / 7))")
    p.add_argument("--out", required=True, help="the .npy file to write")
    p.add_argument("--workers", type=_non_negative_int, default=0, help="decoding processes")
    p.set_defaults(func=lambda a, parser=p: _prepare(a, parser))


def _add_bench(sub):
    """The ``bench`` sub-command: one op (or all) against eager PyTorch, torch.compile and
    the peers."""
    p = sub.add_parser("bench", help="time fastssl against eager PyTorch and torch.compile")
    p.add_argument("op", nargs="?", default="infonce", choices=list(bench.OPS) + ["all"],
                   help="infonce (NT-Xent), supcon, sigreg, detcon, clip, siglip, maxbatch "
                        "(largest NT-Xent batch), barlow, vicreg, ema, augment (and the "
                        "pretext transforms), dino, ibot, mae, kmeans, or all of them (one "
                        "markdown summary)")
    p.add_argument("--sizes", type=_csv(int),
                   help="batch sizes: 2N rows for infonce/supcon, n pairs for clip/siglip, N "
                        "for barlow/vicreg/sigreg, rows for dino/ibot/kmeans, images for "
                        "augment/mae/detcon")
    p.add_argument("--dims", type=_csv(int), help="embedding widths D (maxbatch: the first)")
    p.add_argument("--dtypes", type=_csv(str), help="float32,bfloat16,float16 (maxbatch and "
                   "augment: the first)")
    p.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    p.add_argument("--out", help="results folder (default ./fastssl-bench; the checkout's "
                   "benchmarks/results holds the committed results)")
    p.set_defaults(func=lambda a, parser=p: _bench(a, parser))


def main(argv=None):
    """``fastssl info | pretrain | prepare | bench``: parse ``argv`` (default sys.argv) and
    run the sub-command."""
    import fastssl
    parser = argparse.ArgumentParser(prog="fastssl", description="fused kernels for SSL pretraining")
    parser.add_argument("--version", action="version", version=f"fastssl {fastssl.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, and the path each op takes")
    p.set_defaults(func=_info)
    argv = sys.argv[1:] if argv is None else list(argv)
    _add_pretrain(sub, argv)
    _add_prepare(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
