"""InfoNCE family (NT-Xent, InfoNCE with extra negatives, CLIP) against float64 references.

The references below are the textbook formulas: they materialise the full logits matrix in
float64 and use torch's cross-entropy and autograd. The library is never its own reference.
"""
import math

import pytest
import torch
import torch.nn.functional as tF

import fastssl
from fastssl import functional as F

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(n, D) for n in (1, 2, 3, 257) for D in (1, 3, 130)]


# ----------------------------------------------------------------------------- references

def ref_nt_xent(z0, z1, temperature):
    z = tF.normalize(torch.cat([z0, z1]).double(), dim=1)
    n = z0.shape[0]
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    labels = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return tF.cross_entropy(logits, labels)


def ref_info_nce(q, k, temperature, negatives=None, symmetric=False):
    def one(a, b):
        a, b = tF.normalize(a.double(), dim=1), tF.normalize(b.double(), dim=1)
        logits = a @ b.T
        if negatives is not None:
            logits = torch.cat([logits, a @ tF.normalize(negatives.double(), dim=1).T], 1)
        return tF.cross_entropy(logits / temperature, torch.arange(a.shape[0], device=a.device))
    loss = one(q, k)
    return (loss + one(k, q)) / 2 if symmetric else loss


def ref_clip(img, txt, scale, bias=None):
    logits = scale * img.double() @ txt.double().T
    if bias is not None:
        logits = logits + bias
    labels = torch.arange(img.shape[0], device=img.device)
    return (tF.cross_entropy(logits, labels) + tF.cross_entropy(logits.T, labels)) / 2


def ref_bank(out0, out1, bank, temperature):
    a, b = tF.normalize(out0.double(), dim=1), tF.normalize(out1.double(), dim=1)
    logits = torch.cat([(a * b).sum(1, keepdim=True), a @ bank.double().T], 1) / temperature
    return tF.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long, device=a.device))


# ----------------------------------------------------------------------------- helpers

def embeddings(n, D, dtype, device, seed):
    """Rows of random direction and norm in [0.5, 2] (fresh per case)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=1, keepdim=True) * (0.5 + 1.5 * torch.rand(n, 1, generator=g, dtype=torch.float64))
    return x.to(device=device, dtype=dtype).requires_grad_()


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite output"
    diff, scale = (out - ref).norm().item(), ref.norm().item()
    # A gradient that is exactly zero in exact arithmetic (D = 1: the normalisation's
    # Jacobian vanishes) leaves rounding noise; measure it against a unit-scale floor.
    return diff / max(scale, 0.1)


def check(out, ref, dtype, what):
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


def leaf(x):
    return x.detach().double().requires_grad_()


def grads_of(loss, tensors):
    return torch.autograd.grad(loss, tensors)


# ----------------------------------------------------------------------------- values and gradients

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D", SHAPES)
def test_nt_xent(backend, device, dtype, n, D):
    z0 = embeddings(n, D, dtype, device, seed=n * 1000 + D)
    z1 = embeddings(n, D, dtype, device, seed=n * 1000 + D + 1)
    t = torch.tensor(0.3, device=device, requires_grad=True)
    loss = fastssl.nt_xent(z0, z1, t)
    assert loss.dtype == dtype and loss.shape == ()
    got = grads_of(loss, [z0, z1, t])
    r0, r1, rt = leaf(z0), leaf(z1), leaf(t)
    ref = ref_nt_xent(r0, r1, rt)
    want = grads_of(ref, [r0, r1, rt])
    check(loss, ref, dtype, "loss")
    for name, a, b in zip(["z0", "z1", "temperature"], got, want):
        check(a, b, dtype, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D,K", [(1, 3, 17), (3, 130, 1), (257, 3, 300), (2, 130, 17),
                                   (3, 1, 300), (257, 130, 0)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce(backend, device, dtype, n, D, K, symmetric):
    q = embeddings(n, D, dtype, device, seed=7 * n + D)
    k = embeddings(n, D, dtype, device, seed=7 * n + D + 1)
    neg = embeddings(K, D, dtype, device, seed=K).detach() if K else None
    loss = fastssl.info_nce(q, k, temperature=0.1, negatives=neg, symmetric=symmetric)
    got = grads_of(loss, [q, k])
    rq, rk = leaf(q), leaf(k)
    ref = ref_info_nce(rq, rk, 0.1, neg, symmetric)
    want = grads_of(ref, [rq, rk])
    check(loss, ref, dtype, "loss")
    check(got[0], want[0], dtype, "dquery")
    check(got[1], want[1], dtype, "dkey")


def test_info_nce_fp32_queue_with_half_embeddings(backend, device):
    q = embeddings(33, 20, torch.bfloat16, device, seed=1)
    k = embeddings(33, 20, torch.bfloat16, device, seed=2)
    neg = embeddings(70, 20, torch.float32, device, seed=3).detach()
    loss = fastssl.info_nce(q, k, 0.2, negatives=neg)
    got = grads_of(loss, [q, k])
    rq, rk = leaf(q), leaf(k)
    ref = ref_info_nce(rq, rk, 0.2, neg)
    want = grads_of(ref, [rq, rk])
    check(loss, ref, torch.bfloat16, "loss")
    check(got[0], want[0], torch.bfloat16, "dquery")
    check(got[1], want[1], torch.bfloat16, "dkey")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D", [(1, 3), (3, 130), (257, 3), (2, 1), (257, 130)])
def test_clip_loss(backend, device, dtype, n, D):
    img = embeddings(n, D, dtype, device, seed=3 * n + D)
    txt = embeddings(n, D, dtype, device, seed=3 * n + D + 1)
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    loss = fastssl.clip_loss(img, txt, scale)
    got = grads_of(loss, [img, txt, scale])
    ri, rt, rs = leaf(img), leaf(txt), leaf(scale)
    ref = ref_clip(ri, rt, rs)
    want = grads_of(ref, [ri, rt, rs])
    check(loss, ref, dtype, "loss")
    for name, a, b in zip(["image", "text", "logit_scale"], got, want):
        check(a, b, dtype, f"d{name}")


def test_clip_loss_bias_cancels_and_gets_zero_gradient(backend, device):
    img = embeddings(9, 16, torch.float32, device, seed=1)
    txt = embeddings(9, 16, torch.float32, device, seed=2)
    bias = torch.tensor(-3.7, device=device, requires_grad=True)
    module = fastssl.ClipLoss()
    out = module(img, txt, 10.0, bias, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    ref = ref_clip(img, txt, 10.0, bias.double())
    check(out["contrastive_loss"], ref, torch.float32, "loss")
    (db,) = torch.autograd.grad(out["contrastive_loss"], [bias])
    assert db.item() == 0.0


# ----------------------------------------------------------------------------- modules

def test_ntxent_module_matches_functional(backend, device):
    z0 = embeddings(12, 8, torch.float32, device, seed=5)
    z1 = embeddings(12, 8, torch.float32, device, seed=6)
    loss = fastssl.NTXentLoss(temperature=0.2)(z0, z1)
    check(loss, ref_nt_xent(z0, z1, 0.2), torch.float32, "loss")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 17, 300])
def test_ntxent_memory_bank(backend, device, dtype, K):
    torch.manual_seed(K)
    n, D = 5, 12
    module = fastssl.NTXentLoss(temperature=0.15, memory_bank_size=(K, D)).to(device)
    assert module.bank.shape == (K, D)
    for step in range(3):
        z0 = embeddings(n, D, dtype, device, seed=100 * K + 2 * step)
        z1 = embeddings(n, D, dtype, device, seed=100 * K + 2 * step + 1)
        bank = module.bank.clone()
        ptr = int(module.bank_ptr)
        loss = module(z0, z1)
        got = grads_of(loss, [z0, z1])
        r0, r1 = leaf(z0), leaf(z1)
        ref = ref_bank(r0, r1, bank, 0.15)
        want = grads_of(ref, [r0, r1])
        check(loss, ref, dtype, "loss")
        check(got[0], want[0], dtype, "dout0")
        check(got[1], want[1], dtype, "dout1")
        # FIFO update with lightly's rule: fill the tail, drop the rest, wrap to 0.
        # lightly stores normalize(out1) as computed in the input dtype, in a float32 bank.
        new = tF.normalize(z1.detach().float(), dim=1).to(dtype).float()
        atol = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        if ptr + n >= K:
            torch.testing.assert_close(module.bank[ptr:], new[:K - ptr], atol=atol, rtol=0)
            torch.testing.assert_close(module.bank[:ptr], bank[:ptr], atol=0, rtol=0)
            assert int(module.bank_ptr) == 0
        else:
            torch.testing.assert_close(module.bank[ptr:ptr + n], new, atol=atol, rtol=0)
            assert int(module.bank_ptr) == ptr + n


def test_memory_bank_infers_dim_and_skips_update_without_grad(device):
    module = fastssl.NTXentLoss(memory_bank_size=8)
    z0, z1 = torch.randn(3, 6, device=device), torch.randn(3, 6, device=device)
    module(z0, z1)
    assert module.bank.shape == (8, 6) and int(module.bank_ptr) == 0
    torch.testing.assert_close(module.bank.norm(dim=1), torch.ones(8, device=device))


def test_infonce_module(backend, device):
    q = embeddings(6, 5, torch.float32, device, seed=1)
    k = embeddings(6, 5, torch.float32, device, seed=2)
    neg = torch.randn(4, 5, device=device)
    loss = fastssl.InfoNCELoss(temperature=0.5, symmetric=True)(q, k, neg)
    check(loss, ref_info_nce(q, k, 0.5, neg, True), torch.float32, "loss")


# ----------------------------------------------------------------------------- semantics

def test_non_contiguous_inputs(backend, device):
    base0 = embeddings(40, 18, torch.float32, device, seed=1)
    base1 = embeddings(18, 40, torch.float32, device, seed=2)
    z0 = base0[::2, ::2]        # strided rows and columns
    z1 = base1.T[1::2, 3:12]    # a transposed view
    assert not z0.is_contiguous() and not z1.is_contiguous()
    loss = fastssl.nt_xent(z0, z1, 0.5)
    got = grads_of(loss, [base0, base1])
    r0, r1 = leaf(base0), leaf(base1)
    ref = ref_nt_xent(r0[::2, ::2], r1.T[1::2, 3:12], 0.5)
    want = grads_of(ref, [r0, r1])
    check(loss, ref, torch.float32, "loss")
    check(got[0], want[0], torch.float32, "dbase0")
    check(got[1], want[1], torch.float32, "dbase1")


def test_negative_temperature(backend, device):
    z0 = embeddings(7, 9, torch.float32, device, seed=3)
    z1 = embeddings(7, 9, torch.float32, device, seed=4)
    loss = fastssl.nt_xent(z0, z1, -0.4)
    check(loss, ref_nt_xent(z0, z1, -0.4), torch.float32, "loss")


def test_deterministic(backend, device):
    z0 = embeddings(150, 70, torch.bfloat16, device, seed=3)
    z1 = embeddings(150, 70, torch.bfloat16, device, seed=4)
    t = torch.tensor(0.1, device=device, requires_grad=True)
    runs = []
    for _ in range(2):
        loss = fastssl.nt_xent(z0, z1, t)
        runs.append([loss.detach()] + list(grads_of(loss, [z0, z1, t])))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_zero_vectors_do_not_make_nan(backend, device, dtype):
    z0 = embeddings(4, 8, dtype, device, seed=1).detach()
    z0[1] = 0
    z0.requires_grad_()
    z1 = embeddings(4, 8, dtype, device, seed=2)
    loss = fastssl.nt_xent(z0, z1, 0.5)
    d0, d1 = grads_of(loss, [z0, z1])
    assert torch.isfinite(loss) and torch.isfinite(d0).all() and torch.isfinite(d1).all()
    assert torch.count_nonzero(d0[1]) == 0  # documented: a zero row gets no gradient
    # The zero row scores 0 against everything; the others are unaffected by its gradient.
    r0, r1 = leaf(z0), leaf(z1)
    ref = ref_nt_xent(r0, r1, 0.5)
    check(loss, ref, dtype, "loss")
    want = grads_of(ref, [r0, r1])
    keep = torch.tensor([0, 2, 3])
    check(d0[keep], want[0][keep], dtype, "dz0 (non-zero rows)")
    check(d1, want[1], dtype, "dz1")


def test_nan_input_gives_nan_loss(backend, device):
    z0 = torch.randn(5, 4, device=device)
    z0[2, 1] = float("nan")
    z1 = torch.randn(5, 4, device=device)
    assert torch.isnan(fastssl.nt_xent(z0, z1, 0.5))
    assert torch.isnan(fastssl.clip_loss(z0, z1, 10.0))


def test_single_pair_loss_is_exactly_zero(backend, device):
    z0 = embeddings(1, 5, torch.float32, device, seed=1)
    z1 = embeddings(1, 5, torch.float32, device, seed=2)
    loss = fastssl.nt_xent(z0, z1, 0.5)
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads_of(loss, [z0, z1]))


def test_portable_path_is_chunked(monkeypatch):
    """The portable path never builds an n x m block wider than its column block."""
    from fastssl import _reference
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    monkeypatch.setattr(_reference, "BLOCK", 32)
    widths = []
    real_blocks = _reference._blocks

    def spy(*args):
        for c0, x, is_neg in real_blocks(*args):
            widths.append(x.shape[1])
            yield c0, x, is_neg
    monkeypatch.setattr(_reference, "_blocks", spy)
    z0 = torch.randn(100, 8, requires_grad=True)
    z1 = torch.randn(100, 8, requires_grad=True)
    loss = fastssl.nt_xent(z0, z1, 0.5)
    loss.backward()
    assert max(widths) == 32 and len(widths) >= 2 * math.ceil(200 / 32)
    check(loss, ref_nt_xent(z0, z1, 0.5), torch.float32, "loss")


# ----------------------------------------------------------------------------- bad input

def test_bad_inputs():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match="shape"):
        fastssl.nt_xent(a, torch.randn(5, 8))
    with pytest.raises(ValueError, match="shape"):
        fastssl.clip_loss(a, torch.randn(4, 7), 10.0)
    with pytest.raises(ValueError, match="dtype"):
        fastssl.nt_xent(a, a.double())
    with pytest.raises(ValueError, match="floating"):
        fastssl.nt_xent(a.long(), a.long())
    with pytest.raises(ValueError, match="2-D"):
        fastssl.nt_xent(torch.randn(4, 8, 2), torch.randn(4, 8, 2))
    with pytest.raises(ValueError, match="2-D"):
        fastssl.info_nce(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="non-empty"):
        fastssl.nt_xent(torch.randn(0, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="non-zero"):
        fastssl.nt_xent(a, a, temperature=0.0)
    with pytest.raises(ValueError, match="1e-8"):
        fastssl.NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="non-zero"):
        fastssl.InfoNCELoss(temperature=0)
    with pytest.raises(ValueError, match="negatives"):
        fastssl.info_nce(a, a, negatives=torch.randn(3, 7))
    with pytest.raises(ValueError, match="detach"):
        fastssl.info_nce(a, a, negatives=torch.randn(3, 8, requires_grad=True))
    with pytest.raises(ValueError, match="scalar"):
        fastssl.clip_loss(a, a, torch.ones(2))
    with pytest.raises(TypeError, match="Tensor"):
        fastssl.nt_xent([[1.0]], [[1.0]])
    with pytest.raises(ValueError, match="memory_bank_size"):
        fastssl.NTXentLoss(memory_bank_size=-1)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            fastssl.nt_xent(a, a.cuda())


def test_bad_backend(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "magic")
    with pytest.raises(ValueError, match="FASTSSL_BACKEND"):
        fastssl.nt_xent(torch.randn(2, 3), torch.randn(2, 3))


def test_float32_tile_products_round_as_torch_matmuls_do(monkeypatch):
    """float32 operands take three-pass TF32 products (close to float32's) unless PyTorch
    allows TF32 for its own float32 matmuls; FASTSSL_FP32_PRECISION overrides, and a value it
    does not know is an error. 16-bit operands ignore the setting."""
    from fastssl.kernels.infonce import _precision
    monkeypatch.delenv("FASTSSL_FP32_PRECISION", raising=False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert _precision(torch.float32) == "tf32x3"
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert _precision(torch.float32) == "tf32"
    for chosen in ("ieee", "tf32", "tf32x3"):
        monkeypatch.setenv("FASTSSL_FP32_PRECISION", chosen)
        assert _precision(torch.float32) == chosen
        assert _precision(torch.bfloat16) == "tf32"
    monkeypatch.setenv("FASTSSL_FP32_PRECISION", "fp16")
    with pytest.raises(ValueError, match="FASTSSL_FP32_PRECISION"):
        _precision(torch.float32)
