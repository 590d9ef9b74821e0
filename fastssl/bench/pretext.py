"""The pretext tasks' input transforms: fastssl's batched ones (``fastssl.pretext``, each
image with its own random draw) against the same work done image by image, as a dataset's
``__getitem__`` does it with torchvision's v2 functional ops (and Kornia's Lab conversion,
per image and batched, where Kornia imports). Samples per second: one sample is what one
training example needs (RotNet: the four rotations of an image; jigsaw: its nine shuffled
tiles; relative position: a patch pair; colorization: the Lab image; inpainting and the
denoising autoencoder: the corrupted image)."""
import torch

JIGSAW = dict(grid=3, permutations=100)
RELPOS = dict(patch=20, gap=10, jitter=2)


def _fastssl(images, perms):
    from fastssl import pretext
    n, _, h, w = images.shape
    return {
        "rotation": lambda: pretext.rotations(images),
        "jigsaw": lambda: pretext.jigsaw(images, perms),
        "relative position": lambda: pretext.relative_patches(
            images, RELPOS["patch"], RELPOS["gap"], RELPOS["jitter"], color_drop=True),
        "colorization (Lab)": lambda: pretext.rgb_to_lab(images),
        "inpainting": lambda: images * ~pretext.region_mask(n, (h, w), "random",
                                                            device=images.device)[:, None],
        "denoising (masking)": lambda: pretext.corrupt(images, "masking", 0.25),
    }


def _standardise(t, eps=1e-5):
    return (t - t.mean()) / (t.std(unbiased=False) + eps)


def _loops(images, perms):
    """The per-image formulations: {task: fn()}."""
    import torchvision.transforms.v2.functional as F
    n, c, h, w = images.shape
    g = JIGSAW["grid"]
    cell = min(h, w) // g
    tile = max(1, int(0.75 * cell))
    p, gap, jit = RELPOS["patch"], RELPOS["gap"], RELPOS["jitter"]
    step = p + gap

    def rotation():
        return torch.stack([F.rotate(im, 90.0 * k) for im in images for k in range(4)])

    def jigsaw():
        out = []
        for im in images:
            order = perms[int(torch.randint(len(perms), ()))]
            off = torch.randint(cell - tile + 1, (g * g, 2)).tolist()
            tiles = [_standardise(F.crop(im, (j // g) * cell + off[j][0],
                                         (j % g) * cell + off[j][1], tile, tile).float())
                     for j in range(g * g)]
            out.append(torch.stack([tiles[j] for j in order.tolist()]))
        return torch.stack(out)

    def relative():
        pairs = []
        for im in images:
            top = int(torch.randint(step + jit, h - step - p - jit + 1, ()))
            left = int(torch.randint(step + jit, w - step - p - jit + 1, ()))
            k = int(torch.randint(8, ()))
            dy, dx = divmod(k + (k >= 4), 3)  # the 3 x 3 grid in raster order, no centre
            dy, dx = dy - 1, dx - 1
            d = torch.randint(-jit, jit + 1, (4,)).tolist()
            a = F.crop(im, top + d[0], left + d[1], p, p).float()
            b = F.crop(im, top + dy * step + d[2], left + dx * step + d[3], p, p).float()
            for x in (a, b):  # keep one channel, noise in the others
                keep = int(torch.randint(c, ()))
                noise = torch.randn_like(x) * (0.01 * x.std())
                noise[keep] = x[keep]
                pairs.append(noise)
        return torch.stack(pairs)

    def inpainting():
        side = round(0.5 * min(h, w))
        return torch.stack([F.erase(im, int(torch.randint(h - side + 1, ())),
                                    int(torch.randint(w - side + 1, ())), side, side,
                                    torch.zeros((), dtype=im.dtype)) for im in images])

    def denoising():
        return torch.stack([im.float() / 255 * (torch.rand(h, w) >= 0.25) for im in images])

    loops = {"rotation": rotation, "jigsaw": jigsaw, "relative position": relative,
             "inpainting": inpainting, "denoising (masking)": denoising}
    try:
        import kornia.color as KC
        loops["colorization (Lab)"] = lambda: torch.stack(
            [KC.rgb_to_lab(im[None].float() / 255)[0] for im in images])
        loops["colorization (Lab), kornia batched"] = lambda: KC.rgb_to_lab(images.float() / 255)
    except ImportError:
        pass
    return loops


def bench_pretext(images, log, time_each, cuda):
    """Rows {op, recipe, impl, batch, side, samples_per_call, ms, samples_per_s}: every task
    through fastssl and through its per-image loop, timed in turns."""
    from fastssl import pretext
    n, _, side, _ = images.shape
    perms, _ = pretext.jigsaw_permutations(JIGSAW["permutations"], JIGSAW["grid"] ** 2,
                                           torch.Generator().manual_seed(0))
    mine = _fastssl(images, perms.to(images.device))
    try:
        theirs = _loops(images, perms) if not cuda else {}
    except ImportError as e:
        log(f"note: the per-image loops need torchvision ({e})")
        theirs = {}
    fns = {("fastssl", t): f for t, f in mine.items()}
    for task, f in theirs.items():
        impl = "kornia, batched" if task.endswith("kornia batched") else \
            "kornia, per image" if task.startswith("colorization") else "torchvision v2, per image"
        fns[(impl, task.replace(", kornia batched", ""))] = f
    log(f"pretext transforms: {n} uint8 images {side}x{side} on "
        f"{'cuda' if cuda else 'cpu'}")
    times = time_each(dict(fns), cuda, 7 if not cuda else 20)
    rows = []
    for (impl, task), ms in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0] != "fastssl")):
        rows.append({"op": "augment", "recipe": task, "impl": impl, "batch": n, "side": side,
                     "size": side, "dtype": "float32", "views_per_call": n, "ms": ms,
                     "views_per_s": n / ms * 1e3})
        log(f"  {task:>22} {impl:>26}: {ms:9.2f} ms per call, "
            f"{rows[-1]['views_per_s']:10.0f} samples/s")
    return rows
