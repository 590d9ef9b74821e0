"""fastssl's SIGReg, LeJEPALoss, LeWMLoss and VISRegLoss (``fastssl.losses.sketch``) against lightly
1.6.0's: with the same seed both draw the same random directions and slices, and the
values and gradients are at least as close to the float64 formula as lightly's (the
precision rule of ``test_lightly.py``); the same output dtypes, signatures and exception
types; LeWMLoss and latent_distance likewise. One difference is deliberate: fastssl's normal quantiles for VISReg's shape term
are computed in float64 (lightly's in float32, then cast), which shows only on float64
inputs.
"""
import inspect

import pytest
import torch

from ._peers import need
from .test_lightly import DTYPES, Sweep, compare, raised, randn

lightly = need("lightly")
from lightly.loss import LeJEPALoss, LeWMLoss, SIGReg, VISRegLoss  # noqa: E402
from lightly.loss import latent_distance as lightly_latent  # noqa: E402
from lightly.loss import visreg_loss as lightly_visreg  # noqa: E402

from fastssl.losses import sketch  # noqa: E402
from test_sketch import (ref_distance, ref_lejepa, ref_lewm, ref_shape,  # noqa: E402
                         ref_sigreg, ref_visreg)

SEEDS = range(3)


def seeded(fn, seed):
    def call(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return call


def directions(seed, shape, dtype):
    """The draw both libraries make after ``torch.manual_seed(seed)``, normalised in float64."""
    torch.manual_seed(seed)
    a = torch.randn(*shape, dtype=dtype).double()
    return a / a.norm(dim=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,M,knots,t_max", [((64, 16), 32, 17, 3.0),
                                                 ((3, 50, 9), 128, 17, 3.0),
                                                 ((2, 1, 7), 5, 4, 1.5)])
def test_sigreg(shape, M, knots, t_max, dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        proj = randn(*shape, seed=s)
        a = directions(100 + s, (shape[-1], M), dtype)
        kw = dict(knots=knots, t_max=t_max, num_vectors=M)
        compare("SIGReg", seeded(sketch.SIGReg(**kw), 100 + s), seeded(SIGReg(**kw), 100 + s),
                lambda p: ref_sigreg(p, a, knots, t_max), [proj], dtype, sweep=sweep)
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_lejepa(dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        local, glob = randn(5, 24, 12, seed=s), randn(2, 24, 12, seed=s + 10)
        a = directions(200 + s, (12, 64), dtype)
        ours = sketch.LeJEPALoss(0.3, sigreg_num_vectors=64)
        theirs = LeJEPALoss(0.3, sigreg_num_vectors=64)
        compare("LeJEPALoss", seeded(lambda x, y: ours(local_proj=x, global_proj=y), 200 + s),
                seeded(lambda x, y: theirs(local_proj=x, global_proj=y), 200 + s),
                lambda x, y: ref_lejepa(x, y, a, 0.3), [local, glob], dtype, sweep=sweep)
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_lewm(dtype, normalize):
    sweep = Sweep(dtype)
    for s in SEEDS:
        emb, pred = randn(8, 5, 12, seed=s), randn(8, 4, 12, seed=s + 10)
        a = directions(500 + s, (12, 64), dtype)
        ours = sketch.LeWMLoss(0.2, normalize, sigreg_num_vectors=64)
        theirs = LeWMLoss(0.2, normalize, sigreg_num_vectors=64)
        compare("LeWMLoss", seeded(lambda p, e: ours(predicted=p, target=e[:, 1:],
                                                      embeddings=e), 500 + s),
                seeded(lambda p, e: theirs(predicted=p, target=e[:, 1:], embeddings=e),
                       500 + s),
                lambda p, e: ref_lewm(p, e, a, 0.2, normalize), [pred, emb], dtype,
                sweep=sweep)
        for distance in ("l1", "l2"):
            x, y = randn(3, 4, 7, seed=s + 20), randn(3, 4, 7, seed=s + 30)
            compare(f"latent_distance {distance}",
                    lambda p, t: sketch.latent_distance(predicted=p, target=t,
                                                        distance=distance, normalize=normalize),
                    lambda p, t: lightly_latent.latent_distance(
                        predicted=p, target=t, distance=distance, normalize=normalize),
                    lambda p, t: ref_distance(p, t, distance, normalize), [x, y], dtype,
                    wrt=[0], sweep=sweep)
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,N,D,S", [(1, 2, 1, 3), (2, 33, 17, 200), (3, 64, 8, 1000)])
def test_visreg_shape_loss(V, N, D, S, dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        z = randn(V, N, D, seed=s)
        slices = directions(300 + s, (D, S), dtype)
        compare("visreg_shape_loss", seeded(lambda x: sketch.visreg_shape_loss(x, S), 300 + s),
                seeded(lambda x: lightly_visreg.visreg_shape_loss(x, S), 300 + s),
                lambda x: ref_shape(x, slices), [z], dtype, sweep=sweep)
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
def test_visreg_loss_and_components(dtype):
    sweep = Sweep(dtype)
    kw = dict(lambda_param=0.6, num_slices=96, lambda_scale=0.5, lambda_shape=2.0,
              lambda_center=1.5)
    for s in SEEDS:
        local, glob = randn(4, 20, 6, seed=s), randn(2, 20, 6, seed=s + 10)
        slices = directions(400 + s, (6, 96), dtype)
        ours, theirs = sketch.VISRegLoss(**kw), VISRegLoss(**kw)
        compare("VISRegLoss", seeded(lambda x, y: ours(local_proj=x, global_proj=y), 400 + s),
                seeded(lambda x, y: theirs(local_proj=x, global_proj=y), 400 + s),
                lambda x, y: ref_visreg(x, y, slices, 0.6, 0.5, 2.0, 1.5), [local, glob],
                dtype, sweep=sweep)
        torch.manual_seed(s)
        a = ours.forward_components(local_proj=local.to(dtype), global_proj=glob.to(dtype))
        torch.manual_seed(s)
        b = theirs.forward_components(local_proj=local.to(dtype), global_proj=glob.to(dtype))
        assert type(a).__name__ == type(b).__name__ and a._fields == b._fields
        for name, x, y in zip(a._fields, a, b):
            assert x.dtype == y.dtype, name
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), (name, x, y)
    sweep.check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtypes_of_16_bit_inputs(dtype):
    proj = randn(3, 16, 8, seed=0).to(dtype)
    for ours, theirs in ((sketch.SIGReg(num_vectors=8), SIGReg(num_vectors=8)),):
        assert ours(proj).dtype == theirs(proj).dtype
    kw = dict(local_proj=proj[:2], global_proj=proj[2:])
    assert sketch.LeJEPALoss()(**kw).dtype == LeJEPALoss()(**kw).dtype
    assert sketch.VISRegLoss()(**kw).dtype == VISRegLoss()(**kw).dtype


def r32(*shape):
    return torch.randn(*shape)


ERRORS = {
    "SIGReg knots 1": lambda L: L.SIGReg(knots=1),
    "SIGReg t_max 0": lambda L: L.SIGReg(t_max=0.0),
    "SIGReg num_vectors 0": lambda L: L.SIGReg(num_vectors=0),
    "LeJEPALoss lambda 1.1": lambda L: L.LeJEPALoss(lambda_param=1.1),
    "LeJEPALoss 2-D local": lambda L: L.LeJEPALoss()(local_proj=r32(8, 4),
                                                     global_proj=r32(2, 8, 4)),
    "LeJEPALoss batch differs": lambda L: L.LeJEPALoss()(local_proj=r32(2, 7, 4),
                                                         global_proj=r32(2, 8, 4)),
    "LeJEPALoss no local view": lambda L: L.LeJEPALoss()(local_proj=r32(0, 8, 4),
                                                         global_proj=r32(2, 8, 4)),
    "VISRegLoss lambda -0.1": lambda L: L.VISRegLoss(lambda_param=-0.1),
    "VISRegLoss num_slices 0": lambda L: L.VISRegLoss(num_slices=0),
    "VISRegLoss eps 0": lambda L: L.VISRegLoss(eps=0.0),
    "VISRegLoss lambda_shape < 0": lambda L: L.VISRegLoss(lambda_shape=-1.0),
    "VISRegLoss batch 1": lambda L: L.VISRegLoss()(local_proj=r32(2, 1, 4),
                                                   global_proj=r32(2, 1, 4)),
    "VISRegLoss width differs": lambda L: L.VISRegLoss()(local_proj=r32(2, 8, 4),
                                                         global_proj=r32(2, 8, 5)),
    "LeWMLoss lambda < 0": lambda L: L.LeWMLoss(lambda_param=-0.1),
    "LeWMLoss 2-D embeddings": lambda L: L.LeWMLoss()(predicted=r32(4, 2, 5), target=r32(4, 2, 5),
                                                      embeddings=r32(4, 5)),
    "LeWMLoss batch differs": lambda L: L.LeWMLoss()(predicted=r32(3, 2, 5), target=r32(3, 2, 5),
                                                     embeddings=r32(4, 3, 5)),
    "latent_distance unknown distance": lambda L: L.latent_distance(
        predicted=r32(2, 3), target=r32(2, 3), distance="cos"),
    "latent_distance shapes differ": lambda L: L.latent_distance(predicted=r32(2, 3),
                                                                 target=r32(2, 4)),
    "visreg_shape_loss num_slices 0": lambda L: L.visreg_shape_loss(r32(8, 4), 0),
    "visreg_shape_loss eps 0": lambda L: L.visreg_shape_loss(r32(8, 4), 4, eps=0.0),
}


class _Lightly:
    SIGReg, LeJEPALoss, VISRegLoss, LeWMLoss = SIGReg, LeJEPALoss, VISRegLoss, LeWMLoss
    latent_distance = staticmethod(lightly_latent.latent_distance)
    visreg_shape_loss = staticmethod(lightly_visreg.visreg_shape_loss)


@pytest.mark.parametrize("case", list(ERRORS))
def test_same_exception_types_as_lightly(case):
    theirs = raised(lambda: ERRORS[case](_Lightly))
    assert theirs is not None, f"{case}: lightly raised nothing (the case is wrong)"
    ours = raised(lambda: ERRORS[case](sketch))
    assert ours is not None, f"{case}: lightly raises {type(theirs).__name__}, fastssl nothing"
    assert isinstance(ours, type(theirs)), \
        f"{case}: lightly raises {type(theirs).__name__}, fastssl {type(ours).__name__}: {ours}"


def test_signatures_and_buffers_match_lightly():
    for name in ("SIGReg", "LeJEPALoss", "VISRegLoss", "LeWMLoss"):
        for method in ("__init__", "forward"):
            ours = inspect.signature(getattr(getattr(sketch, name), method)).parameters
            theirs = inspect.signature(getattr(getattr(_Lightly, name), method)).parameters
            assert [(p.name, p.default, p.kind) for p in ours.values()] == \
                [(p.name, p.default, p.kind) for p in theirs.values()], (name, method)
    ours, theirs = sketch.SIGReg(knots=9, t_max=2.0), SIGReg(knots=9, t_max=2.0)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    for name in ("lejepa_invariance_loss", "visreg_center_loss", "visreg_scale_loss",
                 "visreg_shape_loss", "latent_prediction_loss", "latent_distance"):
        assert callable(getattr(sketch, name))
    ours = inspect.signature(sketch.latent_distance).parameters
    theirs = inspect.signature(lightly_latent.latent_distance).parameters
    assert [(p.name, p.default, p.kind) for p in ours.values()] == \
        [(p.name, p.default, p.kind) for p in theirs.values()]
