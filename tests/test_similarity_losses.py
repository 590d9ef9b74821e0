"""HypersphereLoss, DirectCLRLoss, SymNegCosineSimilarityLoss, CO2Regularizer and
DSERegularizer against float64 references written from the papers' formulas (materialised
plainly, loops where the formula has them; never the library's code), on fresh random
inputs: values and input gradients, float32 and 16-bit inputs, odd shapes, bad arguments.

Tolerances come from the dtype: the reference runs in float64 on the same rounded inputs,
so a 16-bit result may differ by its own final rounding (eps / 2) and a float32 one by the
roundings of its float32 arithmetic (a few hundred eps at most here)."""
import math

import pytest
import torch
import torch.nn.functional as tF

from fastssl.losses.regularizers import CO2Regularizer, DSERegularizer
from fastssl.losses.similarity import (DirectCLRLoss, HypersphereLoss, SymNegCosineSimilarity,
                                       SymNegCosineSimilarityLoss)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def tol(dtype):
    """Relative error allowed against float64: 2 eps of a 16-bit result, 256 eps of float32."""
    eps32 = torch.finfo(torch.float32).eps
    return 256 * eps32 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps


def randn(*shape, seed, dtype=torch.float32, scale=True):
    """Fresh Gaussian rows, each with a random norm scale in [0.25, 4) (when ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if scale:
        x = x * torch.exp2(4 * torch.rand(*shape[:-1], 1, generator=g, dtype=torch.float64) - 2)
    return x.to(dtype).requires_grad_()


def rel(out, ref):
    """||out - ref|| / ||ref|| (ref's norm floored at 0.1: a gradient that is exactly zero
    in exact arithmetic, D = 1 under a normalisation, is judged against unit scale)."""
    out, ref = out.detach().double(), ref.detach().double()
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out - ref).norm() / max(float(ref.norm()), 0.1))


def leaf(x):
    return x.detach().double().requires_grad_()


def check_against(fn, ref_fn, inputs, dtype, what, wrt=None):
    """fn(*inputs) and its input gradients against ref_fn on the inputs in float64."""
    wrt = list(range(len(inputs))) if wrt is None else wrt
    out = fn(*inputs)
    assert out.dtype == dtype and out.shape == (), f"{what}: {out.dtype} {tuple(out.shape)}"
    got = torch.autograd.grad(out, [inputs[i] for i in wrt])
    leaves = [leaf(x) for x in inputs]
    ref = ref_fn(*leaves)
    want = torch.autograd.grad(ref, [leaves[i] for i in wrt])
    t = tol(dtype)
    assert rel(out, ref) <= t, f"{what}: loss error {rel(out, ref):.3g} > {t:.3g}"
    for i, a, b in zip(wrt, got, want):
        assert a.dtype == dtype
        assert rel(a, b) <= t, f"{what}: grad[{i}] error {rel(a, b):.3g} > {t:.3g}"
    return out, ref


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ----------------------------------------------------------------------------- HypersphereLoss

def ref_hypersphere(za, zb, t, lam, alpha):
    """Wang & Isola (2020): E ||x - y||^alpha + lam/2 (log E_{i<j} e^{-t ||x_i - x_j||^2}
    for x, and for y), on unit rows."""
    x, y = unit(za), unit(zb)
    align = (x - y).norm(dim=1).pow(alpha).mean()  # norm: subgradient 0 at 0 (D = 1)

    def unif(u):
        i, j = torch.triu_indices(u.shape[0], u.shape[0], 1)  # the pairs i < j
        return torch.log(torch.exp(-t * ((u[i] - u[j]) ** 2).sum(1)).mean())
    return align + lam * (unif(x) + unif(y)) / 2 if lam else align


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D", [(2, 1), (3, 257), (17, 3), (17, 257)])
@pytest.mark.parametrize("t,lam,alpha", [(1.0, 1.0, 2.0), (2.0, 0.5, 1.5), (60.0, 1.0, 1.0)])
def test_hypersphere(n, D, t, lam, alpha, dtype):
    """t = 60: exp(-t d^2) is below float32's range (lightly's log(mean(exp)) is -inf or
    wrong there), the log-sum-exp keeps the value."""
    za = randn(n, D, seed=n * 31 + D, dtype=dtype)
    zb = randn(n, D, seed=n * 31 + D + 1, dtype=dtype)
    check_against(HypersphereLoss(t, lam, alpha), lambda a, b: ref_hypersphere(a, b, t, lam, alpha),
                  [za, zb], dtype, f"HypersphereLoss{(t, lam, alpha)}")


def test_hypersphere_single_row():
    with pytest.raises(ValueError, match="z_a"):
        HypersphereLoss()(torch.randn(1, 4), torch.randn(1, 4))
    za, zb = randn(1, 5, seed=1), randn(1, 5, seed=2)
    check_against(HypersphereLoss(lam=0.0), lambda a, b: ref_hypersphere(a, b, 1.0, 0.0, 2.0),
                  [za, zb], torch.float32, "HypersphereLoss(lam=0), N = 1")


# ----------------------------------------------------------------------------- DirectCLRLoss

def ref_nt_xent(z0, z1, T):
    """SimCLR's NT-Xent: -log( e^{s_ip / T} / sum_{k != i} e^{s_ik / T} ), mean over 2N."""
    z = unit(torch.cat([z0, z1]))
    n = z0.shape[0]
    s = z @ z.T / T
    losses = []
    for i in range(2 * n):
        others = torch.cat([s[i, :i], s[i, i + 1:]])
        losses.append(torch.logsumexp(others, 0) - s[i, (i + n) % (2 * n)])
    return torch.stack(losses).mean()


def ref_directclr(o0, o1, loss_dim, T):
    return ref_nt_xent(o0.flatten(1)[:, :loss_dim], o1.flatten(1)[:, :loss_dim], T)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,loss_dim", [((1, 5), 3), ((3, 257), 64), ((17, 1), 64),
                                            ((17, 257), 256), ((3, 4, 5), 7)])
def test_directclr(shape, loss_dim, dtype):
    o0 = randn(*shape, seed=sum(shape) + loss_dim, dtype=dtype)
    o1 = randn(*shape, seed=sum(shape) + loss_dim + 1, dtype=dtype)
    T = 0.3
    out, _ = check_against(DirectCLRLoss(loss_dim, T),
                           lambda a, b: ref_directclr(a, b, loss_dim, T), [o0, o1], dtype,
                           f"DirectCLRLoss {shape} loss_dim={loss_dim}")
    if shape[0] == 1:
        assert out.detach().item() == 0.0  # one pair: the positive is the only other row


def test_directclr_slice_is_a_view():
    x = torch.randn(6, 100)
    y = DirectCLRLoss(loss_dim=10)._leading(x, "out0")
    assert y.shape == (6, 10) and y.data_ptr() == x.data_ptr() and y._base is x


def test_directclr_memory_bank():
    """A (K, loss_dim) bank: out0 against its out1 and the bank before the update (MoCo)."""
    K, loss_dim, T = 7, 4, 0.2
    torch.manual_seed(5)
    loss = DirectCLRLoss(loss_dim, T, memory_bank_size=(K, loss_dim))
    for step in range(3):
        o0, o1 = randn(3, 9, seed=10 + step), randn(3, 9, seed=20 + step)
        bank = loss.bank.clone()

        def ref(a, b):
            a, b = unit(a[:, :loss_dim]), unit(b[:, :loss_dim])
            logits = torch.cat([(a * b).sum(1, keepdim=True), a @ unit(bank.double()).T], 1) / T
            return tF.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
        check_against(loss, ref, [o0, o1], torch.float32, f"DirectCLRLoss bank step {step}")
    assert loss.bank.shape == (K, loss_dim)


# ----------------------------------------------------------------------------- SymNegCosine

def ref_symneg(z0, p0, z1, p1, eps=1e-8):
    """SimSiam: D(p0, sg z1) / 2 + D(p1, sg z0) / 2, D = -mean cosine over the last dim."""
    def d(p, z):
        z = z.detach()
        cos = (p * z).sum(-1) / (p.norm(dim=-1).clamp_min(eps) * z.norm(dim=-1).clamp_min(eps))
        return -cos.mean()
    return d(p0, z1) / 2 + d(p1, z0) / 2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 257), (3, 5), (17, 257), (3, 4, 5)])
def test_sym_neg_cosine_similarity(shape, dtype):
    """Against float64 only: lightly 1.6.0 has no such class (its repository head has)."""
    z0, p0, z1, p1 = (randn(*shape, seed=sum(shape) * 4 + i, dtype=dtype) for i in range(4))
    loss = SymNegCosineSimilarityLoss()
    check_against(lambda a, b, c, d: loss((a, b), (c, d)), ref_symneg, [z0, p0, z1, p1], dtype,
                  f"SymNegCosineSimilarityLoss {shape}", wrt=[1, 3])
    out = loss([z0, p0], torch.stack([z1, p1]))  # lists and stacked pairs unpack too
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, [z0, z1], allow_unused=True)
    assert all(g is None or not g.any() for g in grads)  # stop-gradient on the z's
    assert SymNegCosineSimilarity is SymNegCosineSimilarityLoss


def test_sym_neg_cosine_similarity_bad_pairs():
    x = torch.randn(3, 4)
    with pytest.raises(TypeError, match="out0"):
        SymNegCosineSimilarityLoss()(1.0, (x, x))
    with pytest.raises(ValueError, match="out1"):
        SymNegCosineSimilarityLoss()((x, x), (x, x, x))
    with pytest.raises(ValueError, match="out0"):
        SymNegCosineSimilarityLoss()(x, (x, x))  # a tensor whose first dim is not 2


# ----------------------------------------------------------------------------- CO2Regularizer

def ref_co2(out0, out1, alpha, t, bank=None):
    """CO2 (Wei et al., 2021): per row, the softmax over [positive, negatives] of the query
    and of its positive key, their symmetric KL, mean over rows, times alpha / 2. Without a
    bank the negatives are the other rows of the other view."""
    u, v = unit(out0), unit(out1)
    n, total = u.shape[0], 0.0
    for i in range(n):
        if bank is None:
            neg_u = torch.stack([v[j] for j in range(n) if j != i]) if n > 1 else u[:0]
            neg_v = torch.stack([u[j] for j in range(n) if j != i]) if n > 1 else u[:0]
        else:
            neg_u = neg_v = bank.double()
        p = torch.softmax(torch.cat([(u[i] * v[i]).sum()[None], neg_u @ u[i]]) / t, 0)
        q = torch.softmax(torch.cat([(v[i] * u[i]).sum()[None], neg_v @ v[i]]) / t, 0)
        total = total + (p * (p / q).log()).sum() + (q * (q / p).log()).sum()
    return alpha / 2 * total / n


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,D", [(1, 3), (3, 257), (17, 1), (17, 257)])
def test_co2_without_bank_is_differentiable(n, D, dtype):
    """The deliberate fix: lightly's result is a constant; here the value and gradients are
    the formula's (float64 autograd)."""
    a, b = randn(n, D, seed=n + 7 * D, dtype=dtype), randn(n, D, seed=n + 7 * D + 1, dtype=dtype)
    out, _ = check_against(CO2Regularizer(alpha=1.5, t_consistency=0.1),
                           lambda x, y: ref_co2(x, y, 1.5, 0.1), [a, b], dtype,
                           f"CO2Regularizer {(n, D)}")
    assert out.grad_fn is not None
    if n == 1:
        assert out.detach().item() == 0.0


def test_co2_memory_bank_over_steps():
    """Bank semantics: random unit rows from torch.randn at construction, read before the
    update, then normalised out1 written FIFO; a batch reaching the end fills the tail,
    the rest is dropped and the pointer returns to 0. Updated without grad too."""
    K, D, n, t = 7, 5, 3, 0.05
    torch.manual_seed(3)
    expected = tF.normalize(torch.randn(K, D), dim=1)
    torch.manual_seed(3)
    reg = CO2Regularizer(alpha=1.0, t_consistency=t, memory_bank_size=(K, D))
    torch.testing.assert_close(reg.bank, expected, rtol=2 * 2.0 ** -23, atol=2 * 2.0 ** -24)
    ptr = 0
    for step in range(4):
        a, b = randn(n, D, seed=40 + step), randn(n, D, seed=50 + step)
        bank = reg.bank.clone()
        check_against(reg, lambda x, y: ref_co2(x, y, 1.0, t, bank), [a, b], torch.float32,
                      f"CO2Regularizer bank step {step}")
        stop = min(ptr + n, K)
        expected[ptr:stop] = tF.normalize(b.detach(), dim=1)[:stop - ptr]
        ptr = 0 if ptr + n >= K else ptr + n
        assert int(reg.bank_ptr) == ptr, step
        torch.testing.assert_close(reg.bank, expected, rtol=4 * 2.0 ** -23, atol=4 * 2.0 ** -24)
    with torch.no_grad():
        reg(randn(n, D, seed=1), randn(n, D, seed=2))
    assert int(reg.bank_ptr) == ptr + n


def test_co2_bank_width_from_first_batch_and_float64():
    reg = CO2Regularizer(memory_bank_size=6)
    a, b = randn(2, 4, seed=1, dtype=torch.float64), randn(2, 4, seed=2, dtype=torch.float64)
    out = reg(a, b)
    assert reg.bank.shape == (6, 4) and reg.bank.dtype == torch.float32
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match="width"):
        reg(torch.randn(2, 3), torch.randn(2, 3))


# ----------------------------------------------------------------------------- DSERegularizer

def ref_kmeans(x, k, iters, tol):
    """Lloyd's iterations from the first k rows (a fixed seed set), textbook loops."""
    k = min(k, x.shape[0])
    c = x[:k].clone()
    for _ in range(iters):
        labels = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        assert all((labels == j).any() for j in range(k)), "an emptied cluster: pick a new seed"
        new = torch.stack([x[labels == j].mean(0) for j in range(k)])
        shift, c = (new - c).norm(), new
        if shift < tol:
            break
    return c, ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)


def ref_rank(rows):
    """Centred singular-value sum of a cluster, / sqrt(max(|C| - 1, D))."""
    s = torch.linalg.svdvals(rows - rows.mean(0))
    return s.sum() / math.sqrt(max(rows.shape[0] - 1, rows.shape[1]))


def ref_clusters(x, k, iters, tol):
    """(centroids, labels, [R(C) of each cluster with more than one row])."""
    c, labels = ref_kmeans(x.detach(), k, iters, tol)
    ranks = [ref_rank(x[labels == j]) for j in range(c.shape[0]) if (labels == j).sum() > 1]
    return c, labels, ranks


def mean_or_zero(terms):
    return torch.stack(terms).mean() if terms else torch.zeros((), dtype=torch.float64)


def ref_dse(x, weight, normalize, local, glob, iters, tol):
    """DSE (arXiv 2510.17299): inter / a + ED - (intra_batch / a + intra_image / a) / 2."""
    if normalize:
        x = unit(x)
    B, N, D = x.shape
    flat = x.reshape(B * N, D)
    a = (flat - flat.mean(0)).norm(dim=1).mean()
    per_image = [mean_or_zero(r) for r in
                 (ref_clusters(x[b], local, iters, tol)[2] for b in range(B)) if r]
    intra_image = mean_or_zero(per_image)
    m = max(glob // local, 1)
    inter, intra = [], []
    for start in range(0, B, m):
        group = x[start:start + m].reshape(-1, D)
        c, labels, ranks = ref_clusters(group, glob, iters, tol)
        intra += ranks
        if c.shape[0] > 1:
            others = [torch.stack([(group[i] - c[j]).norm() for j in range(c.shape[0])
                                   if j != labels[i]]).min() for i in range(group.shape[0])]
            inter.append(torch.stack(others).mean())
    s = torch.linalg.svdvals(flat)
    p = s / s.sum()
    ed = torch.exp(-(p * p.log()).sum()) / min(flat.shape)
    dse = mean_or_zero(inter) / a + ed - (mean_or_zero(intra) / a + intra_image / a) / 2
    return -weight * dse


def first_rows_init(reg):
    """Seeds = the first k rows of each problem (the reference's), instead of k-means++."""
    reg._kmeans_plus_plus_init = lambda x, k: x[:, :k].clone()
    return reg


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,normalize", [((1, 5, 3), True), ((5, 8, 6), True),
                                             ((3, 1, 4), True), ((2, 9, 1), False),
                                             ((3, 17, 257), True)])
def test_dse(shape, normalize, dtype):
    """Groups of 2 images (global 4 // local 2); B = 5 and 3 leave a smaller last group;
    N = 1 makes every image cluster a single row; D = 1 without normalisation (unit rows
    in one dimension are +-1: ties)."""
    x = randn(*shape, seed=sum(shape) * 3 + normalize, dtype=dtype)
    kw = dict(weight=0.7, normalize=normalize, local_clusters=2, global_clusters=4,
              max_kmeans_iters=5, tol=1e-4)
    reg = first_rows_init(DSERegularizer(**kw))
    check_against(reg, lambda r: ref_dse(r, *kw.values()), [x], dtype, f"DSERegularizer {shape}")


def test_dse_default_init_is_seeded_and_differentiable():
    x = randn(4, 12, 6, seed=3)
    reg = DSERegularizer(local_clusters=2, global_clusters=4, max_kmeans_iters=3)
    torch.manual_seed(0)
    a = reg(x)
    torch.manual_seed(0)
    b = reg(x)
    assert torch.equal(a, b) and a.shape == () and torch.isfinite(a)
    (g,) = torch.autograd.grad(a, [x])
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert DSERegularizer(weight=0.0)(x).item() == 0.0


def test_dse_batched_kmeans_stops_each_problem_on_its_own():
    """Problems of very different difficulty in one batch: each one's centroids are those
    of the reference run alone (lightly's per-problem early stop)."""
    x = torch.cat([randn(1, 30, 3, seed=1, scale=False).detach(),
                   randn(1, 30, 3, seed=2, scale=False).detach() * 0.01 + 3]).double()
    reg = first_rows_init(DSERegularizer(max_kmeans_iters=20, tol=0.05))
    c, labels = reg._kmeans(x, 3)
    for g in range(2):  # the small one stops after one iteration, the other goes on
        cr, lr = ref_kmeans(x[g], 3, 20, 0.05)
        torch.testing.assert_close(c[g], cr, rtol=1e-12, atol=1e-12)
        assert torch.equal(labels[g], lr)


# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("make,kind,name", [
    (lambda: HypersphereLoss(t=0.0), ValueError, "t"),
    (lambda: HypersphereLoss(t="1"), TypeError, "t"),
    (lambda: HypersphereLoss(lam=-1.0), ValueError, "lam"),
    (lambda: HypersphereLoss(alpha=0.0), ValueError, "alpha"),
    (lambda: DirectCLRLoss(loss_dim=0), ValueError, "loss_dim"),
    (lambda: DirectCLRLoss(loss_dim=2.5), TypeError, "loss_dim"),
    (lambda: DirectCLRLoss(temperature=0.0), ValueError, "temperature"),
    (lambda: CO2Regularizer(alpha=float("nan")), ValueError, "alpha"),
    (lambda: CO2Regularizer(t_consistency=0), ValueError, "t_consistency"),
    (lambda: CO2Regularizer(memory_bank_size=(-1, 4)), ValueError, "memory_bank_size"),
    (lambda: CO2Regularizer(memory_bank_size=(4, 4, 4)), ValueError, "memory_bank_size"),
    (lambda: CO2Regularizer(memory_bank_size="big"), TypeError, "memory_bank_size"),
    (lambda: DSERegularizer(weight=-1.0), ValueError, "weight"),
    (lambda: DSERegularizer(normalize=2), TypeError, "normalize"),
    (lambda: DSERegularizer(local_clusters=0), ValueError, "local_clusters"),
    (lambda: DSERegularizer(global_clusters=0), ValueError, "global_clusters"),
    (lambda: DSERegularizer(max_kmeans_iters=0), ValueError, "max_kmeans_iters"),
    (lambda: DSERegularizer(tol=0.0), ValueError, "tol"),
])
def test_bad_arguments_name_the_argument(make, kind, name):
    with pytest.raises(kind, match=rf"\b{name}\b"):
        make()


@pytest.mark.parametrize("call,name", [
    (lambda: HypersphereLoss()(torch.randn(4, 8), torch.randn(4, 6)), "z_b"),
    (lambda: DirectCLRLoss()(torch.randn(4), torch.randn(4)), "out0"),
    (lambda: DirectCLRLoss()(torch.randn(4, 8), torch.randn(3, 8)), "out1"),
    (lambda: CO2Regularizer()(torch.randn(4, 8), torch.randn(4, 6)), "out1"),
    (lambda: DSERegularizer()(torch.randn(4, 6)), "representations"),
    (lambda: DSERegularizer()(torch.randn(4, 0, 6)), "representations"),
    (lambda: DSERegularizer()(torch.ones(2, 3, 4, dtype=torch.long)), "representations"),
])
def test_bad_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_non_contiguous_inputs():
    """Strided views (every other column, a transposed batch) give the contiguous result."""
    a, b = randn(9, 14, seed=1).detach(), randn(14, 9, seed=2).detach().T
    for loss in (HypersphereLoss(), CO2Regularizer(), DirectCLRLoss(loss_dim=5)):
        x, y = a[:, ::2], b[:, ::2]
        assert not x.is_contiguous() and not y.is_contiguous()
        torch.testing.assert_close(loss(x, y), loss(x.contiguous(), y.contiguous()),
                                   rtol=4 * 2.0 ** -23, atol=0)
    r = randn(2, 6, 10, seed=3).detach().transpose(1, 2)[:, ::2]  # (2, 5, 6), strided
    reg = first_rows_init(DSERegularizer(local_clusters=2, global_clusters=4))
    torch.testing.assert_close(reg(r), reg(r.contiguous()), rtol=4 * 2.0 ** -23, atol=0)
