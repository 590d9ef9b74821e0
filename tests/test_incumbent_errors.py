"""The incumbents' exception contract: for every bad input that lightly's or open_clip's
class rejects, the fastssl class raises an exception that satisfies the incumbent's type
(the one their documentation and their own test suites expect) and fastssl's own rule
(TypeError for the wrong kind, ValueError for a value outside its domain).

What the incumbents raise (read from their sources): lightly's VICRegLoss asserts a batch
above 1 and equal shapes (AssertionError); NTXentLoss, BarlowTwinsLoss and VICRegLoss
raise ValueError at construction for gather_distributed=True without torch.distributed
(asking ``torch.distributed.is_available()`` once), NTXentLoss a ValueError for
|temperature| < 1e-8; cosine_schedule a ValueError for a negative step or max_steps and a
period <= 0, and a RuntimeWarning past max_steps. Mismatched shapes elsewhere (NTXentLoss,
BarlowTwinsLoss, NegativeCosineSimilarity, update_momentum, open_clip's ClipLoss and
SigLipLoss) fail inside torch with a RuntimeError.
"""
import warnings

import pytest
import torch
import torch.distributed as dist

import fastssl
from fastssl._checks import ShapeError

SHAPE_KINDS = (AssertionError, RuntimeError, ValueError)


def r(*shape):
    return torch.randn(*shape)


# (id, call) -> every one must raise an exception that is each of SHAPE_KINDS
SHAPE_CASES = {
    "VICRegLoss batch 1": lambda: fastssl.VICRegLoss()(r(1, 32), r(1, 32)),
    "VICRegLoss shapes differ": lambda: fastssl.VICRegLoss()(r(2, 32), r(2, 16)),
    "VICRegLoss batch sizes differ": lambda: fastssl.VICRegLoss()(r(3, 8), r(2, 8)),
    "VICRegLoss (N, L, D) vs (N, D)": lambda: fastssl.VICRegLoss()(r(4, 3, 8), r(4, 8)),
    "BarlowTwinsLoss batch 1": lambda: fastssl.BarlowTwinsLoss()(r(1, 8), r(1, 8)),
    "BarlowTwinsLoss shapes differ": lambda: fastssl.BarlowTwinsLoss()(r(4, 8), r(4, 6)),
    "NTXentLoss shapes differ": lambda: fastssl.NTXentLoss()(r(4, 8), r(4, 6)),
    "NTXentLoss batch sizes differ": lambda: fastssl.NTXentLoss()(r(4, 8), r(3, 8)),
    "NTXentLoss 1-D": lambda: fastssl.NTXentLoss()(r(8), r(8)),
    "NTXentLoss(bank) width differs from the bank": lambda: fastssl.NTXentLoss(
        memory_bank_size=(16, 8))(r(4, 6), r(4, 6)),
    "NegativeCosineSimilarity shapes differ": lambda: fastssl.NegativeCosineSimilarity()(
        r(4, 8), r(4, 6)),
    "ClipLoss shapes differ": lambda: fastssl.ClipLoss()(r(4, 8), r(4, 6), 10.0),
    "SigLipLoss shapes differ": lambda: fastssl.SigLipLoss()(r(4, 8), r(3, 8), 10.0, -10.0),
    "InfoNCELoss shapes differ": lambda: fastssl.InfoNCELoss()(r(4, 8), r(4, 6)),
    "update_momentum shapes differ": lambda: fastssl.update_momentum(
        torch.nn.Linear(3, 2), torch.nn.Linear(4, 2), 0.9),
    "MoCoQueue.enqueue width": lambda: fastssl.MoCoQueue(8, 16).enqueue(r(4, 6)),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES), ids=list(SHAPE_CASES))
def test_a_wrong_shape_satisfies_every_incumbents_exception_type(case):
    with pytest.raises(ShapeError) as info:
        SHAPE_CASES[case]()
    for kind in SHAPE_KINDS:
        assert isinstance(info.value, kind), f"{case}: not a {kind.__name__}"


@pytest.mark.parametrize("kind", SHAPE_KINDS)
def test_lightly_style_handlers_catch_it(kind):
    """Code written as ``except AssertionError`` (lightly's VICReg tests), ``except
    RuntimeError`` (torch's shape errors) or ``except ValueError`` keeps working."""
    try:
        fastssl.VICRegLoss()(r(1, 32), r(1, 32))
    except kind:
        return
    pytest.fail(f"not caught by except {kind.__name__}")


@pytest.mark.parametrize("cls", [fastssl.NTXentLoss, fastssl.BarlowTwinsLoss,
                                 fastssl.VICRegLoss])
def test_gather_distributed_without_torch_distributed(cls, monkeypatch):
    calls = []

    def available(value):
        def is_available():
            calls.append(1)
            return value
        return is_available

    monkeypatch.setattr(dist, "is_available", available(True))
    cls(gather_distributed=True)
    assert len(calls) == 1, "torch.distributed.is_available() asked more than once"
    calls.clear()
    monkeypatch.setattr(dist, "is_available", available(False))
    with pytest.raises(ValueError, match="gather_distributed"):
        cls(gather_distributed=True)
    assert len(calls) == 1


@pytest.mark.parametrize("t", [0.0, 1e-9, -1e-9, torch.tensor(0.0), torch.tensor(5e-9)])
def test_ntxent_temperature_rule(t):
    with pytest.raises(ValueError, match="temperature"):
        fastssl.NTXentLoss(temperature=t)


@pytest.mark.parametrize("args,word", [((-1, 10, 1.0, 0.0), "step"),
                                       ((1, -10, 1.0, 0.0), "step number"),
                                       ((1, 10, 1.0, 0.0, 0), "Period"),
                                       ((1, 10, 1.0, 0.0, -2.0), "Period")])
def test_cosine_schedule_errors(args, word):
    with pytest.raises(ValueError, match=word):
        fastssl.cosine_schedule(*args)


def test_cosine_schedule_warns_past_max_steps():
    with pytest.warns(RuntimeWarning):
        value = fastssl.cosine_schedule(12, 10, 0.99, 1.0)
    assert value == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastssl.cosine_schedule(12, 10, 0.99, 1.0, period=5)  # repeats: no warning
