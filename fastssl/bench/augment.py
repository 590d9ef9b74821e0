"""The BYOL augmentation recipe on a uint8 batch: fastssl (both views, and the first view
alone: the peers' recipe) against torchvision v2 applied image by image (a ``v2.Compose``,
as DataLoader workers run it) and Kornia's batched recipe, each where it imports (the
reason it does not is logged and kept in the result's ``peers.missing``); then, on the
largest batch, the pretext tasks' transforms (``bench.pretext``)."""
import torch

from .pretext import bench_pretext
from .timing import noop, time_each



def _torchvision_recipe(size):
    """BYOL's first view as torchvision v2 composes it, called once per image (so that each
    image gets its own random parameters, as in a DataLoader worker): ``loop(images)``."""
    import torchvision.transforms.v2 as T
    aug = T.Compose([T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip(),
                     T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                     T.RandomGrayscale(0.2), T.GaussianBlur(23, (0.1, 2.0)),
                     T.ToDtype(torch.float32, scale=True), T.Normalize(
                         (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return lambda images: torch.stack([aug(im) for im in images])


PEERS = {"torchvision v2, per sample": lambda size, device: _torchvision_recipe(size),
         "kornia, batched": lambda size, device: _kornia_recipe(size, device)}


def find_peers(size, device):
    """({name: view(images)} of the peers that import here, {name: why not} of the rest)."""
    found, missing = {}, {}
    for name, make in PEERS.items():
        try:
            found[name] = make(size, device)
        except Exception as e:
            missing[name] = f"{type(e).__name__}: {str(e)[:200]}"
    return found, missing


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
    """The BYOL recipe: uint8 (N, 3, H, W) -> views (fastssl: both views, and the first view
    alone; the peers: the first view), in views per second, for each batch size N in
    ``sizes``."""
    from fastssl.augment import BYOLAugment
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    side, size = (128, 96) if quick and not cuda else (256, 224)
    if not sizes:
        sizes = ([256] if quick else [64, 256, 1024]) if cuda else ([16] if quick else [16, 64])
    dtype = getattr(torch, (dtypes or ["bfloat16" if cuda else "float32"])[0])
    peers, missing = find_peers(size, device)
    for name, why in missing.items():
        log(f"note: {name} not benchmarked ({why})")
    rows = []
    for n in sizes:
        images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, device=device)
        aug = BYOLAugment(size=size, dtype=dtype)
        impls = {"fastssl": (lambda: aug(images), 2),
                 "fastssl, first view": (lambda: aug.views[0](images), 1)}
        impls.update({name: ((lambda view=view: view(images)), 1) for name, view in peers.items()})
        log(f"BYOL recipe: {n} uint8 images {side}x{side} -> 2 views {size}x{size} "
            f"{str(dtype).replace('torch.', '')} on {device}")
        # in turns (on the CPU): a drift of a shared machine falls on every row alike
        times = time_each({k: fn for k, (fn, _) in impls.items()}, cuda, 7 if not cuda else 20)
        for impl, (fn, views) in impls.items():
            ms = times[impl]
            row = {"op": "augment", "recipe": "BYOL", "impl": impl, "batch": n, "side": side, "size": size,
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
        if n == max(sizes):  # the pretext tasks' transforms on the largest batch
            rows += bench_pretext(images, log, time_each, cuda)
            save(rows)
        del images
    return rows, {"peers": {"missing": missing}}
