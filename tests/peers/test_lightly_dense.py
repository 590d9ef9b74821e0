"""fastssl's dense losses (``fastssl.losses.dense``) against lightly 1.6.0's VICRegLLoss,
PatchKernelAlignmentLoss, roi_resample_to_grid and ``lightly.models.utils.nearest_neighbors``:
values and gradients at least as close to the float64 formula as lightly's own (the
precision rule of ``test_lightly.py``), the same matches as lightly's bitwise (also on grids
built like lightly's VICRegLTransform, whose regular lattices tie exactly), the same tokens
from the same seed (PKA's ``max_tokens``), the same exception types on lightly's documented
errors, the same signatures. lightly computes PKA in float32 even for float64 inputs and
returns it in float32; its value is cast to the input dtype here (fastssl keeps float64).
"""
import inspect

import pytest
import torch

from ._peers import need
from .test_lightly import DTYPES, Sweep, compare, raised, randn

lightly = need("lightly")
from lightly.loss import PatchKernelAlignmentLoss, VICRegLLoss  # noqa: E402
from lightly.loss import roi_resample_to_grid as lightly_roi  # noqa: E402
from lightly.models.utils import nearest_neighbors as lightly_nn  # noqa: E402

from fastssl.losses import dense  # noqa: E402
from test_dense_losses import (lightly_draw, ref_pka, ref_roi, ref_vicregl,  # noqa: E402
                               unflat, vicregl_data)

SEEDS = range(3)


# ----------------------------------------------------------------------------- VICRegL

def lattice_grids(B, n, seed, scale):
    """Grids as lightly's VICRegLTransform makes them: an n x n linspace lattice over a crop
    (left, top, width, height) per image, here with coordinates on a coarse grid so that
    many distances tie exactly."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(B):
        left, top = torch.randint(0, 8, (2,), generator=g).tolist()
        width, height = scale * torch.randint(2, 5, (2,), generator=g)
        x = torch.linspace(left, left + float(width), n)
        y = torch.linspace(top, top + float(height), n)
        gx, gy = torch.meshgrid(x, y, indexing="xy")
        out.append(torch.stack([gx, gy], dim=-1))
    return torch.stack(out).double()


VICREGL_CASES = [  # B, Dg, Dl, global hw, local hw, G, L, grid c, kwargs
    (2, 32, 8, (7, 7), (4, 4), 2, 6, 2, {}),
    (4, 16, 64, (5, 5), (3, 3), 2, 2, 2, {"num_matches": (6, 3)}),    # Gram covariance
    (16, 8, 6, (4, 4), (2, 2), 2, 3, 2, {"alpha": 0.4, "nu_param": 3.0}),  # D x D
    (3, 5, 4, (3, 2), (2, 2), 1, 2, 3, {"num_matches": (None, -1), "eps": 0.1}),
    (5, 4, 3, (3, 3), None, 3, 0, 2, {"lambda_param": 2.0, "mu_param": 0.5}),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,Dg,Dl,ghw,lhw,G,L,c,kw", VICREGL_CASES)
def test_vicregl(B, Dg, Dl, ghw, lhw, G, L, c, kw, dtype):
    ours, theirs = dense.VICRegLLoss(**kw), VICRegLLoss(**kw)
    ref_kw = {"lam": kw.get("lambda_param", 25.0), "mu": kw.get("mu_param", 25.0),
              "nu": kw.get("nu_param", 1.0), "alpha": kw.get("alpha", 0.75),
              "eps": kw.get("eps", 1e-4), "nm": kw.get("num_matches", (20, 4))}
    n_feat = 2 * (G + L)
    sweep = Sweep(dtype)
    for s in SEEDS:
        xs = vicregl_data(B, Dg, Dl, ghw, lhw, G, L, c, seed=10 * s)

        def call(loss_fn):
            return lambda *t: loss_fn(*[v or None for v in unflat(G, L, list(t))])
        lo, lt = compare("VICRegLLoss", call(ours), call(theirs),
                         lambda *t: ref_vicregl(*unflat(G, L, list(t)), **ref_kw), xs, dtype,
                         wrt=list(range(n_feat)), sweep=sweep)
        torch.testing.assert_close(lo, lt.reshape(()), rtol=1e-5, atol=0)  # same matches
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_vicregl_on_lattice_grids(dtype):
    """Grids of lightly's transform (2 global 7 x 7, 4 local 3 x 3 lattices): the location
    matches tie exactly, and both libraries resolve the ties alike (torch's topk on the same
    distances), so the losses agree to rounding and the gradients to a few roundings."""
    B, G, L = 4, 2, 4
    xs = vicregl_data(B, 16, 8, (7, 7), (3, 3), G, L, 2, seed=3)
    grids = [lattice_grids(B, 7, seed=v, scale=2) for v in range(G)] + \
        [lattice_grids(B, 3, seed=10 + v, scale=1) for v in range(L)]
    xs = [x.to(dtype) for x in xs[:2 * (G + L)]] + [g.float() for g in grids]
    leaves = [x.clone().requires_grad_() for x in xs[:2 * (G + L)]]
    out = []
    for loss_fn in (dense.VICRegLLoss(), VICRegLLoss()):
        inputs = [x.detach().requires_grad_() for x in leaves] + xs[2 * (G + L):]
        loss = loss_fn(*unflat(G, L, inputs)).reshape(())
        out.append((loss, torch.autograd.grad(loss, inputs[:2 * (G + L)])))
    (lo, go), (lt, gt) = out
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(lo, lt, rtol=rtol, atol=0)
    for a, b in zip(go, gt):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=rtol * 10 * float(b.abs().max()))


def test_nearest_neighbors_is_lightlys_bitwise():
    """On lattice distances full of exact ties: the same rows in the same order."""
    grid_a = lattice_grids(3, 7, seed=1, scale=2).float().flatten(1, 2)
    grid_b = lattice_grids(3, 3, seed=2, scale=1).float().flatten(1, 2)
    a, b = randn(3, 49, 5, seed=1).float(), randn(3, 9, 5, seed=2).float()
    for x, y, gx, gy in ((a, b, grid_a, grid_b), (b, a, grid_b, grid_a)):
        for d in (torch.cdist(gx, gy), torch.cdist(x, y)):
            for k in (1, 4, 20, 100, -1):
                ours = dense.nearest_neighbors(x, y, d, k)
                theirs = lightly_nn(x, y, d, k)
                assert all(torch.equal(o, t) for o, t in zip(ours, theirs)), k


# ----------------------------------------------------------------------------- PKA

def as_input_dtype(loss_fn):
    """lightly's PKA returns float32 whatever the input; cast to the input's dtype."""
    return lambda s, t, *rest: loss_fn(s, t, *rest).to(s.dtype)


def seeded(fn, seed):
    def call(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return call


PKA_CASES = [  # B, N, D, mask probability, max_tokens, offset
    (2, 16, 8, None, None, 0.0), (3, 49, 64, 0.3, None, 0.0), (4, 196, 32, None, 64, 0.0),
    (2, 64, 16, 0.5, 20, 0.0), (3, 30, 8, None, None, 20.0), (1, 3, 1, None, None, 0.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N,D,p,max_tokens,offset", PKA_CASES)
def test_pka(B, N, D, p, max_tokens, offset, dtype):
    """Both formulations; masks; the seeded subsample (the same tokens as lightly's); large
    common offsets (lightly double-centres the raw kernel, where the offset cancels). The
    1 x 3 x 1 case is swept over 40 draws: its CKA is often within 1e-2 of 1, so 1 - CKA
    magnifies a rounding of CKA a hundredfold and three draws are a coin toss."""
    ours = as_input_dtype(dense.PatchKernelAlignmentLoss(max_tokens))
    theirs = as_input_dtype(PatchKernelAlignmentLoss(max_tokens))
    sweep = Sweep(dtype)
    for s in (range(40) if N == 3 else SEEDS):
        x = randn(B, N, D, seed=s) + offset
        y = x @ randn(D, D, seed=s + 1) / D ** 0.5 + 0.7 * randn(B, N, D, seed=s + 2)
        mask = None if p is None else \
            torch.rand(B, N, generator=torch.Generator().manual_seed(s)) < p
        index = None if max_tokens is None else lightly_draw(B, N, mask, max_tokens, seed=s)
        args = (lambda a, b: (a, b)) if mask is None else (lambda a, b: (a, b, mask))
        lo, lt = compare("PatchKernelAlignmentLoss", seeded(lambda a, b: ours(*args(a, b)), s),
                         seeded(lambda a, b: theirs(*args(a, b)), s),
                         lambda a, b: ref_pka(a, b, mask, index), [x, y], dtype, wrt=[0],
                         sweep=sweep)
        if offset == 0:
            torch.testing.assert_close(lo, lt, rtol=1e-4, atol=1e-6)  # the same tokens
    sweep.check()


# ----------------------------------------------------------------------------- ROI

BOXES = [[0.0, 0.0, 11.0, 9.0], [1.3, 2.2, 7.7, 5.1], [-3.0, -2.0, 14.0, 12.5],
         [4.0, 4.0, 4.0, 6.0], [6.0, 5.0, 2.0, 1.0], [9.6, 7.7, 10.9, 8.9]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("oh,ow", [(4, 3), (1, 1), (7, 7)])
def test_roi_resample_to_grid(oh, ow, dtype):
    """Against torchvision's roi_align under lightly's helper: boxes inside, fractional,
    beyond the map, empty, inverted and at the far border; the output through a random
    weighting (so the input gradient is checked too)."""
    sweep = Sweep(dtype)
    boxes = torch.tensor(BOXES, dtype=dtype)
    for s in SEEDS:
        fm = randn(6, 5, 9, 11, seed=s)
        weight = randn(6, oh * ow, 5, seed=s + 1).to(dtype)
        compare("roi_resample_to_grid",
                lambda f: (dense.roi_resample_to_grid(f, boxes, oh, ow) * weight).sum(),
                lambda f: (lightly_roi(f, boxes, oh, ow) * weight).sum(),
                lambda f: (ref_roi(f, boxes.double(), oh, ow) * weight.double()).sum(),
                [fm], dtype, sweep=sweep)
        out = dense.roi_resample_to_grid(fm.to(dtype), boxes, oh, ow)
        torch.testing.assert_close(out, lightly_roi(fm.to(dtype), boxes, oh, ow))
    sweep.check()


# ----------------------------------------------------------------------------- errors

def r32(*shape):
    return torch.randn(*shape)


def views(n, B=2, hw=(3, 3)):
    return [(r32(B, 8), r32(B, *hw, 4)) for _ in range(n)], [r32(B, *hw, 2) for _ in range(n)]


GV, GG = views(2)
LV, LG = views(2, hw=(2, 2))

ERRORS = {
    "VICRegLLoss global lengths differ": lambda L: L.VICRegLLoss()(GV, GG[:1]),
    "VICRegLLoss local lengths differ": lambda L: L.VICRegLLoss()(GV, GG, LV, LG[:1]),
    "VICRegLLoss local grids missing": lambda L: L.VICRegLLoss()(GV, GG, LV, None),
    "VICRegLLoss local features missing": lambda L: L.VICRegLLoss()(GV, GG, None, LG),
    "VICRegLLoss batch 1": lambda L: L.VICRegLLoss()(*views(2, B=1)),
    "PKA max_tokens 1": lambda L: L.PatchKernelAlignmentLoss(max_tokens=1),
    "PKA 2-D student": lambda L: L.PatchKernelAlignmentLoss()(r32(4, 8), r32(4, 8)),
    "PKA 2-D teacher": lambda L: L.PatchKernelAlignmentLoss()(r32(2, 4, 8), r32(4, 8)),
    "PKA shapes differ": lambda L: L.PatchKernelAlignmentLoss()(r32(2, 4, 8), r32(2, 4, 6)),
    "PKA mask shape": lambda L: L.PatchKernelAlignmentLoss()(r32(2, 4, 8), r32(2, 4, 8),
                                                             torch.ones(2, 3) > 0),
    "PKA mask dtype": lambda L: L.PatchKernelAlignmentLoss()(r32(2, 4, 8), r32(2, 4, 8),
                                                             torch.ones(2, 4)),
    "roi 3-D map": lambda L: L.roi_resample_to_grid(r32(2, 3, 4), r32(2, 4), 2, 2),
    "roi boxes (B, 3)": lambda L: L.roi_resample_to_grid(r32(2, 3, 4, 4), r32(2, 3), 2, 2),
    "roi batch sizes differ": lambda L: L.roi_resample_to_grid(r32(2, 3, 4, 4), r32(3, 4), 2,
                                                               2),
}


class _Lightly:
    VICRegLLoss, PatchKernelAlignmentLoss = VICRegLLoss, PatchKernelAlignmentLoss
    roi_resample_to_grid = staticmethod(lightly_roi)


@pytest.mark.filterwarnings("ignore:var\\(\\)")  # lightly's variance of one sample
@pytest.mark.parametrize("case", list(ERRORS))
def test_same_exception_types_as_lightly(case):
    theirs = raised(lambda: ERRORS[case](_Lightly))
    assert theirs is not None, f"{case}: lightly raised nothing (the case is wrong)"
    ours = raised(lambda: ERRORS[case](dense))
    assert ours is not None, f"{case}: lightly raises {type(theirs).__name__}, fastssl nothing"
    assert isinstance(ours, type(theirs)), \
        f"{case}: lightly raises {type(theirs).__name__}, fastssl {type(ours).__name__}: {ours}"


def test_gather_distributed_without_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    assert isinstance(raised(lambda: VICRegLLoss(gather_distributed=True)), ValueError)
    assert isinstance(raised(lambda: dense.VICRegLLoss(gather_distributed=True)), ValueError)


def test_signatures_match_lightly():
    """The same parameter names, order and defaults."""
    pairs = [(dense.VICRegLLoss.__init__, VICRegLLoss.__init__),
             (dense.VICRegLLoss.forward, VICRegLLoss.forward),
             (dense.VICRegLLoss._global_loss, VICRegLLoss._global_loss),
             (dense.VICRegLLoss._local_loss, VICRegLLoss._local_loss),
             (dense.PatchKernelAlignmentLoss.__init__, PatchKernelAlignmentLoss.__init__),
             (dense.PatchKernelAlignmentLoss.forward, PatchKernelAlignmentLoss.forward),
             (dense.roi_resample_to_grid, lightly_roi),
             (dense.nearest_neighbors, lightly_nn)]
    for ours, theirs in pairs:
        a = [(p.name, p.default) for p in inspect.signature(ours).parameters.values()]
        b = [(p.name, p.default) for p in inspect.signature(theirs).parameters.values()]
        assert a == b, (ours.__qualname__, a, b)
