"""torch.library registrations: opcheck, and torch.compile(fullgraph=True) of training steps."""
import os
import subprocess
import sys

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
    torch.library.opcheck(_ops.infonce.custom, _args(normalize, with_neg, with_mask, device=device))


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_opcheck_infonce_backward(backend, device, need):
    rows, cols, neg, pos, mask, scale, normalize = _args(True, True, True, device=device)
    _, stats = _ops.infonce(rows, cols, neg, pos, mask, scale, normalize)
    grad = torch.rand(rows.shape[0], device=device)
    torch.library.opcheck(_ops.infonce_backward.custom,
                          (rows.detach(), cols.detach(), neg, pos, mask, scale.detach(),
                           stats, grad, True, *need))


def _siglip_args(device):
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(7, 5, generator=g).to(device).requires_grad_()
    cols = torch.randn(9, 5, generator=g).to(device).requires_grad_()
    pos = torch.arange(7, device=device)
    scale = torch.tensor(3.0, device=device, requires_grad=True)
    bias = torch.tensor(-2.0, device=device, requires_grad=True)
    return rows, cols, pos, scale, bias


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_opcheck_siglip(backend, device, need):
    rows, cols, pos, scale, bias = _siglip_args(device)
    torch.library.opcheck(_ops.siglip.custom, (rows, cols, pos, scale, bias))
    torch.library.opcheck(_ops.siglip_backward.custom, (
        rows.detach(), cols.detach(), pos, scale.detach(), bias.detach(),
        torch.rand(rows.shape[0], device=device), *need))


def _prototype_args(device, center=True):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(6, 5, generator=g).to(device).requires_grad_()
    W = torch.randn(11, 5, generator=g).to(device).requires_grad_()
    t, V = torch.randn(4, 5, generator=g).to(device), torch.randn(11, 5, generator=g).to(device)
    c = torch.randn(11, generator=g).to(device) if center else None
    pidx = torch.tensor([[0, 2], [1, 3], [2, 0], [3, 1], [0, 0], [1, 0]], dtype=torch.int32,
                        device=device)  # the last two rows: one pair, a weight-0 slot
    w = torch.rand(6, 2, generator=g).to(device)
    w[4:, 1] = 0
    return s, W, t, V, c, pidx, w, 0.1, 0.04


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_opcheck_prototype_ce(backend, device, center, need):
    args = _prototype_args(device, center)
    torch.library.opcheck(_ops.prototype_ce.custom, args)
    _, st_s, st_t = _ops.prototype_ce.custom(*args)
    plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    torch.library.opcheck(_ops.prototype_ce_backward.custom, (
        *plain, st_s, st_t, torch.tensor(1.5, device=device), *need))


def _z(device, n=6, D=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g).to(device).requires_grad_()


EAGER_VS_CUSTOM = {
    "infonce": lambda d: (_ops.infonce, _args(True, True, True, device=d)),
    "infonce (no normalisation)": lambda d: (_ops.infonce, _args(False, False, False, device=d)),
    "siglip": lambda d: (_ops.siglip, _siglip_args(d)),
    "gram_inner": lambda d: (_ops.gram_inner, (_z(d), _z(d, seed=3))),
    "standardize": lambda d: (_ops.standardize, (_z(d, n=9), 1e-5)),
    "prototype_ce": lambda d: (_ops.prototype_ce, _prototype_args(d)),
}


@pytest.mark.parametrize("case", list(EAGER_VS_CUSTOM))
def test_eager_call_equals_the_custom_op(backend, device, case):
    """In eager mode an op runs its implementation under an autograd.Function; tracers get
    the registered custom op. Both give bitwise the same outputs and input gradients."""
    op, args = EAGER_VS_CUSTOM[case](device)
    results = []
    for fn in (op.eager, op.custom):
        leaves = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(
            a, torch.Tensor) else a for a in args]
        out = fn(*leaves)
        first = out[0] if isinstance(out, tuple) else out
        weights = torch.linspace(-1, 2, first.numel(), device=first.device).view(first.shape)
        diff = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
        grads = torch.autograd.grad((first * weights).sum(), diff)
        results.append(([o.detach() for o in (out if isinstance(out, tuple) else (out,))], grads))
    for a, b in zip(results[0][0] + list(results[0][1]), results[1][0] + list(results[1][1])):
        assert torch.equal(a, b)


def test_first_cpu_call_imports_neither_dynamo_nor_triton():
    """torch's custom-op dispatch imports torch._dynamo (and Triton with it) on first use,
    about a second; eager calls on CPU take the direct path instead."""
    code = ("import sys, torch, fastssl\n"
            "a = torch.randn(6, 8, requires_grad=True)\n"
            "for loss in (fastssl.nt_xent(a, a * 2, 0.5), fastssl.info_nce(a, a + 1, 0.2),\n"
            "             fastssl.clip_loss(a, a, 2.0), fastssl.siglip_loss(a, a, 2.0, -1.0),\n"
            "             fastssl.barlow_twins(a, a * 3), fastssl.vicreg(a, a + 1)):\n"
            "    loss.backward()\n"
            "fastssl.augment.SimCLRAugment(size=8)(torch.zeros(2, 3, 12, 12, dtype=torch.uint8))\n"
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTSSL_BACKEND", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


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
    # (a prototype loss's teacher side gets no gradient)
    eager_grads = [None if p.grad is None else p.grad.clone() for p in head.parameters()]
    opt.zero_grad()
    got = torch.compile(forward, fullgraph=True, backend=compile_backend)(x0, x1)
    got.backward()
    torch.testing.assert_close(got.detach(), eager.detach(), rtol=1e-5, atol=1e-6)
    for p, g in zip(head.parameters(), eager_grads):
        if g is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


LOSSES = {
    "nt_xent": fastssl.NTXentLoss(temperature=0.2),
    "info_nce": fastssl.InfoNCELoss(temperature=0.1, symmetric=True),
    "clip": lambda a, b: fastssl.ClipLoss()(a, b, 14.0),
    "prototype": lambda a, b: fastssl.prototype_cross_entropy(
        a, b, torch.linspace(-1, 1, 20 * 16).reshape(20, 16).sin().to(a.device),
        center=torch.linspace(0, 1, 20).to(a.device)),
}


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "clip", "prototype"])
def test_compile_fullgraph(backend, device, name):
    torch._dynamo.reset()
    _step(LOSSES[name], "inductor" if name == "nt_xent" else "aot_eager", device)


def test_compile_fullgraph_info_nce_with_negatives(backend, device):
    torch._dynamo.reset()
    neg = torch.randn(20, 16, device=device)
    _step(lambda a, b: fastssl.info_nce(a, b, 0.1, negatives=neg), "aot_eager", device)
