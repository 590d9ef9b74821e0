"""CUDA-only checks (skipped without a GPU): compiled kernels at sizes beyond the
interpreter's reach against float64 references, and a 1-process NCCL group."""
import datetime
import socket

import pytest
import torch
import torch.nn.functional as tF

import fastssl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def ref_nt_xent_rows(z0, z1, t, block=2048):
    """float64 NT-Xent computed in row blocks (memory O(block x 2N))."""
    z = tF.normalize(torch.cat([z0, z1]).double(), dim=1)
    n2 = z.shape[0]
    total = 0.0
    for r0 in range(0, n2, block):
        rows = torch.arange(r0, min(r0 + block, n2), device=z.device)
        logits = z[rows] @ z.T / t
        logits[torch.arange(len(rows)), rows] = float("-inf")
        total = total + tF.cross_entropy(logits, (rows + n2 // 2) % n2, reduction="sum")
    return total / n2


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-3)])
@pytest.mark.parametrize("two_n,D", [(8192, 256), (4098, 130), (16384, 128)])
def test_large_nt_xent_against_float64(monkeypatch, dtype, tol, two_n, D):
    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    g = torch.Generator(device="cuda").manual_seed(two_n + D)
    z0 = torch.randn(two_n // 2, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    z1 = torch.randn(two_n // 2, D, device="cuda", dtype=dtype, generator=g, requires_grad=True)
    loss = fastssl.nt_xent(z0, z1, 0.1)
    d0, d1 = torch.autograd.grad(loss, [z0, z1])
    r0, r1 = z0.detach().double().requires_grad_(), z1.detach().double().requires_grad_()
    ref = ref_nt_xent_rows(r0, r1, 0.1)
    w0, w1 = torch.autograd.grad(ref, [r0, r1])
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    for got, want in ((d0, w0), (d1, w1)):
        assert ((got.double() - want).norm() / want.norm()).item() <= tol


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
def test_large_sigreg_against_float64(monkeypatch, dtype, tol):
    """SIGReg at N = 4096, M = 1024, 17 knots (LeJEPA's defaults) through the compiled
    sketch kernels against the float64 formula with the same directions."""
    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    proj = torch.randn(4096, 256, device="cuda", generator=g).to(dtype).requires_grad_()
    a = torch.randn(256, 1024, device="cuda", generator=g, dtype=torch.float64)
    a = a / a.norm(dim=0)
    loss_fn = fastssl.SIGReg()
    loss_fn._generate_unit_vectors = lambda device, dtype, num_features: a
    loss = loss_fn(proj)
    grad, = torch.autograd.grad(loss, proj)
    p = proj.detach().double().requires_grad_()
    t = torch.linspace(0, 3.0, 17, device="cuda", dtype=torch.float64)
    w = torch.full((17,), 2 * 3.0 / 16, device="cuda", dtype=torch.float64)
    w[[0, -1]] = 3.0 / 16
    x = (p @ a).unsqueeze(-1) * t
    err = (x.cos().mean(0) - torch.exp(-t ** 2 / 2)) ** 2 + x.sin().mean(0) ** 2
    ref = ((err * (w * torch.exp(-t ** 2 / 2))).sum(-1) * 4096).mean()
    want, = torch.autograd.grad(ref, p)
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert float((grad.double() - want).norm() / want.norm()) <= tol


def ref_supcon(feats, labels, t=0.1, base_t=0.07):
    """SupCon (mean of log over the positives) over the full matrix, in feats' dtype."""
    z = torch.cat(feats.unbind(1))
    keys = labels.repeat(feats.shape[1])
    logits = z @ z.T / t
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(eye, float("-inf")), 1, keepdim=True)
    pos = (keys[:, None] == keys[None, :]) & ~eye
    return -(t / base_t) * ((log_prob * pos).sum(1) / pos.sum(1)).mean()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
def test_large_supcon_against_float64(monkeypatch, dtype, tol):
    """SupCon at 2 x 4,096 rows, D = 128, 100 classes through the compiled keyed InfoNCE
    kernel against the float64 formula over the full (8,192 x 8,192) matrix: within tol,
    and the value and gradient at most twice as far from float64 as the same formula in
    dtype (eager), plus four float32 roundings."""
    monkeypatch.setenv("FASTSSL_BACKEND", "triton")
    g = torch.Generator(device="cuda").manual_seed(1)
    feats = tF.normalize(torch.randn(4096, 2, 128, device="cuda", generator=g), dim=-1)
    feats = feats.to(dtype).requires_grad_()
    labels = torch.randint(0, 100, (4096,), device="cuda", generator=g)
    loss = fastssl.SupConLoss(temperature=0.1)(feats, labels)
    grad, = torch.autograd.grad(loss, feats)
    f = feats.detach().double().requires_grad_()
    ref = ref_supcon(f, labels)
    want, = torch.autograd.grad(ref, f)
    e = feats.detach().clone().requires_grad_()
    eager = ref_supcon(e, labels)
    eager_grad, = torch.autograd.grad(eager, e)
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert float((grad.double() - want).norm() / want.norm()) <= tol
    u = 4 * 2.0 ** -24
    assert abs(loss.item() - ref.item()) <= 2 * abs(eager.item() - ref.item()) + u * abs(ref.item())
    assert float((grad.double() - want).norm()) <= \
        2 * float((eager_grad.double() - want).norm()) + u * float(want.norm())


def test_triton_matches_portable_path(monkeypatch):
    img = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    txt = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv("FASTSSL_BACKEND", backend)
        loss = fastssl.siglip_loss(tF.normalize(img, dim=1), tF.normalize(txt, dim=1), 10.0, -10.0)
        out[backend] = [loss.float(), *[g.float() for g in torch.autograd.grad(loss, [img, txt])]]
    for a, b in zip(out["triton"], out["torch"]):
        assert ((a - b).norm() / b.norm()).item() <= 1e-2


def test_nccl_single_process_gather():
    if not torch.distributed.is_nccl_available():
        pytest.skip("NCCL is not available in this torch build")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                         world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        x = torch.randn(5, 8, device="cuda", requires_grad=True)
        y, offsets = fastssl.distributed.gather(x)
        assert offsets == [0] and torch.equal(y, x)
        (y * 2).sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 2.0))
        loss = fastssl.ClipLoss(local_loss=True, gather_with_grad=True)(x, x.flip(0), 5.0)
        assert torch.isfinite(loss)
    finally:
        torch.distributed.destroy_process_group()
