"""The rank processes of test_open_clip.py: kept apart from the test module so that each
spawned rank imports torch, fastssl and open_clip's ``loss.py`` only (loaded by its path:
the ``open_clip`` package would import its model zoo, seconds per rank)."""
import importlib.util
import math
import os

import torch
import torch.distributed as dist


def open_clip_loss():
    spec = importlib.util.find_spec("open_clip")  # locates the package, does not import it
    path = os.path.join(os.path.dirname(spec.origin), "loss.py")
    loss = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(loss)
    loss.loader.exec_module(module)
    return module


CLIP = [("clip", local, with_grad) for local in (False, True) for with_grad in (False, True)]
SIGLIP = [("siglip", impl, None) for impl in ("bidir", "shift", "reduce", "gather")]
FLOOR = {torch.float32: 4 * 2.0 ** -24, torch.float64: 1e4 * 2.0 ** -53}
N, D = 5, 12  # rows per rank (odd), feature width


def features(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    img = unit(torch.randn(2 * N, D, generator=g, dtype=torch.float64), dim=1)
    txt = unit(img + 0.8 * torch.randn(2 * N, D, generator=g, dtype=torch.float64), dim=1)
    return img.to(dtype), txt.to(dtype)


class OwnColumns(torch.nn.Module):
    """fastssl's documented rule for ``local_loss=True, gather_with_grad=False``: the other
    ranks' features are constants, the rank's own rows keep their gradient in the gathered
    columns too (open_clip keeps them only with ``local_loss=False``; with
    ``local_loss=True`` it treats its own gathered rows as constants as well, so its
    gradient misses the terms of the text-to-image half through them)."""

    def __init__(self, rank, world):
        super().__init__()
        self.rank, self.world = rank, world

    def gathered(self, z):
        parts = [torch.zeros_like(z) for _ in range(self.world)]
        dist.all_gather(parts, z.detach())
        parts[self.rank] = z
        return torch.cat(parts)

    def forward(self, x, y, scale, bias=None):
        labels = torch.arange(x.shape[0]) + x.shape[0] * self.rank
        ce = torch.nn.functional.cross_entropy
        return (ce(scale * x @ self.gathered(y).T, labels) +
                ce(scale * y @ self.gathered(x).T, labels)) / 2


OWN = ("clip", True, False)


def build(lib, case, rank, world):
    if lib == "own columns":
        return OwnColumns(rank, world)
    kind, a, b = case
    if kind == "clip":
        return lib.ClipLoss(local_loss=a, gather_with_grad=b, rank=rank, world_size=world)
    return lib.SigLipLoss(rank=rank, world_size=world, dist_impl=a)


def one(lib, case, rank, world, dtype, seed):
    """(loss, gradients of image, text, scale, bias) on this rank's rows."""
    img, txt = features(dtype, seed)
    rows = slice(rank * N, (rank + 1) * N)
    x = img[rows].clone().requires_grad_()
    y = txt[rows].clone().requires_grad_()
    scale = torch.tensor(math.exp(2.7) if case[0] == "clip" else 10.0, dtype=dtype,
                         requires_grad=True)
    bias = torch.tensor(-10.0 if case[0] == "siglip" else 0.0, dtype=dtype, requires_grad=True)
    loss = build(lib, case, rank, world)(x, y, scale, bias if case[0] == "siglip" else None)
    wrt = [x, y, scale] + ([bias] if case[0] == "siglip" else [])
    return loss.detach(), [g.detach() for g in torch.autograd.grad(loss, wrt)]


def worker(rank, world, port, out, backend):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fastssl
    ol = open_clip_loss()
    results = {}
    for i, case in enumerate(CLIP + SIGLIP):
        for dtype in (torch.float32, torch.float64):
            libs = [("fastssl", fastssl), ("open_clip", ol)] + \
                ([("own columns", "own columns")] if case == OWN else [])
            for name, lib in libs:
                results[(case, str(dtype), name)] = one(lib, case, rank, world, dtype, seed=i)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()
