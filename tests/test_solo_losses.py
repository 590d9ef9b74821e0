"""solo-learn's MoCo v3, NNCLR, ReSSL, BYOL and SimSiam losses (fastssl.losses.solo)
against float64 formulas written out here from solo-learn's definitions (the full logit
matrices, torch's cross-entropy and softmax; solo-learn is not installed): values and input
gradients on both paths (portable torch and Triton, interpreted on CPU), every dtype, odd
shapes, which inputs get no gradient, no (rows x columns) tensor kept for the backward,
torch.compile, two gloo ranks against one process, and bad inputs.

Precision rule (the peer tests' rule, as tests/test_multipositive.py): the formula run
eagerly in the input dtype on the same rounded inputs is solo-learn's own arithmetic; each
result's error against float64 may be at most twice eager's, plus four float32 roundings and
one rounding to the input dtype, of max(||float64 result||, floor). (16-bit inputs: the
kernels' tile operands are the unit rows rounded to the input dtype, as solo-learn's are,
so a float32 eager run on 16-bit inputs would be a stricter bar than solo-learn itself.)
float64 inputs: 1e-12 relative."""
import pytest
import torch
import torch.nn.functional as tF

from fastssl import ShapeError, _reference
from fastssl.losses.solo import (byol_loss_func, mocov3_loss_func, nnclr_loss_func,
                                 ressl_loss_func, simsiam_loss_func)
import _gloo

EPS32 = torch.finfo(torch.float32).eps
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
KERNEL_DTYPES = DTYPES[1:]  # float64 takes the portable path on every backend (its own test)


# ----------------------------------------------------------------------------- references

def ref_mocov3(query, key, T):
    """2 T CE(normalize(query) normalize(key)^T / T, i -> i), the key a constant."""
    q, k = tF.normalize(query, dim=1), tF.normalize(key.detach(), dim=1)
    logits = q @ k.T / T
    return tF.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * (2 * T)


def ref_nnclr(nn, p, T):
    u, v = tF.normalize(nn, dim=1), tF.normalize(p, dim=1)
    return tF.cross_entropy(u @ v.T / T, torch.arange(u.shape[0], device=u.device))


def ref_ressl(q, k, queue, tq, tk):
    target = torch.softmax((k @ queue.T).detach() / tk, dim=1)
    return -(target * torch.log_softmax(q @ queue.T / tq, dim=1)).sum(1).mean()


def ref_cos_mean(p, z, simplified):
    """mean cosine of p and the constant z: per vector along the last dimension (each norm
    clamped at 1e-8), or both normalised (clamp 1e-12) and the product summed over dim 1."""
    z = z.detach()
    if simplified:
        dot = (p * z).sum(-1)
        return (dot / (p.norm(dim=-1).clamp_min(1e-8) * z.norm(dim=-1).clamp_min(1e-8))).mean()
    u = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    v = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return (u * v).sum(1).mean()


# ----------------------------------------------------------------------------- helpers

def randn(*shape, seed, spread=True, device="cpu"):
    """Fresh Gaussian float64 rows on ``device``, each scaled by a random factor in [1/4, 4)
    (``spread``) or to unit norm (``spread=False``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if spread:
        x = x * torch.exp2(4 * torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64) - 2)
    else:
        x = tF.normalize(x, dim=-1)
    return x.to(device)


def _outcome(fn, inputs, dtype, wrt):
    leaves = [t.detach().to(dtype).requires_grad_(i in wrt) for i, t in enumerate(inputs)]
    value = fn(*leaves)
    grads = torch.autograd.grad(value, [leaves[i] for i in wrt])
    return value, [value.detach().double()] + [g.double() for g in grads]


def check(fused, formula, inputs, dtype, wrt=(0,), floor=0.0):
    """``fused`` on ``inputs`` rounded to dtype against ``formula`` in float64 on the same
    rounded inputs (value, then the gradient of each input in ``wrt``): see the module's
    precision rule. ``floor`` (one per output, or one for all): the size of the terms a
    gradient sums where they cancel exactly (D = 1 unit rows), where float64's result is
    noise."""
    rounded = [t.detach().to(dtype).double() for t in inputs]
    value, got = _outcome(fused, rounded, dtype, wrt)
    assert value.dtype == dtype and value.shape == (), (value.dtype, value.shape)
    _, want = _outcome(formula, rounded, torch.float64, wrt)
    eager = None if dtype == torch.float64 else _outcome(formula, rounded, dtype, wrt)[1]
    floors = floor if isinstance(floor, (list, tuple)) else [floor] * len(want)
    for i, (g, w, fl) in enumerate(zip(got, want, floors)):
        assert torch.isfinite(g).all(), (i, dtype)
        scale = max(float(w.norm()), fl)
        err = float((g - w).norm())
        if eager is None:
            bound = 1e-12 * scale
        else:
            err_eager = float((eager[i] - w).norm())
            bound = 2 * err_eager + (4 * EPS32 + torch.finfo(dtype).eps) * scale
        assert err <= bound, (i, dtype, err, bound, scale)


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(_reference, "BLOCK", 17)


# ----------------------------------------------------------------------------- MoCo v3, NNCLR

SHAPES = [(1, 1), (1, 257), (2, 3), (17, 1), (33, 257), (257, 3)]


@pytest.mark.parametrize("n,D", SHAPES)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_mocov3_value_and_query_gradient(backend, device, n, D, dtype):
    q, k = (randn(n, D, seed=n * 10 + D + i, device=device) for i in range(2))
    # D = 1: unit rows are +-1 and the query's gradient is exactly 0 (terms of size 2T s)
    check(lambda a, b: mocov3_loss_func(a, b), lambda a, b: ref_mocov3(a, b, 0.2), (q, k),
          dtype, floor=[0.0, 2.0 if D == 1 else 0.0])


@pytest.mark.parametrize("n,D", [(1, 257), (2, 3), (17, 1), (33, 130)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_nnclr_value_and_gradients(backend, device, n, D, dtype):
    a, b = (randn(n, D, seed=n * 20 + D + i, device=device) for i in range(2))
    check(lambda x, y: nnclr_loss_func(x, y), lambda x, y: ref_nnclr(x, y, 0.1), (a, b),
          dtype, wrt=(0, 1), floor=[0.0] + [10.0 if D == 1 else 0.0] * 2)


FLOAT64_CASES = {
    "mocov3": (lambda a, b: mocov3_loss_func(a, b), lambda a, b: ref_mocov3(a, b, 0.2), (0,)),
    "nnclr": (lambda a, b: nnclr_loss_func(a, b), lambda a, b: ref_nnclr(a, b, 0.1), (0, 1)),
    "ressl": (lambda a, b, c: ressl_loss_func(a, b, c),
              lambda a, b, c: ref_ressl(a, b, c, 0.1, 0.04), (0, 2)),
}


@pytest.mark.parametrize("name", FLOAT64_CASES)
def test_float64_inputs_compute_in_float64(name, small_blocks):
    fused, formula, wrt = FLOAT64_CASES[name]
    for n, D in ((1, 1), (1, 257), (17, 1), (33, 130), (257, 3)):
        inputs = [randn(n, D, seed=n + D, spread=name != "ressl"),
                  randn(n, D, seed=n + D + 1, spread=name != "ressl")]
        if name == "ressl":
            inputs.append(randn(2 * n + 5, D, seed=n + D + 2, spread=False))
        check(fused, formula, inputs, torch.float64, wrt, floor=10.0 if D == 1 else 0.0)


def test_defaults_and_tensor_temperature(backend, device):
    q, k = randn(9, 6, seed=1, device=device), randn(9, 6, seed=2, device=device)
    torch.testing.assert_close(mocov3_loss_func(q, k), ref_mocov3(q, k, 0.2), rtol=1e-12, atol=0)
    torch.testing.assert_close(nnclr_loss_func(q, k), ref_nnclr(q, k, 0.1), rtol=1e-12, atol=0)
    for fn, ref in ((mocov3_loss_func, ref_mocov3), (nnclr_loss_func, ref_nnclr)):
        t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        got = torch.autograd.grad(fn(q, k, t), t)[0]
        t2 = t.detach().clone().requires_grad_()
        want = torch.autograd.grad(ref(q, k, t2), t2)[0]
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_mocov3_key_gets_no_gradient(backend, device):
    q = randn(12, 8, seed=3, device=device).float().requires_grad_()
    k = randn(12, 8, seed=4, device=device).float().requires_grad_()
    loss = mocov3_loss_func(q, k)
    dq, dk = torch.autograd.grad(loss, (q, k), allow_unused=True)
    assert dk is None and torch.count_nonzero(dq) > 0
    assert not mocov3_loss_func(q.detach(), k).requires_grad


def test_non_contiguous_and_deterministic(backend, device):
    base_q = randn(40, 18, seed=5, device=device).float().requires_grad_()
    base_k = randn(18, 40, seed=6, device=device).float().requires_grad_()

    def run(fn):
        loss = fn(base_q[::2, ::2], base_k.T[1::2, 3:12])
        return [loss.detach()] + [g for g in torch.autograd.grad(
            loss, (base_q, base_k), allow_unused=True) if g is not None]
    for fn, ref in ((mocov3_loss_func, ref_mocov3), (nnclr_loss_func, ref_nnclr)):
        first, second = run(fn), run(fn)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        want = ref(base_q.detach().double()[::2, ::2], base_k.detach().double().T[1::2, 3:12],
                   0.2 if fn is mocov3_loss_func else 0.1)
        assert abs(float(first[0]) - float(want)) <= 1e-5 * abs(float(want))


def test_no_logit_matrix_is_kept(monkeypatch):
    """The portable path scores column blocks; nothing of size rows x columns is saved for
    the backward (the Triton path keeps per-row statistics by construction)."""
    monkeypatch.setenv("FASTSSL_BACKEND", "torch")
    monkeypatch.setattr(_reference, "BLOCK", 32)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t,
                                                  lambda t: t):
        q, k = randn(300, 4, seed=7).float().requires_grad_(), randn(300, 4, seed=8).float()
        mocov3_loss_func(q, k).backward()
        nnclr_loss_func(q, k.requires_grad_()).backward()
        queue = randn(2000, 4, seed=9, spread=False).float()
        ressl_loss_func(q, k.detach(), queue).backward()
    assert sizes and max(sizes) <= 2000 * 4, max(sizes)


def test_compile_fullgraph():
    """One training step's losses under torch.compile(fullgraph=True): the custom ops in
    one graph, the same value and parameter gradients as eager."""
    torch._dynamo.reset()
    head = torch.nn.Linear(12, 16)
    x0, x1 = torch.randn(10, 12), torch.randn(10, 12)
    queue = tF.normalize(torch.randn(20, 16), dim=1)

    def step(a, b):
        za, zb = head(a), head(b)
        with torch.no_grad():
            key = head(b)
        return (mocov3_loss_func(za, key, 0.2) + nnclr_loss_func(za, zb, 0.1)
                + ressl_loss_func(za, key, queue) + byol_loss_func(za, zb)
                + simsiam_loss_func(za, zb, False))
    eager = step(x0, x1)
    want = torch.autograd.grad(eager, list(head.parameters()))
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x0, x1)
    grads = torch.autograd.grad(got, list(head.parameters()))
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- ReSSL

@pytest.mark.parametrize("n,K,D", [(1, 1, 1), (1, 9, 257), (5, 7, 1), (33, 130, 16),
                                   (130, 65, 3)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_ressl_value_and_gradients(backend, device, small_blocks, n, K, D, dtype):
    """Unit rows (solo-learn's model normalises q, k and the queue); gradients of q and of
    the queue (through the q side only)."""
    seed = n * 1000 + K + D
    q, k = (randn(n, D, seed=seed + i, spread=False, device=device) for i in range(2))
    queue = randn(K, D, seed=seed + 2, spread=False, device=device)
    # the queue's gradient is the student's softmax term minus the teacher's: each of size
    # ||q|| / (n T_q) per entry, the scale of its roundings where the two nearly cancel
    check(lambda a, b, c: ressl_loss_func(a, b, c), lambda a, b, c: ref_ressl(a, b, c, 0.1, 0.04),
          (q, k, queue), dtype, wrt=(0, 2), floor=[0.0, 0.0, 10.0 * (K / n) ** 0.5])


def test_ressl_raw_inputs_temperatures_and_k_gets_no_gradient(backend, device):
    q, k = (randn(6, 5, seed=11 + i, device=device) for i in range(2))
    queue = randn(40, 5, seed=13, device=device)
    check(lambda a, b, c: ressl_loss_func(a, b, c, 0.5, 0.2),
          lambda a, b, c: ref_ressl(a, b, c, 0.5, 0.2), (q, k, queue), torch.float32,
          wrt=(0, 2))
    kk = k.float().requires_grad_()
    loss = ressl_loss_func(q.float().requires_grad_(), kk, queue.float())
    assert torch.autograd.grad(loss, kk, allow_unused=True) == (None,)


def test_ressl_float32_queue_with_16bit_rows(backend, device):
    q, k = (randn(9, 8, seed=14 + i, spread=False, device=device) for i in range(2))
    queue = randn(50, 8, seed=16, spread=False, device=device).float()
    for dtype in (torch.bfloat16, torch.float16):
        qq = q.to(dtype).requires_grad_()
        loss = ressl_loss_func(qq, k.to(dtype), queue)
        assert loss.dtype == dtype
        # the queue is used in q's dtype
        want = ref_ressl(q.to(dtype).double(), k.to(dtype).double(),
                         queue.to(dtype).double(), 0.1, 0.04)
        assert abs(loss.item() - want.item()) <= 1e-2 * abs(want.item())


# ----------------------------------------------------------------------------- BYOL, SimSiam

# simplified=False sums over dimension 1: a 1-D input is a bad-input case below
@pytest.mark.parametrize("shape,simplified", [
    (s, f) for s in [(1, 1), (1, 257), (3, 257), (8, 5), (4, 3, 5), (6,)]
    for f in (True, False) if f or len(s) > 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_byol_and_simsiam(shape, simplified, dtype):
    seed = sum(shape) * 7 + simplified
    p, z = randn(*shape, seed=seed), randn(*shape, seed=seed + 1)
    fl = [0.0, 1.0 if shape[-1] == 1 else 0.0]  # D = 1: a zero gradient in exact arithmetic
    check(lambda a, b: byol_loss_func(a, b, simplified),
          lambda a, b: 2 - 2 * ref_cos_mean(a, b, simplified), (p, z), dtype, floor=fl)
    check(lambda a, b: simsiam_loss_func(a, b, simplified),
          lambda a, b: -ref_cos_mean(a, b, simplified), (p, z), dtype, floor=fl)


def test_byol_and_simsiam_defaults_and_stop_gradient():
    p = randn(5, 4, seed=21).requires_grad_()
    z = randn(5, 4, seed=22).requires_grad_()
    for fn, offset, factor in ((byol_loss_func, 2.0, -2.0), (simsiam_loss_func, 0.0, -1.0)):
        loss = fn(p, z)
        torch.testing.assert_close(loss, offset + factor * tF.cosine_similarity(p, z).mean(),
                                   rtol=1e-12, atol=1e-12)
        assert torch.autograd.grad(loss, (p, z), allow_unused=True)[1] is None
        tiny = torch.full((2, 3), 1e-10, dtype=torch.float64)  # the 1e-8 vs 1e-12 clamps
        other = randn(2, 3, seed=23)
        assert not torch.isclose(fn(tiny, other, True), fn(tiny, other, False))


# ----------------------------------------------------------------------------- bad inputs

A, B = torch.randn(4, 8), torch.randn(4, 8)
BAD = [
    (lambda: mocov3_loss_func(A, torch.randn(4, 7)), ShapeError, "shape"),
    (lambda: mocov3_loss_func(A, torch.randn(5, 8)), ShapeError, "shape"),
    (lambda: mocov3_loss_func(torch.randn(8), torch.randn(8)), ShapeError, "2-D"),
    (lambda: mocov3_loss_func(torch.randn(0, 8), torch.randn(0, 8)), ShapeError, "non-empty"),
    (lambda: mocov3_loss_func(A, B.double()), ValueError, "dtype"),
    (lambda: mocov3_loss_func(A.long(), B.long()), ValueError, "floating"),
    (lambda: mocov3_loss_func(A, B, 0.0), ValueError, "temperature"),
    (lambda: mocov3_loss_func(A, [[1.0]]), TypeError, "key"),
    (lambda: nnclr_loss_func(A, torch.randn(3, 8)), ShapeError, "nn has shape"),
    (lambda: nnclr_loss_func(A, B, float("nan")), ValueError, "temperature"),
    (lambda: nnclr_loss_func(A, B, "0.1"), TypeError, "temperature"),
    (lambda: ressl_loss_func(A, B, torch.randn(9, 7)), ShapeError, "queue"),
    (lambda: ressl_loss_func(A, B, torch.randn(0, 8)), ShapeError, "queue"),
    (lambda: ressl_loss_func(A, B, torch.randn(9)), ShapeError, "queue"),
    (lambda: ressl_loss_func(A, torch.randn(3, 8), torch.randn(9, 8)), ShapeError, "shape"),
    (lambda: ressl_loss_func(A, B, torch.arange(8).view(1, 8)), ValueError, "queue"),
    (lambda: ressl_loss_func(A, B, torch.randn(9, 8), 0.0), ValueError, "temperature_q"),
    (lambda: ressl_loss_func(A, B, torch.randn(9, 8), 0.1, -1.0), ValueError,
     "temperature_k"),
    (lambda: ressl_loss_func(A, B, torch.randn(9, 8, device="meta")), ValueError, "on meta"),
    (lambda: byol_loss_func(A, torch.randn(4, 7)), ShapeError, "shape"),
    (lambda: byol_loss_func(A, B.half()), ValueError, "dtype"),
    (lambda: byol_loss_func(A, B, "yes"), TypeError, "simplified"),
    (lambda: simsiam_loss_func(torch.randn(8), torch.randn(8), False), ShapeError,
     "dimension 1"),
    (lambda: simsiam_loss_func(torch.randn(0, 8), torch.randn(0, 8)), ShapeError,
     "non-empty"),
    (lambda: simsiam_loss_func(A, None), TypeError, "z"),
]


@pytest.mark.parametrize("call,error,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_shape_errors_are_what_solo_learn_raises():
    """solo-learn's einsum / cross-entropy raise RuntimeError on mismatched shapes."""
    with pytest.raises(RuntimeError):
        mocov3_loss_func(A, torch.randn(4, 7))
    with pytest.raises(RuntimeError):
        ressl_loss_func(A, B, torch.randn(9, 7))


# ----------------------------------------------------------------------------- 2 ranks

def _global_batch():
    g = torch.Generator().manual_seed(17)
    return tuple(torch.randn(10, 6, generator=g) for _ in range(4))


def _rank_worker(rank, world):
    q, k, nn, p = (t[5 * rank:5 * rank + 5].clone().requires_grad_() for t in
                   _global_batch())
    moco = mocov3_loss_func(q, k, 0.2)
    dq, dk = torch.autograd.grad(moco, (q, k), allow_unused=True)
    nnclr = nnclr_loss_func(nn, p, 0.1)
    dnn, dp = torch.autograd.grad(nnclr, (nn, p))
    try:  # rank 1's key is too narrow: every rank must raise, none must hang
        mocov3_loss_func(q, k[:, :5] if rank else k)
        error = None
    except Exception as e:
        error = (type(e).__name__, str(e))
    return {"moco": moco.detach(), "dq": dq, "dk_none": dk is None,
            "nnclr": nnclr.detach(), "dnn": dnn, "dp": dp, "error": error}


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    """Each rank's loss over its 5 rows against the 10 gathered keys (predictions): the mean
    of the two ranks' losses is the one-process loss on the 10 rows, and each rank's input
    gradient is world_size x the global gradient of its slice (fastssl.distributed's
    convention; NNCLR's gathered p sums the gradients of both ranks' losses)."""
    res = _gloo.run(_rank_worker, 2, timeout=120)
    q, k, nn, p = (t.double().requires_grad_() for t in _global_batch())
    moco = ref_mocov3(q, k, 0.2)
    nnclr = ref_nnclr(nn, p, 0.1)
    want = dict(zip(("dq", "dnn", "dp"), (*torch.autograd.grad(moco, q),
                                          *torch.autograd.grad(nnclr, (nn, p)))))
    for key, ref in (("moco", moco.item()), ("nnclr", nnclr.item())):
        got = (res[0][key].item() + res[1][key].item()) / 2
        assert abs(got - ref) <= 1e-5 * abs(ref), key
    for key, ref in want.items():
        got = torch.cat([r[key] for r in res]).double()
        assert float((got - 2 * ref).norm()) <= 1e-5 * float(ref.norm()), key
    for r in res:
        assert r["dk_none"]
        assert r["error"][0] == "ShapeError" and "rank 1" in r["error"][1], r["error"]
