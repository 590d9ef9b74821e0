"""The BYOL augmentation recipe on a uint8 batch: fastssl against torchvision v2 called
per sample."""
import torch

from .timing import noop, time_one



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


def _kornia_recipe(size, device):
    """The same recipe as Kornia composes it: one call per view of the whole batch, each
    sample with its own random parameters."""
    import kornia.augmentation as KA
    aug = torch.nn.Sequential(
        KA.RandomResizedCrop((size, size)), KA.RandomHorizontalFlip(),
        KA.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8), KA.RandomGrayscale(p=0.2),
        KA.RandomGaussianBlur((23, 23), (0.1, 2.0), p=1.0),
        KA.Normalize(torch.tensor((0.485, 0.456, 0.406), device=device),
                     torch.tensor((0.229, 0.224, 0.225), device=device))).to(device)
    return lambda images: aug(images.float() / 255)


def bench_augment(quick, log, save=noop, sizes=None, dtypes=None):
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
        try:
            kornia_view = _kornia_recipe(size, device)
            impls["kornia, batched"] = lambda: kornia_view(images)
        except Exception as e:
            if n == sizes[0]:
                log(f"note: kornia not benchmarked ({type(e).__name__}: {e})")
        log(f"BYOL recipe: {n} uint8 images {side}x{side} -> 2 views {size}x{size} "
            f"{str(dtype).replace('torch.', '')} on {device}")
        for impl, fn in impls.items():
            views = 2 if impl == "fastssl" else 1
            ms = time_one(fn, cuda, 5 if not cuda else 20)
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
