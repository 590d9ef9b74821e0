"""Images per second of `fastssl pretrain`'s data path: an image folder decoded by 0 and by N
DataLoader workers, and the same images as a `fastssl prepare`d memory-mapped array.

    python benchmarks/loader.py [--folder DIR] [--images 3000] [--side 73] [--batch 128]

Without --folder it writes a folder of random-noise JPEGs (500 x 375, ImageNet's typical
size, 10 classes) under /tmp first. Prints one line per loader and a JSON summary.
"""
import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from fastssl.pretrain.data import BatchOrder, ImageFolder, collate, open_prepared, prepare


def make_folder(root, n, classes=10):
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(root, f"class{i % classes}")
        os.makedirs(d, exist_ok=True)
        # Smooth noise (a blurred random field) compresses like a photograph, not like static.
        small = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)
        Image.fromarray(small).resize((500, 375), Image.BILINEAR).save(
            os.path.join(d, f"{i}.jpg"), quality=90)


def rate(dataset, batch, workers, epochs=1):
    order = BatchOrder(torch.arange(len(dataset)), batch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, num_workers=workers,
                                         collate_fn=collate, persistent_workers=workers > 0)
    n, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        order.set_epoch(epoch)
        for images, _, _ in loader:
            n += len(images)
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder")
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--side", type=int, default=73)  # pretrain's decode side for --size 64
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    folder = args.folder
    if folder is None:
        folder = f"/tmp/fastssl-loader-{args.images}"
        if not os.path.isdir(folder):
            make_folder(folder, args.images)
    ds = ImageFolder(folder, args.side)
    out = {"folder": folder, "images": len(ds), "side": args.side, "batch": args.batch,
           "cpu": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__}
    out["folder, 0 workers"] = rate(ds, args.batch, 0)
    out[f"folder, {args.workers} workers"] = rate(ds, args.batch, args.workers)
    t0 = time.perf_counter()
    prepare(folder, args.side, "/tmp/fastssl-loader.npy", workers=args.workers, log=lambda *a: None)
    out["prepare s"] = time.perf_counter() - t0
    arr = open_prepared("/tmp/fastssl-loader.npy")
    out["prepared array, 0 workers"] = rate(arr, args.batch, 0, epochs=3)
    for k, v in out.items():
        print(f"{k:>28}: {v:.1f} images/s" if "workers" in k else f"{k:>28}: {v}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
