"""fastssl's DetConBLoss, DetConSLoss and MACLLoss (``fastssl.detcon``) against lightly
1.6.0's: values and gradients at least as close to the float64 formula as lightly's own
(the precision rule of ``test_lightly.py``: fastssl's rms relative error over a few draws
at most twice lightly's plus four float32 roundings), on random and degenerate mask ids
(one id everywhere, regions without a positive), the same exception types on lightly's
documented errors, and the same signatures and attributes."""
import inspect

import pytest
import torch

from ._peers import need
from .test_lightly import DTYPES, Sweep, compare, raised, randn

lightly = need("lightly")
from lightly.loss import DetConBLoss, DetConSLoss, MACLLoss  # noqa: E402

from fastssl import detcon  # noqa: E402
from test_detcon import ref_detcon, ref_macl  # noqa: E402

SEEDS = range(3)


def masks(b, m, ids, seed):
    g = torch.Generator().manual_seed(seed)
    k0, k1 = torch.randint(0, ids, (b, m), generator=g), torch.randint(0, ids, (b, m), generator=g)
    if m > 1:
        k0[0, 0] = ids  # a region without a positive in the other view
    return k0, k1


SHAPES = [(1, 1, 1, 1), (2, 5, 3, 3), (4, 24, 32, 16), (8, 16, 64, 32), (3, 7, 257, 4),
          (3, 6, 8, 1)]  # the last: every region of an image under one id


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [0.1, 0.5])
@pytest.mark.parametrize("b,m,D,ids", SHAPES)
def test_detconb(b, m, D, ids, T, dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        xs = [randn(b, m, D, seed=100 * s + i) for i in range(4)]
        k0, k1 = masks(b, m, ids, s)
        compare("DetConBLoss", lambda *x: detcon.DetConBLoss(T)(*x, k0, k1),
                lambda *x: DetConBLoss(T)(*x, k0, k1),
                lambda *x: ref_detcon(*x, k0, k1, T), xs, dtype, sweep=sweep)
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,m,D,ids", SHAPES[:4])
def test_detcons(b, m, D, ids, dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        xs = [randn(b, m, D, seed=100 * s + i) for i in range(2)]
        k0, k1 = masks(b, m, ids, s)
        compare("DetConSLoss", lambda x, y: detcon.DetConSLoss(0.2)(x, y, k0, k1),
                lambda x, y: DetConSLoss(0.2, gather_distributed=False)(x, y, k0, k1),
                lambda x, y: ref_detcon(x, y, x, y, k0, k1, 0.2), xs, dtype, sweep=sweep)
    sweep.check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,alpha,A_0", [(0.1, 0.5, 0.0), (0.5, 1.0, 1.0), (1.0, 0.0, 0.5),
                                         (0.07, 0.3, 0.2)])
@pytest.mark.parametrize("n,D", [(2, 1), (5, 7), (32, 128), (9, 257)])
def test_macl(n, D, T, alpha, A_0, dtype):
    sweep = Sweep(dtype)
    for s in SEEDS:
        z0 = randn(n, D, seed=s)
        z1 = z0 + 0.7 * randn(n, D, seed=s + 10)
        ours, theirs = detcon.MACLLoss(T, alpha, A_0), MACLLoss(T, alpha, A_0)
        if D == 1:  # unit rows +-1: every gradient is 0 exactly (float64's: noise); values
            x, y = z0.to(dtype), z1.to(dtype)
            sweep.add("MACLLoss loss", ours(x, y), theirs(x, y),
                      ref_macl(x.double(), y.double(), T, alpha, A_0))
            continue
        compare("MACLLoss", ours, theirs, lambda x, y: ref_macl(x, y, T, alpha, A_0), [z0, z1],
                dtype, sweep=sweep)
    sweep.check()


def r32(*shape):
    return torch.randn(*shape)


def k(*shape):
    return torch.randint(0, 3, shape)


ERRORS = {
    "DetConBLoss temperature 0": lambda L: L.DetConBLoss(temperature=0.0),
    "DetConBLoss temperature 1e-9": lambda L: L.DetConBLoss(temperature=1e-9),
    "DetConBLoss temperature -1e-9": lambda L: L.DetConBLoss(temperature=-1e-9),
    "DetConSLoss temperature 0": lambda L: L.DetConSLoss(temperature=0.0),
    "DetConBLoss 2-D inputs": lambda L: L.DetConBLoss()(*[r32(4, 8)] * 4, k(4, 1), k(4, 1)),
    "DetConBLoss widths differ": lambda L: L.DetConBLoss()(
        r32(2, 3, 8), r32(2, 3, 8), r32(2, 3, 8), r32(2, 3, 6), k(2, 3), k(2, 3)),
    "DetConSLoss regions differ": lambda L: L.DetConSLoss()(r32(2, 3, 8), r32(2, 4, 8),
                                                            k(2, 3), k(2, 4)),
    "MACLLoss temperature 1e-9": lambda L: L.MACLLoss(temperature=1e-9),
    "MACLLoss temperature < 0": lambda L: L.MACLLoss(temperature=-0.1),
    "MACLLoss alpha < 0": lambda L: L.MACLLoss(alpha=-0.1),
    "MACLLoss alpha > 1": lambda L: L.MACLLoss(alpha=1.1),
    "MACLLoss A_0 < 0": lambda L: L.MACLLoss(A_0=-0.1),
    "MACLLoss A_0 > 1": lambda L: L.MACLLoss(A_0=1.1),
    "MACLLoss widths differ": lambda L: L.MACLLoss()(r32(4, 8), r32(4, 6)),
}


class _Lightly:
    DetConBLoss, DetConSLoss, MACLLoss = DetConBLoss, DetConSLoss, MACLLoss


@pytest.mark.parametrize("case", list(ERRORS))
def test_same_exception_types_as_lightly(case):
    theirs = raised(lambda: ERRORS[case](_Lightly))
    assert theirs is not None, f"{case}: lightly raised nothing (the case is wrong)"
    ours = raised(lambda: ERRORS[case](detcon))
    assert ours is not None, f"{case}: lightly raises {type(theirs).__name__}, fastssl nothing"
    assert isinstance(ours, type(theirs)), \
        f"{case}: lightly raises {type(theirs).__name__}, fastssl {type(ours).__name__}: {ours}"


def test_gather_distributed_without_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for cls in ("DetConBLoss", "DetConSLoss"):
        assert isinstance(raised(lambda: getattr(_Lightly, cls)()), ValueError)
        assert isinstance(raised(lambda: getattr(detcon, cls)()), ValueError)
        assert raised(lambda: getattr(detcon, cls)(gather_distributed=False)) is None


def test_signatures_and_attributes_match_lightly():
    for name in ("DetConBLoss", "DetConSLoss", "MACLLoss"):
        for method in ("__init__", "forward"):
            ours = inspect.signature(getattr(getattr(detcon, name), method)).parameters
            theirs = inspect.signature(getattr(getattr(_Lightly, name), method)).parameters
            assert [(p.name, p.default) for p in ours.values()] == \
                [(p.name, p.default) for p in theirs.values()], (name, method)
    for ours, theirs in ((detcon.DetConBLoss(0.3, False), DetConBLoss(0.3, False)),
                         (detcon.MACLLoss(0.2, 0.4, 0.1), MACLLoss(0.2, 0.4, 0.1))):
        for attr in ("temperature", "eps", "gather_distributed", "alpha", "A_0"):
            assert getattr(ours, attr, None) == getattr(theirs, attr, None), attr
    ours, theirs = detcon.DetConSLoss(0.3), DetConSLoss(0.3)
    assert ours.detconbloss.temperature == theirs.detconbloss.temperature
    assert ours.detconbloss.gather_distributed == theirs.detconbloss.gather_distributed
