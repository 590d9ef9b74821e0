"""iBOT++'s patch loss and CAPI's loss (``fastssl.losses.tokens``) against float64
references written from the formulas (every softmax, Sinkhorn matrix and per-image mean
materialised, image by image and position by position), on the same rounded inputs; the
column chunk forced small (``prototype.CHUNK``) so that K = 257 crosses several chunks.

Tolerance (``tol``): 16-bit inputs compute in float32 and the results are rounded to the
input dtype: 2 * eps of that dtype. float32: the teacher's logits are divided by sharp
temperatures (0.04, 0.06), so a rounding of a scaled logit of size ~100 moves a
probability by ~1e-5 relative: 2e-5 (as ``test_prototype.py``). float64: 1e-11.
"""
import pytest
import torch

from fastssl import prototype
from fastssl._checks import ShapeError
from fastssl.losses.tokens import CAPILoss, IBOTPlusPlusPatchLoss, positionwise_sinkhorn_knopp
import _gloo

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(prototype, "CHUNK", 16)


def tol(dtype):
    if dtype == torch.float64:
        return 1e-11
    return 2 * torch.finfo(dtype).eps if dtype in HALF else 2e-5


def randn(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=torch.float64)


def rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(2.2e-308))


def check(ours_fn, ref_fn, inputs, dtype, what, wrt=(1,)):
    """Loss and the gradients of the inputs numbered ``wrt`` of ``ours_fn`` on ``inputs``
    rounded to ``dtype``, against ``ref_fn`` in float64 on the same rounded values."""
    xs = [x.detach().to(dtype).requires_grad_(i in wrt) for i, x in enumerate(inputs)]
    loss = ours_fn(*xs)
    assert loss.dtype == dtype and loss.shape == (), (what, loss.dtype, loss.shape)
    grads = torch.autograd.grad(loss, [xs[i] for i in wrt])
    xr = [x.detach().double().requires_grad_(i in wrt) for i, x in enumerate(xs)]
    ref = ref_fn(*xr)
    ref_grads = torch.autograd.grad(ref, [xr[i] for i in wrt])
    for name, a, r in [("loss", loss, ref)] + [(f"grad[{i}]", g, gr) for i, g, gr
                                              in zip(wrt, grads, ref_grads)]:
        assert torch.isfinite(a).all(), f"{what} {name}: non-finite"
        assert a.dtype == dtype
        e = rel(a, r)
        assert e <= tol(dtype), f"{what} {name}: {e:.3g} from float64 (tol {tol(dtype):.3g})"
    return loss, grads


# ----------------------------------------------------------------------------- references

def ref_ibotpp(t, s, mask, c, tau_t, tau_s, vlw):
    """t, s (B, N, K); mask (B, N) or None. Per image: the mean cross-entropy over its
    masked tokens plus vlw times the mean over its visible ones (an empty set gives 0);
    without a mask the mean over all its tokens; then the mean over images."""
    B, N, K = t.shape
    total = 0.0
    for b in range(B):
        p = torch.softmax((t[b] - c) / tau_t, dim=1)
        ce = -(p * torch.log_softmax(s[b] / tau_s, dim=1)).sum(1)  # (N,)
        if mask is None:
            total = total + ce.sum() / N
            continue
        m = mask[b].double()
        n_masked, n_visible = float(m.sum()), float((1 - m).sum())
        total = total + (m * ce).sum() / max(n_masked, 1.0) \
            + vlw * ((1 - m) * ce).sum() / max(n_visible, 1.0)
    return total / B


def ref_sinkhorn(logits, iterations, eps=1e-8):
    """Per position n: Q = exp(l - column max over the batch), then ``iterations`` times the
    columns (prototypes over the batch) and rows (tokens over K) to 1, each sum + eps."""
    out = torch.empty_like(logits)
    for n in range(logits.shape[1]):
        l = logits[:, n]  # noqa: E741  (B, K)
        Q = torch.exp(l - l.max(0).values)
        for _ in range(iterations):
            Q = Q / (Q.sum(0, keepdim=True) + eps)
            Q = Q / (Q.sum(1, keepdim=True) + eps)
        out[:, n] = Q
    return out


def ref_capi(t, s, index, tau_t, tau_s, iterations):
    Q = ref_sinkhorn(t.detach() / tau_t, iterations)
    if index is not None:
        Q = torch.stack([Q[b, index[b]] for b in range(t.shape[0])])
    return -(Q * torch.log_softmax(s / tau_s, dim=-1)).sum(-1).mean()


def token_mask(B, N, seed, kind="random"):
    g = torch.Generator().manual_seed(seed)
    if kind == "all":
        return torch.ones(B, N, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(B, N, dtype=torch.bool)
    mask = torch.rand(B, N, generator=g) < 0.5
    mask[0, 0] = True
    if B > 2:
        mask[-1] = False  # an image with no masked token
        mask[-2] = True   # and one with no visible token
    return mask


# ----------------------------------------------------------------------------- iBOT++

IBOT_CASES = [  # B, N, K, mask kind, visible_loss_weight
    (3, 5, 7, "random", 1.0), (4, 3, 257, "random", 0.5), (2, 6, 9, "random", 0.0),
    (1, 1, 1, None, 1.0), (1, 1, 5, "all", 1.0), (2, 4, 1, "random", 2.0),
    (3, 4, 33, "none", 0.7), (2, 3, 6, "all", 0.3), (5, 2, 130, None, 1.0)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,N,K,kind,vlw", IBOT_CASES)
def test_ibotpp_matches_the_formula(B, N, K, kind, vlw, dtype):
    t = randn(B, N, K, seed=B * N + K, scale=2)
    s = randn(B, N, K, seed=B * N + K + 1000, scale=2)  # independent of t
    mask = None if kind is None else token_mask(B, N, K, kind)
    crit = IBOTPlusPlusPatchLoss(output_dim=K, teacher_temp=0.05, student_temp=0.2)
    crit.center.center.copy_(0.3 * randn(1, K, seed=5))
    c = crit.center.value.double().clone()
    check(lambda x, y: crit(x, y, mask, visible_loss_weight=vlw),
          lambda x, y: ref_ibotpp(x, y, mask, c, 0.05, 0.2, vlw), [t, s], dtype,
          f"IBOTPlusPlusPatchLoss {B, N, K, kind, vlw}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ibotpp_rank2_inputs_and_image_masks(dtype):
    """(B * N, K) inputs with a (B, H, W) mask equal the (B, N, K) ones; the forward's
    teacher_temp and lightly's defaults (0.04, 0.1)."""
    B, H, W, K = 3, 2, 3, 11
    t, s = randn(B, H * W, K, seed=1), randn(B, H * W, K, seed=2)
    mask = token_mask(B, H * W, 3).reshape(B, H, W)
    crit = IBOTPlusPlusPatchLoss(output_dim=K)
    flat = lambda x: x.flatten(0, 1)  # noqa: E731
    check(lambda x, y: crit(flat(x), flat(y), mask, teacher_temp=0.07),
          lambda x, y: ref_ibotpp(x, y, mask.flatten(1), 0.0, 0.07, 0.1, 1.0), [t, s], dtype,
          "IBOTPlusPlusPatchLoss rank 2")
    crit.center.center.zero_()
    check(lambda x, y: crit(x, y, mask), lambda x, y: ref_ibotpp(x, y, mask.flatten(1), 0.0,
                                                                 0.04, 0.1, 1.0),
          [t, s], dtype, "IBOTPlusPlusPatchLoss rank 3, (B, H, W) mask")


def test_ibotpp_numeric_mask_weights_tokens():
    """A float mask m acts as weights: m / sum m on the masked side, (1 - m) / sum (1 - m) on
    the visible one (the formula of the docstring)."""
    B, N, K = 2, 5, 6
    t, s = randn(B, N, K, seed=3), randn(B, N, K, seed=4)
    m = torch.rand(B, N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    crit = IBOTPlusPlusPatchLoss(output_dim=K)
    check(lambda x, y: crit(x, y, m, visible_loss_weight=0.4),
          lambda x, y: ref_ibotpp(x, y, m, 0.0, 0.04, 0.1, 0.4), [t, s], torch.float64,
          "float mask")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ibotpp_centre_over_steps(dtype):
    """Three steps: the centre follows 0.9 c + 0.1 mean of all B * N teacher rows, and each
    step's loss uses the centre before that step's update. A float32 centre fed float64
    logits becomes float64 (lightly's promotion); 16-bit logits leave it float32."""
    B, N, K = 2, 3, 8
    crit = IBOTPlusPlusPatchLoss(output_dim=K, center_momentum=0.9)
    c = torch.zeros(1, K, dtype=torch.float64)
    for step in range(3):
        t, s = randn(B, N, K, seed=step), randn(B, N, K, seed=step + 10)
        mask = token_mask(B, N, step)
        c0 = c.clone()
        check(lambda x, y: crit(x, y, mask), lambda x, y: ref_ibotpp(x, y, mask, c0, 0.04,
                                                                     0.1, 1.0),
              [t, s], dtype, f"step {step}")
        c = 0.9 * c + 0.1 * t.to(dtype).double().flatten(0, 1).mean(0, keepdim=True)
        want = torch.float64 if dtype == torch.float64 else torch.float32
        assert crit.center.value.dtype == want and crit.center.value.shape == (1, K)
        assert rel(crit.center.value, c) <= (1e-15 if want == torch.float64 else 1e-6)


def test_ibotpp_gradient_only_where_weighted_and_deterministic():
    B, N, K = 2, 6, 5
    t, s = randn(B, N, K, seed=1).float(), randn(B, N, K, seed=2).float().requires_grad_()
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[:, :3] = True
    crit = IBOTPlusPlusPatchLoss(output_dim=K)
    (g,) = torch.autograd.grad(crit(t, s, mask, visible_loss_weight=0.0), s)
    assert torch.equal(g[:, 3:], torch.zeros_like(g[:, 3:])) and g[:, :3].abs().sum() > 0
    a = IBOTPlusPlusPatchLoss(output_dim=K)(t, s, mask)
    b = IBOTPlusPlusPatchLoss(output_dim=K)(t, s, mask)
    assert torch.equal(a, b)
    ts = t.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous
    torch.testing.assert_close(IBOTPlusPlusPatchLoss(output_dim=K)(ts, s, mask), a,
                               rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------- CAPI

CAPI_CASES = [  # B, N_t, N_p (None: aligned), K, iterations
    (4, 5, None, 32, 3), (3, 6, 3, 257, 3), (1, 1, None, 1, 3), (1, 4, 2, 7, 3),
    (5, 1, None, 1, 1), (2, 7, None, 130, 0), (6, 3, 5, 9, 5)]


def capi_index(B, Nt, Np, seed):
    if Np is None:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, Nt, (B, Np), generator=g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Nt,Np,K,iters", CAPI_CASES)
def test_capi_matches_the_formula(B, Nt, Np, K, iters, dtype):
    index = capi_index(B, Nt, Np, K)
    t = randn(B, Nt, K, seed=B + Nt + K)
    s = randn(B, Nt if Np is None else Np, K, seed=K + 7)
    crit = CAPILoss(sinkhorn_iterations=iters)
    check(lambda x, y: crit(x, y, index), lambda x, y: ref_capi(x, y, index, 0.06, 0.12,
                                                                iters),
          [t, s], dtype, f"CAPILoss {B, Nt, Np, K, iters}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_capi_temperatures_and_beyond_the_exp_range(dtype):
    """Teacher logits whose scaled values reach +-1000 (exp overflows float32 past 88 and
    float64 past 709): the batch-max shift keeps every exponential finite."""
    t, s = randn(6, 4, 20, seed=1, scale=30.0), randn(6, 4, 20, seed=2)
    crit = CAPILoss(teacher_temperature=0.1, student_temperature=0.3, sinkhorn_iterations=4)
    check(crit, lambda x, y: ref_capi(x, y, None, 0.1, 0.3, 4), [t, s], dtype, "large logits")


def test_positionwise_sinkhorn_knopp():
    """Each token's assignment sums to 1 (up to epsilon), positions are independent, the
    dtype is kept, no gradient flows; lightly's float32 epsilon default."""
    logits = randn(6, 5, 10, seed=3, scale=3.0)
    for dtype in DTYPES:
        x = logits.to(dtype, copy=True).requires_grad_()
        q = positionwise_sinkhorn_knopp(x, iterations=3)
        assert q.dtype == dtype and not q.requires_grad and q.shape == x.shape
        e = rel(q, ref_sinkhorn(x.detach().double(), 3))
        assert e <= tol(dtype), (dtype, e)
    q = positionwise_sinkhorn_knopp(logits)
    torch.testing.assert_close(q.sum(-1), torch.ones(6, 5, dtype=torch.float64), rtol=0,
                               atol=1e-7)
    torch.testing.assert_close(positionwise_sinkhorn_knopp(logits[:, 1:2]), q[:, 1:2],
                               rtol=1e-15, atol=0)
    q0 = positionwise_sinkhorn_knopp(logits, iterations=0, epsilon=0.0)
    torch.testing.assert_close(q0, torch.exp(logits - logits.amax(0, keepdim=True)))


def test_capi_gradient_reaches_the_student_only():
    t = randn(3, 4, 8, seed=1).float().requires_grad_()
    s = randn(3, 4, 8, seed=2).float().requires_grad_()
    CAPILoss()(t, s).backward()
    assert t.grad is None and s.grad is not None and torch.isfinite(s.grad).all()
    # the teacher's logits as the student's (CAPI trains its clustering head so): the
    # gradient is the student path's alone
    x = t.detach().clone().requires_grad_()
    (g,) = torch.autograd.grad(CAPILoss()(x, x), x)
    (g_ref,) = torch.autograd.grad(CAPILoss()(x.detach(), x), x)
    assert torch.equal(g, g_ref)
    assert torch.equal(CAPILoss()(t, s), CAPILoss()(t, s))  # deterministic


def test_capi_gather_distributed_needs_torch_distributed(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch.distributed is not available"):
        CAPILoss(gather_distributed=True)
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    t, s = randn(3, 2, 5, seed=1), randn(3, 2, 5, seed=2)
    assert torch.equal(CAPILoss(gather_distributed=True)(t, s), CAPILoss()(t, s))


# ----------------------------------------------------------------------------- errors

def r32(*shape):
    return torch.randn(*shape)


def ibot(K=4):
    return IBOTPlusPlusPatchLoss(output_dim=K)


ERRORS = [
    (lambda: ibot()(r32(2, 5, 4), r32(2, 6, 4)), ValueError, "same shape"),
    (lambda: ibot()(r32(2, 5, 3, 4), r32(2, 5, 3, 4)), ValueError, "rank 2 or 3"),
    (lambda: ibot()(r32(4), r32(4)), ValueError, "rank 2 or 3"),
    (lambda: ibot()(r32(10, 4), r32(10, 4)), ValueError, "mask is required"),
    (lambda: ibot()(r32(7, 4), r32(7, 4), torch.zeros(3, 2, dtype=torch.bool)), ValueError,
     "not divisible"),
    (lambda: ibot()(r32(6, 4), r32(6, 4), torch.zeros(3, 3, dtype=torch.bool)), RuntimeError,
     "one entry per token"),
    (lambda: ibot()(r32(2, 3, 4), r32(2, 3, 4), torch.zeros(2, 4, dtype=torch.bool)),
     ShapeError, "one entry per token"),
    (lambda: ibot(5)(r32(2, 3, 4), r32(2, 3, 4)), ShapeError, "output_dim=5"),
    (lambda: ibot()(r32(2, 0, 4), r32(2, 0, 4)), ShapeError, "no token"),
    (lambda: ibot()(r32(0, 4), r32(0, 4), torch.zeros(0, 3, dtype=torch.bool)), ShapeError,
     "not divisible"),
    (lambda: ibot()(r32(2, 3, 4), r32(2, 3, 4), visible_loss_weight="x"), TypeError,
     "visible_loss_weight"),
    (lambda: ibot()(r32(2, 3, 4), r32(2, 3, 4), teacher_temp=0.0), ValueError,
     "teacher_temp"),
    (lambda: ibot()(torch.ones(2, 3, 4, dtype=torch.long), r32(2, 3, 4)), ValueError,
     "floating"),
    (lambda: IBOTPlusPlusPatchLoss(center_mode="max"), ValueError, "Unknown mode"),
    (lambda: CAPILoss(teacher_temperature=0.0), ValueError, "teacher_temperature"),
    (lambda: CAPILoss(student_temperature=-1.0), ValueError, "student_temperature"),
    (lambda: CAPILoss(sinkhorn_iterations=-1), ValueError, "sinkhorn_iterations"),
    (lambda: CAPILoss(sinkhorn_iterations=1.5), TypeError, "sinkhorn_iterations"),
    (lambda: CAPILoss(gather_distributed=2), TypeError, "gather_distributed"),
    (lambda: CAPILoss()(r32(2, 8), r32(2, 8)), ShapeError, "teacher_logits must be"),
    (lambda: CAPILoss()(r32(2, 3, 8), r32(2, 4, 8)), RuntimeError, "one shape"),
    (lambda: CAPILoss()(r32(2, 6, 8), r32(2, 3, 8), torch.zeros(2, 2, dtype=torch.long)),
     ShapeError, "teacher_index"),
    (lambda: CAPILoss()(r32(2, 6, 8), r32(2, 3, 7), torch.zeros(2, 3, dtype=torch.long)),
     ShapeError, "teacher_index"),
    (lambda: CAPILoss()(r32(2, 6, 8), r32(2, 3, 8), torch.zeros(2, 3)), ValueError,
     "integers"),
    (lambda: CAPILoss()(r32(2, 6, 8), r32(2, 3, 8), torch.full((2, 3), 6)), RuntimeError,
     "out of bounds"),
    (lambda: CAPILoss()(r32(0, 3, 8), r32(0, 3, 8)), ShapeError, "no token"),
    (lambda: positionwise_sinkhorn_knopp(r32(3, 4)), ShapeError, "logits must be"),
    (lambda: positionwise_sinkhorn_knopp(r32(3, 4, 2), epsilon=-1.0), ValueError, "epsilon"),
]


@pytest.mark.parametrize("i", range(len(ERRORS)))
def test_bad_arguments(i):
    call, kind, match = ERRORS[i]
    with pytest.raises(kind, match=match):
        call()


# ----------------------------------------------------------------------------- distributed

SIZES = [3, 1]  # images per rank
NT, NP, KD = 4, 3, 6


def dist_data():
    B = sum(SIZES)
    return randn(B, NT, KD, seed=1), randn(B, NP, KD, seed=2), capi_index(B, NT, NP, 3)


def capi_worker(rank, world):
    o, n = sum(SIZES[:rank]), SIZES[rank]
    t, s, index = dist_data()
    s = s[o:o + n].clone().requires_grad_()
    loss = CAPILoss(gather_distributed=True)(t[o:o + n], s, index[o:o + n])
    q = positionwise_sinkhorn_knopp(t[o:o + n], gather_distributed=True)
    return loss.detach(), torch.autograd.grad(loss, s)[0], q


def test_capi_gather_distributed_two_processes():
    """2 gloo ranks with 3 and 1 images: each rank's Sinkhorn target is its rows of the
    global batch's, and its loss and gradient those of the formula on its own tokens with
    that target."""
    world = len(SIZES)
    results = _gloo.run(capi_worker, world, timeout=60, what="distributed CAPI",
                        group_timeout=30)
    t, s, index = dist_data()
    Q = ref_sinkhorn(t / 0.06, 3)
    Q0 = ref_sinkhorn(t, 3)
    for r in range(world):
        o, n = sum(SIZES[:r]), SIZES[r]
        loss, grad, q = results[r]
        sr = s[o:o + n].clone().requires_grad_()
        target = torch.stack([Q[o + b, index[o + b]] for b in range(n)])
        ref = -(target * torch.log_softmax(sr / 0.12, -1)).sum(-1).mean()
        assert rel(q, Q0[o:o + n]) <= 1e-13, r
        assert rel(loss, ref) <= 1e-13, r
        assert rel(grad, torch.autograd.grad(ref, sr)[0]) <= 1e-13, r
