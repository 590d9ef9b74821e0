"""fastssl's DCLLoss / DCLWLoss against lightly's own classes: values and gradients on the
same inputs (fastssl's error against float64 at most twice lightly's, plus four float32
roundings), lightly's weight function, and a custom weight_fn."""
import pytest
import torch

from tests.peers._peers import need, rel

lightly_loss = need("lightly.loss")
from lightly.loss import dcl_loss as lightly_dcl  # noqa: E402

import fastssl  # noqa: E402

EPS = torch.finfo(torch.float32).eps


def _run(loss, a, b):
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    v = loss(x, y)
    v.backward()
    return v.detach(), x.grad, y.grad


@pytest.mark.parametrize("n,D", [(2, 1), (9, 17), (32, 128), (5, 257)])
@pytest.mark.parametrize("T", [0.1, 0.5])
@pytest.mark.parametrize("cls", ["DCLLoss", "DCLWLoss"])
def test_dcl_against_lightly(n, D, T, cls):
    g = torch.Generator().manual_seed(n * 100 + D)
    a, b = torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)
    theirs = getattr(lightly_loss, cls)(temperature=T)
    mine = getattr(fastssl, cls)(temperature=T)
    want = _run(getattr(lightly_loss, cls)(temperature=T), a.double(), b.double())
    got, peer = _run(mine, a, b), _run(theirs, a, b)
    for x, p, w in zip(got, peer, want):
        assert rel(x, w) <= 2 * rel(p, w) + 4 * EPS, (rel(x, w), rel(p, w))


def test_dclw_weights_match_lightly():
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    v = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    ours = fastssl.multipositive.negative_mises_fisher_weights(u, v, 0.3)
    theirs = lightly_dcl.negative_mises_fisher_weights(u, v, 0.3)
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_dcl_custom_weight_fn_matches_lightly():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(7, 16, generator=g), torch.randn(7, 16, generator=g)
    fn = lambda p, q: torch.sum((p - q) ** 2, dim=1)  # noqa: E731  (lightly's docstring)
    got = _run(fastssl.DCLLoss(weight_fn=fn), a, b)
    peer = _run(lightly_loss.DCLLoss(weight_fn=fn), a, b)
    for x, p in zip(got, peer):
        assert rel(x, p) < 1e-5
