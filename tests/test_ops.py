"""torch.library registrations: opcheck, and torch.compile(fullgraph=True) of training steps."""
import pytest
import torch

import fastssl
from fastssl import _ops


def _args(normalize, with_neg, with_mask, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    n, D = 9, 6
    rows = torch.randn(n, D, generator=g).to(device, dtype).requires_grad_()
    cols = torch.randn(n, D, generator=g).to(device, dtype).requires_grad_()
    neg = torch.randn(5, D, generator=g).to(device, dtype) if with_neg else None
    pos = torch.arange(n, device=device).roll(1)
    mask = torch.arange(n, device=device) if with_mask else None
    scale = torch.tensor(2.5, device=device, requires_grad=True)
    return (rows, cols, neg, pos, mask, scale, normalize)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_neg", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_opcheck_infonce(backend, device, normalize, with_neg, with_mask):
    torch.library.opcheck(_ops.infonce, _args(normalize, with_neg, with_mask, device=device))


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_opcheck_infonce_backward(backend, device, need):
    rows, cols, neg, pos, mask, scale, normalize = _args(True, True, True, device=device)
    _, stats = _ops.infonce(rows, cols, neg, pos, mask, scale, normalize)
    grad = torch.rand(rows.shape[0], device=device)
    torch.library.opcheck(_ops.infonce_backward,
                          (rows.detach(), cols.detach(), neg, pos, mask, scale.detach(),
                           stats, grad, True, *need))


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(12, 16)
        self.b = torch.nn.Linear(12, 16)


def _step(loss_fn, compile_backend, device="cpu"):
    torch.manual_seed(0)
    head = _Head().to(device)
    x0, x1 = torch.randn(10, 12, device=device), torch.randn(10, 12, device=device)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)

    def forward(x0, x1):
        return loss_fn(head.a(x0), head.b(x1))

    eager = forward(x0, x1)
    eager.backward()  # the backward graph is compiled by AOTAutograd with the forward
    eager_grads = [p.grad.clone() for p in head.parameters()]
    opt.zero_grad()
    got = torch.compile(forward, fullgraph=True, backend=compile_backend)(x0, x1)
    got.backward()
    torch.testing.assert_close(got.detach(), eager.detach(), rtol=1e-5, atol=1e-6)
    for p, g in zip(head.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


LOSSES = {
    "nt_xent": fastssl.NTXentLoss(temperature=0.2),
    "info_nce": fastssl.InfoNCELoss(temperature=0.1, symmetric=True),
    "clip": lambda a, b: fastssl.ClipLoss()(a, b, 14.0),
}


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "clip"])
def test_compile_fullgraph(backend, device, name):
    torch._dynamo.reset()
    _step(LOSSES[name], "inductor" if name == "nt_xent" else "aot_eager", device)


def test_compile_fullgraph_info_nce_with_negatives(backend, device):
    torch._dynamo.reset()
    neg = torch.randn(20, 16, device=device)
    _step(lambda a, b: fastssl.info_nce(a, b, 0.1, negatives=neg), "aot_eager", device)
