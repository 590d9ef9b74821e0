"""DetConB / DetConS and MACL (fastssl.detcon) against float64 formulas written out here
with the full similarity matrices: values and gradients on both paths (portable torch and
the Triton interpreter), 16-bit inputs, odd shapes (one image, one region, D = 1 and 257),
regions without a positive, every region with one mask id, any integer mask ids, the
temperature's gradient, torch.compile, the errors, and two gloo ranks (different numbers of
images) equal to one process on the global batch."""
import pytest
import torch
import torch.nn.functional as tF

import _gloo
from fastssl import detcon
from test_multipositive import DTYPES, assert_as_close_as_eager


def floor(dtype, T, D):
    """The size of the terms the outputs sum (logits and s |u| |c|: 1 / T) where rounding
    them is expected: 16-bit inputs, whose unit rows the kernel reads in the input dtype
    (tensor cores on the GPU; each logit carries a rounding of that size), and D = 1, where
    unit rows are +-1 and every gradient cancels exactly (float64: roundings). float32
    otherwise: none."""
    return 1 / abs(T) if dtype != torch.float32 or D == 1 else 0.0


def ref_view(p, t_other, t_same, k_row, k_other, T):
    """One direction of DetCon with the full (rows x 2 columns) logits, in p's dtype."""
    b, m, D = p.shape
    rows = tF.normalize(p, dim=-1).reshape(b * m, D)
    other = tF.normalize(t_other, dim=-1).reshape(b * m, D)
    same = tF.normalize(t_same, dim=-1).reshape(b * m, D)
    image = torch.arange(b).repeat_interleave(m)
    kr, ko = k_row.reshape(-1), k_other.reshape(-1)
    one_image = image[:, None] == image[None, :]
    positive = one_image & (kr[:, None] == ko[None, :])
    left_out = one_image & (kr[:, None] == kr[None, :])
    logits = torch.cat([rows @ other.T / T,
                        (rows @ same.T / T).masked_fill(left_out, float("-inf"))], 1)
    log_p = torch.log_softmax(logits, 1)[:, :b * m]
    n_pos = positive.sum(1)
    ce = -(positive * log_p).sum(1) / n_pos.clamp(min=1)
    weight = (n_pos > 0).to(p.dtype) / left_out.sum(1)
    return (weight * ce).mean()


def ref_detcon(p0, p1, t0, t1, k0, k1, T):
    return ref_view(p0, t1, t0, k0, k1, T) + ref_view(p1, t0, t1, k1, k0, T)


def _masks(b, m, case, g):
    if case == "same":  # every region of every image: one id
        return torch.full((b, m), 3), torch.full((b, m), 3)
    k0, k1 = torch.randint(0, 3, (b, m), generator=g), torch.randint(0, 3, (b, m), generator=g)
    k0[0, 0] = 7  # a region with no positive in view 1
    return k0, k1


CASES = [(b, m, D, case) for b, m, D in [(1, 1, 1), (1, 5, 3), (3, 1, 8), (5, 6, 16)]
         for case in ("random", "same")] + [(3, 5, 257, "random")]


@pytest.mark.parametrize("b,m,D,case", CASES)
def test_detconb_against_formula(backend, b, m, D, case):
    g = torch.Generator().manual_seed(b * 1000 + m * 10 + D)
    xs = [torch.randn(b, m, D, generator=g, dtype=torch.float64) for _ in range(4)]
    k0, k1 = _masks(b, m, case, g)
    T = 0.1
    loss = detcon.DetConBLoss(T)
    for dtype in DTYPES:
        assert loss(*[x.to(dtype) for x in xs], k0, k1).dtype == dtype
        assert_as_close_as_eager(lambda *x: loss(*x, k0, k1),
                                 lambda *x: ref_detcon(*x, k0, k1, T), xs, dtype,
                                 floor=floor(dtype, T, D))


@pytest.mark.parametrize("b,m,D", [(1, 4, 5), (3, 6, 33)])
def test_detcons_is_detconb_with_the_views_as_targets(backend, b, m, D):
    g = torch.Generator().manual_seed(b + m + D)
    xs = [torch.randn(b, m, D, generator=g, dtype=torch.float64) for _ in range(2)]
    k0, k1 = _masks(b, m, "random", g)
    loss = detcon.DetConSLoss(0.5)
    for dtype in DTYPES:
        assert_as_close_as_eager(lambda x, y: loss(x, y, k0, k1),
                                 lambda x, y: ref_detcon(x, y, x, y, k0, k1, 0.5), xs, dtype,
                                 floor=floor(dtype, 0.5, D))


def test_detcon_float64_and_temperature_gradient(backend):
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(3, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
          for _ in range(4)]
    k0, k1 = torch.randint(0, 4, (3, 5), generator=g), torch.randint(0, 4, (3, 5), generator=g)
    T = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    got = detcon.detcon_loss(*xs, k0, k1, T)
    want = ref_detcon(*xs, k0, k1, T)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(got, [*xs, T]), torch.autograd.grad(want, [*xs, T])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_detcon_any_integer_mask_ids_and_layouts():
    """Only equality of ids counts: int32, uint8, bool, negative and huge int64 ids that
    pair regions alike give the same loss; non-contiguous inputs too."""
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(4, 6, 8, generator=g) for _ in range(4)]
    k0, k1 = torch.randint(0, 2, (4, 6), generator=g), torch.randint(0, 2, (4, 6), generator=g)
    want = detcon.DetConBLoss()(*xs, k0, k1)
    assert torch.isclose(want, ref_detcon(*[x.double() for x in xs], k0, k1, 0.1).float(),
                         rtol=1e-5)
    huge = lambda k: k * (2 ** 40) - 5  # noqa: E731
    for a, b in ((k0.int(), k1.int()), (k0.to(torch.uint8), k1.to(torch.uint8)),
                 (k0.bool(), k1.bool()), (huge(k0), huge(k1)), (-k0, -k1)):
        assert torch.equal(detcon.DetConBLoss()(*xs, a, b), want)
    strided = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in xs]
    assert not strided[0].is_contiguous()
    assert torch.equal(detcon.DetConBLoss()(*strided, k0.T.contiguous().T, k1), want)


def test_detcon_deterministic_and_compiled():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 4, 16, generator=g, requires_grad=True) for _ in range(4)]
    k0, k1 = torch.randint(0, 3, (3, 4), generator=g), torch.randint(0, 3, (3, 4), generator=g)
    loss = detcon.DetConBLoss()
    runs = [loss(*xs, k0, k1) for _ in range(2)]
    grads = [torch.autograd.grad(r, xs) for r in runs]
    assert torch.equal(runs[0], runs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(*xs, k0, k1)
    assert torch.allclose(compiled, runs[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(torch.autograd.grad(compiled, xs), grads[0]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_detcon_errors():
    x = torch.randn(2, 3, 4)
    k = torch.zeros(2, 3, dtype=torch.long)
    for T in (0.0, 1e-9, -1e-9):
        with pytest.raises(ValueError, match="Illegal temperature"):
            detcon.DetConBLoss(temperature=T)
        with pytest.raises(ValueError, match="Illegal temperature"):
            detcon.DetConSLoss(temperature=T)
    with pytest.raises(TypeError, match="gather_distributed"):
        detcon.DetConBLoss(gather_distributed="yes")
    loss = detcon.DetConBLoss()
    with pytest.raises(ValueError, match="3-D"):
        loss(x[0], x[0], x[0], x[0], k, k)
    with pytest.raises(RuntimeError, match="shape"):
        loss(x, x, x, torch.randn(2, 3, 5), k, k)
    with pytest.raises(ValueError, match="dtype"):
        loss(x, x, x, x.double(), k, k)
    with pytest.raises(AssertionError, match="mask_view1 must have shape"):
        loss(x, x, x, x, k, k[:, :2])
    with pytest.raises(TypeError, match="integer"):
        loss(x, x, x, x, k, k.float())
    with pytest.raises(ValueError, match="non-empty"):
        loss(*[torch.randn(0, 3, 4)] * 4, k[:0], k[:0])
    with pytest.raises(ValueError, match="view1"):
        detcon.DetConSLoss()(x, x[:, :2], k, k)
    assert float(detcon.DetConBLoss(-0.5)(x, x, x, x, k, k)) != 0.0  # |T| >= 1e-8 is legal


# ----------------------------------------------------------------------------- MACL

def ref_macl(z0, z1, T, alpha, A_0, direct=False):
    """The 2n x 2n cosine matrix, positives at +-n off the diagonal, in z0's dtype. With
    r_i = sum over the negatives j of exp(l_ij - l_ip): -log P_i = log1p(r_i) and
    1 - P_i = r_i / (1 + r_i), sums of positive terms (``direct``: 1 - exp(log P_i), which
    cancels where P_i is close to 1)."""
    n = z0.shape[0]
    z = tF.normalize(torch.cat([z0, z1]), dim=1)
    cos = z @ z.T
    rows, pos = torch.arange(2 * n), torch.cat([n + torch.arange(n), torch.arange(n)])
    A = cos[rows, pos].detach().mean()
    t = T * (1 + alpha * (A - A_0))
    logits = cos / t
    negative = ~torch.eye(2 * n, dtype=torch.bool)
    negative[rows, pos] = False
    r = (torch.exp(logits - logits[rows, pos][:, None]) * negative).sum(1)
    nll, one_minus_p = torch.log1p(r), r / (1 + r)
    if direct:
        nll = -torch.log_softmax(logits.masked_fill(torch.eye(2 * n, dtype=torch.bool),
                                                    float("-inf")), 1)[rows, pos]
        one_minus_p = 1 - torch.exp(-nll)
    V = 1 / (one_minus_p + 1e-8)
    return (V.detach() * nll).mean()


@pytest.mark.parametrize("n,D,T,alpha,A_0", [
    (1, 3, 0.1, 0.5, 0.0), (2, 1, 0.5, 1.0, 1.0), (2, 1, 1.0, 0.0, 0.5), (16, 33, 0.1, 0.5, 0.0),
    (16, 33, 0.5, 1.0, 1.0), (16, 33, 1.0, 0.0, 0.5), (5, 257, 0.1, 0.5, 0.0)])
def test_macl_against_formula(backend, n, D, T, alpha, A_0):
    g = torch.Generator().manual_seed(n * 100 + D)
    z0 = torch.randn(n, D, generator=g, dtype=torch.float64)
    z1 = z0 + 0.8 * torch.randn(n, D, generator=g, dtype=torch.float64)
    loss = detcon.MACLLoss(T, alpha, A_0)
    for dtype in DTYPES:
        assert loss(z0.to(dtype), z1.to(dtype)).dtype == dtype
        assert_as_close_as_eager(loss, lambda x, y: ref_macl(x, y, T, alpha, A_0), (z0, z1),
                                 dtype, floor=floor(dtype, T, D))
    got = loss(z0, z1)
    torch.testing.assert_close(got, ref_macl(z0, z1, T, alpha, A_0), rtol=1e-9, atol=1e-12)


def test_macl_weights_where_the_positive_dominates():
    """P_i close to 1 (l_i ~ 1e-7): fastssl's float32 weights follow float64's, while the
    direct formula in float32 (log-softmax, then 1 - P) loses l_i below the rounding of 1."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    for T in (0.1, 0.08, 0.06):
        want = ref_macl(z.double(), z.double(), T, 0.0, 0.0)
        got = detcon.macl_loss(z, z, T, 0.0, 0.0)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    direct = ref_macl(z, z, 0.06, 0.0, 0.0, direct=True)  # lightly's form in float32: 0.23
    assert abs(float(direct) - float(want)) > 0.5


def test_macl_errors():
    with pytest.raises(ValueError, match="temperature"):
        detcon.MACLLoss(temperature=1e-9)
    with pytest.raises(ValueError, match="temperature"):
        detcon.MACLLoss(temperature=-0.1)
    for alpha in (-0.1, 1.1):
        with pytest.raises(ValueError, match="Alpha"):
            detcon.MACLLoss(alpha=alpha)
    for a0 in (-0.1, 1.1):
        with pytest.raises(ValueError, match="A_0"):
            detcon.MACLLoss(A_0=a0)
    with pytest.raises(ValueError, match="2-D"):
        detcon.MACLLoss()(torch.randn(4), torch.randn(4))
    with pytest.raises(ValueError, match="shape"):
        detcon.MACLLoss()(torch.randn(4, 3), torch.randn(5, 3))


# ----------------------------------------------------------------------------- 2 ranks

IMAGES = (3, 2)  # rank 0 holds 3 images, rank 1 holds 2


def _global_batch():
    g = torch.Generator().manual_seed(12)
    xs = [torch.randn(sum(IMAGES), 4, 6, generator=g) for _ in range(4)]
    ks = [torch.randint(0, 3, (sum(IMAGES), 4), generator=g) for _ in range(2)]
    return xs, ks


def _rank_worker(rank, world):
    xs, ks = _global_batch()
    lo = sum(IMAGES[:rank])
    rows = slice(lo, lo + IMAGES[rank])
    mine = [x[rows].clone().requires_grad_() for x in xs]
    loss = detcon.DetConBLoss(0.2)(*mine, *[k[rows] for k in ks])
    # the mean over the global rows: each rank's mean weighted by its share
    (loss * IMAGES[rank] * world / sum(IMAGES)).backward()
    try:  # rank 1's masks are too short: every rank must raise, none must hang
        bad = ks[1][rows][:, :3 if rank else 4]
        detcon.DetConBLoss(0.2)(*mine, ks[0][rows], bad)
        error = None
    except Exception as e:
        error = (type(e).__name__, str(e))
    return {"loss": loss.detach(), "grads": [x.grad for x in mine], "error": error}


def test_two_gloo_ranks_equal_one_process_on_the_global_batch():
    """Ranks of 3 and 2 images: the row-weighted mean of the ranks' losses is the one-process
    loss on the 5 images, and each rank's input gradients are world_size x the global
    gradients of its slice (the convention of fastssl.distributed)."""
    res = _gloo.run(_rank_worker, 2, timeout=120)
    xs, ks = _global_batch()
    xs = [x.clone().requires_grad_() for x in xs]
    ref = detcon.DetConBLoss(0.2)(*xs, *ks)
    ref.backward()
    got = sum(r["loss"] * n for r, n in zip(res, IMAGES)) / sum(IMAGES)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    for i, x in enumerate(xs):
        g = torch.cat([r["grads"][i] for r in res])
        assert torch.allclose(g, 2 * x.grad, rtol=1e-4, atol=1e-6), i
    for r in res:
        assert r["error"][0] == "ShapeError" and "mask_view1" in r["error"][1] \
            and "rank 1" in r["error"][1], r["error"]
