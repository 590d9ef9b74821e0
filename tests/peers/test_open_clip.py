"""fastssl's ClipLoss / SigLipLoss against open_clip's (3.3) on 2 gloo ranks: every
(local_loss, gather_with_grad) pair of ClipLoss and every dist_impl of SigLipLoss, the loss
and the gradients of both features, the logit scale and the bias on each rank, in float32
and float64. open_clip's float64 run is the reference (its code is the textbook formula);
the precision rule is the lightly tests': fastssl's float32 error at most twice open_clip's
plus four roundings of a float32 result, float64 within 1e4 roundings of float64.
``local_loss=True, gather_with_grad=False`` differs from open_clip on purpose in the
feature gradients (see ``OwnColumns``); there the reference is that rule, written with
torch.distributed, and open_clip's loss and scale gradient are checked to be the same."""
import math
import os

import torch
import torch.distributed as dist

from ._peers import need, rel

open_clip = need("open_clip")
from test_distributed import run_ranks  # noqa: E402  (tests/ is on sys.path)

CLIP = [("clip", local, with_grad) for local in (False, True) for with_grad in (False, True)]
SIGLIP = [("siglip", impl, None) for impl in ("bidir", "shift", "reduce", "gather")]
FLOOR = {torch.float32: 4 * 2.0 ** -24, torch.float64: 1e4 * 2.0 ** -53}
N, D = 5, 12  # rows per rank (odd), feature width


def features(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(2 * N, D, generator=g, dtype=torch.float64), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(2 * N, D, generator=g,
                                                               dtype=torch.float64), dim=1)
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
    import open_clip.loss as ol
    results = {}
    for i, case in enumerate(CLIP + SIGLIP):
        for dtype in (torch.float32, torch.float64):
            libs = [("fastssl", fastssl), ("open_clip", ol)] + \
                ([("own columns", "own columns")] if case == OWN else [])
            for name, lib in libs:
                results[(case, str(dtype), name)] = one(lib, case, rank, world, dtype, seed=i)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_clip_and_siglip_on_two_ranks_match_open_clip():
    ranks = run_ranks(worker, 2, timeout=120, failure="open_clip comparison did not finish")
    bad = []
    for case in CLIP + SIGLIP:
        errors = []
        peer = "own columns" if case == OWN else "open_clip"
        for r, res in enumerate(ranks):
            ref_loss, ref_grads = res[(case, str(torch.float64), peer)]
            if case == OWN:  # the same loss and scale gradient as open_clip; not its features'
                oc_loss, oc_grads = res[(case, str(torch.float64), "open_clip")]
                assert rel(oc_loss, ref_loss) < 1e-12 and rel(oc_grads[2], ref_grads[2]) < 1e-12
                assert rel(oc_grads[0], ref_grads[0]) > 0.1
            for dtype in (torch.float32, torch.float64):
                ours = res[(case, str(dtype), "fastssl")]
                theirs = res[(case, str(dtype), peer)]
                names = ["loss", "d image", "d text", "d scale", "d bias"]
                for name, a, b, ref in zip(names, [ours[0]] + ours[1], [theirs[0]] + theirs[1],
                                           [ref_loss] + ref_grads):
                    assert a.dtype == dtype and torch.isfinite(a).all(), (case, r, name)
                    errors.append((dtype, f"{case} rank {r} {name} vs {peer}", rel(a, ref),
                                   rel(b, ref)))
        for dtype, what, e_ours, e_theirs in errors:
            bound = FLOOR[dtype] + (2 * e_theirs if dtype == torch.float32 else 0.0)
            if not e_ours <= bound:
                bad.append(f"{what} ({dtype}): fastssl is {e_ours:.3g} from open_clip's "
                           f"float64, open_clip's {dtype} {e_theirs:.3g}")
    assert not bad, "\n".join(bad)
